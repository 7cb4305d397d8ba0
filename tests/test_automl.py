"""The local AutoML search (stage 06_automl) with real training on a few hundred images: trial and time budget,
pruning, an interrupted search resumed from the models store, and the winner exported like the custom model."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fmnist_gcp import automl
from fmnist_gcp.config import Settings, Store

SPACE = automl.search_space("4,8|8,16", "64,128")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "Stores whose TFRecord exports hold 320 training and 160 validation images of the real data."
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import Augment, TFRECORD_DIR, export_tfrecords, write_preprocessing
    home = tmp_path_factory.mktemp("automl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMNIST_HOME", str(home)); mp.setenv("FMNIST_BACKEND", "local")
        for k in ("FMNIST_DEV_BUCKET", "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"): mp.delenv(k, raising=False)
        s = Settings.from_env()
        x, y = load_split("train", limit=480)
        s.datasets.write_json(f"{TFRECORD_DIR}/manifest.json", {"splits": {
            "train": export_tfrecords(s, "train", x[:320], y[:320], np.arange(320)),
            "val": export_tfrecords(s, "val", x[320:], y[320:], np.arange(320, 480))}})
        write_preprocessing(s, {"mean": 0.286, "std": 0.353}, Augment(erase_prob=0.0))
        yield {"settings": s, "x": x, "y": y, "home": home}


def trainer(tiny, folder=None, epochs=1, clock=None):
    x, y = tiny["x"], tiny["y"]
    from fmnist_gcp.preprocessing import Augment
    return automl.keras_trainer(x[:320], y[:320], x[320:], y[320:], {"mean": 0.286, "std": 0.353}, Augment(erase_prob=0.0),
                                epochs, seed=0, folder=folder, clock=clock)


def search(folder, workdir, train_trial, budget_s=120.0, max_trials=2, pruner=None, name="r1"):
    study = automl.open_study(folder, name, str(workdir), pruner=pruner or automl.make_pruner("none"), log=lambda *a: None)
    out = automl.run_search(study, train_trial, SPACE, budget_s, max_trials, sync=lambda: automl.push_study(folder, str(workdir)),
                            log=lambda *a: None)
    return study, out


def test_time_budget_stops_the_search_within_one_epoch(tiny, tmp_path):
    folder = Store("models", str(tmp_path / "study"))
    t0 = time.monotonic()
    study, out = search(folder, tmp_path, trainer(tiny, folder, epochs=3), budget_s=0.5, max_trials=10)
    took = time.monotonic() - t0
    # the first trial starts (nothing is measured yet), spends the budget in its first epoch and is cut there
    assert out["trials"] == {"pruned": 1} and study.trials[0].user_attrs["stopped_by"] == "budget"
    assert len(study.trials[0].intermediate_values) == 1
    epoch_s = study.trials[0].user_attrs["seconds"]
    assert out["used_minutes"] * 60 <= 0.5 + epoch_s + 1 and took < 0.5 + epoch_s + 10


def test_pruning_prunes(tiny, tmp_path):
    import optuna
    folder = Store("models", str(tmp_path / "study"))
    study, out = search(folder, tmp_path, trainer(tiny, folder, epochs=2), max_trials=1,
                        pruner=optuna.pruners.ThresholdPruner(lower=0.99))  # nothing reaches 99 % on 320 images
    assert out["trials"] == {"pruned": 1}
    assert all(t.user_attrs["stopped_by"] == "pruner" and len(t.intermediate_values) == 1 for t in study.trials)
    assert out["best_trial"] is None and not folder.exists(automl.BEST_JSON)


KILL_SCRIPT = """
import sys, time
from fmnist_gcp import automl
from fmnist_gcp.config import Store
sys.path.insert(0, {tests!r})
import test_automl as t
tiny = {{"x": t.np.asarray(t.np.load({npz!r})["x"]), "y": t.np.load({npz!r})["y"]}}
folder = Store("models", {folder!r})
def slow(trial, params, report):
    if trial.number >= 1: print("IN TRIAL", trial.number, flush=True); time.sleep(600)
    return t.trainer(tiny)(trial, params, report)
