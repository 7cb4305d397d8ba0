"""The training task as the container runs it: learning, exact resume after a kill, determinism, two workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port

N_TRAIN, N_VAL = 1536, 256


@pytest.fixture
def datasets(fmnist_env, tmp_path):
    "A datasets store with TFRecord exports of small slices of the real data and a preprocessing record."
    from fmnist_gcp.config import Settings
    from fmnist_gcp.data import load_split, train_val_split
    from fmnist_gcp.preprocessing import TFRECORD_DIR, Augment, export_tfrecords, write_preprocessing
    s = Settings.from_env()
    x, y = load_split("train")
    tr, va = train_val_split(y, 0.1, 42)
    tr, va = tr[:N_TRAIN], va[:N_VAL]
    s.datasets.write_json(f"{TFRECORD_DIR}/manifest.json", {"splits": {
        "train": export_tfrecords(s, "train", x[tr], y[tr], tr, shards=2),
        "val": export_tfrecords(s, "val", x[va], y[va], va, shards=1)}})
    write_preprocessing(s, {"mean": 0.286, "std": 0.353}, Augment(flip=True, max_shift=2, erase_prob=0.3))
    return fmnist_env


def task(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "fmnist_gcp.task", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


SMALL = ["--widths", "8,16", "--convs", "1", "--batch-size", "64", "--lr", "0.01", "--precision", "float32",
         "--deterministic", "--seed", "1"]


def test_task_learns_calibrates_and_writes_the_model(datasets, tmp_path):
    env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / "model"), "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "tb")}
    p = task([*SMALL, "--epochs", "3", "--run-id", "r1", "--metrics-file", str(tmp_path / "m.json")], env)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    h = json.loads((tmp_path / "m.json").read_text())["history"]
    assert len(h) == 3 and h[-1]["loss"] < h[0]["loss"] and h[-1]["val_accuracy"] > 0.5, h
    meta = json.loads((tmp_path / "model/metadata.json").read_text())
    assert meta["normalisation"] == {"mean": 0.286, "std": 0.353} and meta["config"]["widths"] == [8, 16]
    assert (meta["run_id"], meta["precision"], meta["config"]["augment"]["erase_prob"]) == ("r1", "float32", 0.3)
    assert json.loads((tmp_path / "ckpt/state.json").read_text())["epoch"] == 3
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # the exported model takes raw pixels, and its temperature was fitted on the validation split and built in:
    # its probabilities are the uncalibrated model's, softened by the T that minimises the validation log loss
    from fmnist_gcp.config import import_keras
    from fmnist_gcp.preprocessing import load_tfrecords
    from fmnist_gcp.training import fit_temperature, load_model, predict, soften
    x, y, _ = load_tfrecords("val")
    served = load_model(str(tmp_path / "model/model.keras"))
    layer, t = served.get_layer("temperature"), meta["temperature"]
    uncalibrated = import_keras().Model(served.input, layer.input)
    p, p_unc = predict(served, x), predict(uncalibrated, x)
    assert t != 1.0 and layer.temperature == t
    np.testing.assert_allclose(p, soften(p_unc, t), atol=1e-5)
    assert fit_temperature(p_unc, y) == pytest.approx(t, abs=0.01)
    assert (p.argmax(1) == y).mean() > 0.5


def test_no_calibrate_exports_the_model_without_a_temperature(datasets, tmp_path):
    env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / "model")}
    p = task([*SMALL, "--epochs", "1", "--max-train-images", "256", "--no-calibrate"], env)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    from fmnist_gcp.training import load_model
    meta = json.loads((tmp_path / "model/metadata.json").read_text())
    served = load_model(str(tmp_path / "model/model.keras"))
    assert meta["temperature"] == 1.0 and "temperature" not in [l.name for l in served.layers]


def test_killed_run_resumes_and_matches_an_uninterrupted_run(datasets, tmp_path):
    args = [*SMALL, "--epochs", "4"]
    ref_env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / "ref_model")}
    ref = task([*args, "--metrics-file", str(tmp_path / "ref.json")], ref_env)
    assert ref.wait(timeout=600) == 0
    env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / "model"), "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    p = task(args, env)
    state = tmp_path / "ckpt/state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1):
        assert p.poll() is None and time.time() < deadline, "task ended before its first checkpoint"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # preempted after epoch 1, before the run finished
    p.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert p.returncode == -signal.SIGKILL and killed_at < 4 and not (tmp_path / "model/metadata.json").exists()
    p2 = task([*args, "--metrics-file", str(tmp_path / "resumed.json")], env)
    out, _ = p2.communicate(timeout=600)
    assert p2.returncode == 0 and f"resuming after epoch {killed_at}" in out, out
    got, want = (json.loads((tmp_path / f).read_text())["history"] for f in ("resumed.json", "ref.json"))
    key = lambda h: [(e["epoch"], e["loss"], e["val_loss"], e["val_accuracy"]) for e in h]
    assert key(got) == key(want)  # same epochs, bit-identical losses


def test_deterministic_mode_repeats_exactly(datasets, tmp_path):
    runs = []
    for i in range(2):
        env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / f"m{i}")}
        p = task([*SMALL, "--epochs", "2", "--metrics-file", str(tmp_path / f"{i}.json")], env)
        assert p.wait(timeout=600) == 0
        runs.append(json.loads((tmp_path / f"{i}.json").read_text())["history"])
    assert [(h["loss"], h["val_loss"]) for h in runs[0]] == [(h["loss"], h["val_loss"]) for h in runs[1]]


def test_two_workers_on_loopback(datasets, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = {**datasets, "AIP_MODEL_DIR": str(tmp_path / "model"), "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(task([*SMALL, "--epochs", "2", "--max-train-images", "512", "--metrics-file",
                           str(tmp_path / f"w{i}.json")], env))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("2 replica(s)" in o for o in outs), outs
    assert "model written" in outs[0] and "model written" not in outs[1]  # only the chief writes
    assert (tmp_path / "model/metadata.json").exists()
    h0, h1 = (json.loads((tmp_path / f"w{i}.json").read_text())["history"] for i in range(2))
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1] and h0[-1]["loss"] < h0[0]["loss"]