t.search(folder, {work!r}, slow, max_trials=3)
"""


def test_a_killed_process_leaves_a_running_trial_that_the_next_run_retries(tiny, tmp_path):
    "A real SIGKILL during trial 1: the journal in the store has it RUNNING; the next run fails it and retries it."
    np.savez(tmp_path / "d.npz", x=tiny["x"], y=tiny["y"])
    folder = str(tmp_path / "study")
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), npz=str(tmp_path / "d.npz"), folder=folder, work=str(tmp_path / "w1"))
    (tmp_path / "w1").mkdir()
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, **{"FMNIST_HOME": str(tiny["home"])}})
    try:
        for line in p.stdout:
            if line.startswith("IN TRIAL 1"): break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    before = Store("models", folder).read_bytes(automl.JOURNAL).count(b"\n")  # what the killed process copied
    real, seen = trainer(tiny), []
    def counting(trial, params, report):
        seen.append(trial.number); return real(trial, params, report)
    study, out = search(Store("models", folder), tmp_path / "w2", counting, max_trials=3)
    assert before > 0 and [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert seen == [2, 3]  # trial 0 finished before the kill: not run again
    assert study.trials[2].params == study.trials[1].params and study.trials[2].user_attrs["retry_of"] == 1
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3  # the retry is the only repeat
    assert out["finished"] == 3


def test_the_winner_is_exported_like_the_custom_model(tiny, tmp_path):
    from fmnist_gcp.training import TrainConfig, load_model, predict, train_and_export
    s, folder = tiny["settings"], automl.study_store(tiny["settings"], "exp1")
    study, out = search(folder, tmp_path, trainer(tiny, folder), max_trials=2, name="exp1")
    assert out["finished"] == 2 and out["trials"] == {"complete": 2} and 0 < out["used_minutes"] * 60 < 120
    model, rec = automl.load_best(folder, {"mean": 0.286, "std": 0.353})
    assert rec["trial"] == out["best_trial"] == max(study.trials, key=lambda t: t.value).number
    from fmnist_gcp.training import validation_metrics  # the stored weights reproduce the best trial's value
    assert validation_metrics(model, tiny["x"][320:], tiny["y"][320:])["val_accuracy"] == pytest.approx(rec["value"])
    cfg = TrainConfig.from_dict(rec["config"])
    meta = automl.export_automl(s, model, cfg, rec["history"], tiny["x"][320:], tiny["y"][320:], {"mean": 0.286, "std": 0.353},
                                run_id="exp1", train_images=320, train_seconds=1.0, provenance={**out, "study": folder.uri(automl.JOURNAL)})
    assert meta["version"] == 1 and meta["name"] == automl.AUTOML_MODEL and meta["automl"]["best_trial"] == rec["trial"]
    assert automl.run_export(s, automl.AUTOML_MODEL, "exp1")["version"] == 1
    custom = train_and_export(TrainConfig(widths=(4, 8), convs=1, epochs=1, batch_size=64), s, run_id="c", log=lambda *a: None)
    assert set(custom) - {"automl"} <= set(meta)  # every key the custom model's metadata has
    assert meta["input"] == custom["input"] and meta["temperature_split"] == "val" and meta["temperature"] > 0
    stored = json.loads(open(os.path.join(meta["model_uri"], "metadata.json")).read())
    assert stored["automl"]["study"].endswith("studies/exp1/journal.log")
    served = load_model(os.path.join(meta["model_uri"], "model.keras"))  # raw 0-255 pixels in, probabilities out
    p = predict(served, tiny["x"][320:].astype(np.float32))
    assert p.shape == (160, 10) and np.allclose(p.sum(1), 1, atol=1e-4)
    assert float((p.argmax(1) == tiny["y"][320:]).mean()) == pytest.approx(meta["val_accuracy"], abs=1e-6)


def test_the_budget_counts_on_the_clock_it_is_given(tiny, tmp_path):
    "A clock a hundred times faster than the wall spends a 100 s budget in the first epoch (which takes over a wall second)."
    t0 = time.monotonic()
    clock = lambda: (time.monotonic() - t0) * 100
    folder = Store("models", str(tmp_path / "study"))
    study = automl.open_study(folder, "c", str(tmp_path), pruner=automl.make_pruner("none"), log=lambda *a: None)
    out = automl.run_search(study, trainer(tiny, folder, epochs=3, clock=clock), SPACE, 100.0, 5, log=lambda *a: None, clock=clock)
    assert out["trials"] == {"pruned": 1} and study.trials[0].user_attrs["stopped_by"] == "budget"
    assert study.trials[0].user_attrs["seconds"] >= 100 and study.trials[0].user_attrs["epoch_seconds"][0] >= 100
    assert out["used_minutes"] * 60 >= 100 and time.monotonic() - t0 < 100  # the budget was spent on the given clock


def test_the_recipe_starts_the_search_and_the_winner_plans_its_retraining(tiny, tmp_path):
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.training import TrainConfig
    folder = Store("models", str(tmp_path / "study"))
    study = automl.open_study(folder, "r", str(tmp_path), pruner=automl.make_pruner("none"), log=lambda *a: None)
    recipe = TrainConfig(widths=(8, 16), convs=2, lr=0.004, batch_size=64, augment=Augment(erase_prob=0.0))
    assert automl.start_from_recipe(study, SPACE, recipe)["widths"] == "8,16"
    out = automl.run_search(study, trainer(tiny, folder, epochs=2), SPACE, 120.0, 2, log=lambda *a: None)
    first = study.trials[0]
    assert first.params["widths"] == "8,16" and first.params["lr"] == 0.004 and first.user_attrs["from"] == "recipe"
    assert out["trials"] == {"complete": 2} and automl.winner(study).number == out["best_trial"]
    best = automl.winner(study)
    ep, share = best.user_attrs["epoch_seconds"], best.user_attrs["train_share"]
    assert len(ep) == 2 and len(share) == 2 and all(0 < s <= 1 for s in share) and best.user_attrs["train_images"] == 320
    image_s, start_s = automl.trial_costs(ep, 320, share)
    assert 0 < image_s * 320 <= ep[1] and start_s >= 0
    plenty = automl.refit_for_trial(best, 10**6, 480, 160, 3)  # a long budget: the epochs cap, all images
    assert (plenty["images"], plenty["epochs"]) == (480, 3) and "3 epoch(s) on 480" in plenty["why"]
    none = automl.refit_for_trial(best, 0.0, 480, 160, 3)  # nothing left: the trial's own model
    assert (none["images"], none["epochs"]) == (0, 0) and "its own model is exported" in none["why"]
    two = automl.refit_for_trial(best, start_s + 160 * image_s + 1000 * image_s, 480, 160, 3)  # 2.08 epochs' worth
    assert (two["images"], two["epochs"]) == (480, 2)
    some = automl.refit_for_trial(best, start_s + 160 * image_s + 1300 * image_s, 480, 160, 3)  # 2.7: 3 epochs on fewer images
    assert some["epochs"] == 3 and 420 < some["images"] < 480
    short = automl.refit_for_trial(best, start_s + 160 * image_s + 500 * image_s, 480, 160, 3)  # no more than the trial's 640
    assert short["images"] == 0
