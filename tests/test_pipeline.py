"""`fmnist run` through real papermill: reports, manifest, refused parameters, a failing stage, plain papermill."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, NBS, ROOT

STAGES = ["00_config", "01_data", "02_exploration", "03_statistics", "04_preprocessing", "07_training", "08_evaluation",
          "09_registry", "09a_serving"]


def fmnist(*args, env, check=True):
    r = subprocess.run([str(BIN / "fmnist"), *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"fmnist {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_smoke_run_writes_reports_and_manifest(fmnist_env):
    r = fmnist("run", "--profile", "smoke", "--run-id", "smoke1", "-p", "statistics.max_images=1500", env=fmnist_env)
    run_dir = Path(fmnist_env["FMNIST_RUNS_DIR"]) / "smoke1"
    progress = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert [l.split()[:3] for l in progress] == [[f"[{i}/{len(STAGES)}]", s, "ok"] for i, s in enumerate(STAGES, 1)]
    assert f"report: {run_dir / 'index.html'}" in r.stdout
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "ok" and m["profile"] == "smoke" and [s["stage"] for s in m["stages"]] == STAGES
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in m["stages"])
    assert m["params"]["03_statistics"]["max_images"] == 1500  # the override reached the stage
    from fmnist_gcp.data import FILES
    assert m["data_sha256"] == {name: sha for name, sha in FILES.values()}
    assert m["git"]["sha"] is None or len(m["git"]["sha"]) == 40
    assert {"numpy", "papermill", "python"} <= set(m["packages"])
    # figures each stage recorded, computed on the real data
    figs = m["figures"]
    assert figs["data"]["test"] == 10_000 and figs["data"]["validation"] == 6_000
    assert 0.2 < figs["statistics"]["pixel_mean"] < 0.4 and 0.25 < figs["statistics"]["pixel_std"] < 0.45
    assert figs["statistics"]["n_train_images"] == 1500
    # the HTML reports exist and carry the plots
    for s in STAGES:
        assert (run_dir / f"{s}.ipynb").exists()
        html = (run_dir / f"{s}.html").read_text()
        assert "<html" in html.lower()
    assert (run_dir / "02_exploration.html").read_text().count("data:image/png;base64") >= 3
    assert (run_dir / "03_statistics.html").read_text().count("data:image/png;base64") >= 2
    # the normalisation the next stage reads is in the datasets store
    norm = json.loads((Path(fmnist_env["FMNIST_HOME"]) / "datasets/stats/normalisation.json").read_text())
    assert norm["mean"] == pytest.approx(figs["statistics"]["pixel_mean"]) and norm["run_id"] == "smoke1"
    check_exports(Path(fmnist_env["FMNIST_HOME"]) / "datasets", norm, m["params"]["04_preprocessing"])
    # training and evaluation: a model version in the models store, evaluated on real test images
    tr, ev = figs["training"], figs["evaluation"]
    assert tr["version"] == 1 and len(tr["history"]) == tr["epochs"] >= 1 and tr["history"][-1]["loss"] > 0
    model_dir = Path(fmnist_env["FMNIST_HOME"]) / "models/fmnist-cnn/1"
    assert {"model.keras", "metadata.json", "model_card.md", "evaluation.json"} <= {p.name for p in model_dir.iterdir()}
    assert ev["n"] == m["params"]["08_evaluation"]["max_images"] and 0 <= ev["accuracy"] <= 1
    for k in ("au_prc", "micro_ap", "macro_ap", "macro_roc_auc", "log_loss", "accuracy"):
        assert isinstance(ev[k], float), k
    assert (run_dir / "08_evaluation.html").read_text().count("data:image/png;base64") >= 4
    # registry and serving: the run's model registered, served on loopback, bad requests refused
    assert figs["registry"]["version"] == 1 and figs["registry"]["promoted"] and figs["registry"]["champion"] == 1
    sv = figs["serving"]
    assert sv["version"] == "1" and sv["bad_requests_rejected"] == 6 and 0 < sv["p50_ms"] <= sv["p99_ms"]
    index = (Path(fmnist_env["FMNIST_RUNS_DIR"]) / "index.html").read_text()
    assert "smoke1/index.html" in index
    listing = fmnist("runs", env=fmnist_env).stdout
    assert "smoke1" in listing and "03:ok" in listing
    table = fmnist("runs", "--compare", "smoke1", env=fmnist_env).stdout
    row = [l for l in table.splitlines() if l.startswith("evaluation.au_prc")]
    assert row and float(row[0].split()[-1]) == pytest.approx(ev["au_prc"])


def check_exports(ds: Path, norm: dict, params: dict):
    "The preprocessing stage's exports agree with the real data and with the statistics stage."
    import numpy as np
    from fmnist_gcp.data import load_split, train_val_split
    from fmnist_gcp.preprocessing import AUTOML_LABEL_RE, AUTOML_LABELS, load_tfrecords, read_preprocessing
    n = params["max_images"]
    pre_norm, aug = read_preprocessing()
    assert pre_norm == {"mean": norm["mean"], "std": norm["std"]}  # read from statistics, not recomputed
    assert aug.max_shift == 2 and aug.flip
    x_all, y_all = load_split("train")
    tr, va = train_val_split(y_all, 0.1, 42)
    for split, idx in (("train", tr[:n]), ("val", va[:n])):
        x, y, index = load_tfrecords(split)
        assert (index == idx).all() and (x == x_all[idx]).all() and (y == y_all[idx]).all()
    manifest = json.loads((ds / "exports/tfrecord/manifest.json").read_text())
    assert [len(v["shards"]) for v in manifest["splits"].values()] == [params["shards"]] * 3
    rows = (ds / "exports/automl/import.csv").read_text().splitlines()
    assert len(rows) == 3 * n
    for row in rows:
        ml_use, uri, label = row.split(",")
        assert ml_use in {"training", "validation", "test"} and AUTOML_LABEL_RE.match(label) and label in AUTOML_LABELS
        assert Path(uri).exists() and f"/{label}/" in uri
    x_test, _ = load_split("test", limit=n)
    lines = (ds / "exports/batch/test_instances.jsonl").read_text().splitlines()
    assert len(lines) == n and (np.array([json.loads(l) for l in lines]) == x_test).all()
    npz = np.load(ds / "exports/npz/fashion_mnist.npz")
    assert (npz["x_test"] == x_test).all() and (npz["index_val"] == va[:n]).all()


def test_undeclared_parameter_is_refused_before_anything_runs(fmnist_env):
    r = fmnist("run", "--profile", "smoke", "--run-id", "bad1", "-p", "learning_rate=0.1", env=fmnist_env, check=False)
    assert r.returncode == 2 and "learning_rate is not declared by any selected stage" in r.stderr
    r = fmnist("run", "--profile", "smoke", "--run-id", "bad2", "-p", "01_data.max_images=5", env=fmnist_env, check=False)
    assert r.returncode == 2 and "01_data.max_images is not declared" in r.stderr
    r = fmnist("run", "--profile", "smoke", "--run-id", "bad3", "-p", "seed=abc", env=fmnist_env, check=False)
    assert r.returncode == 2 and "not a valid int" in r.stderr
    assert not Path(fmnist_env["FMNIST_RUNS_DIR"]).exists()


def test_failing_stage_marks_the_run_failed_and_keeps_the_error(fmnist_env):
    r = fmnist("run", "--profile", "smoke", "--run-id", "fail1", "--stages", "config", "data", "statistics",
               "-p", "01_data.val_fraction=1.5", env=fmnist_env, check=False)
    run_dir = Path(fmnist_env["FMNIST_RUNS_DIR"]) / "fail1"
    assert r.returncode == 1 and "run failed in 01_data" in r.stderr and str(run_dir / "01_data.html") in r.stderr
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "failed"
    assert [(s["stage"], s["status"]) for s in m["stages"]] == [("00_config", "ok"), ("01_data", "failed"),
                                                                ("03_statistics", "skipped")]
    assert "val_fraction must be in [0, 1)" in m["stages"][1]["error"]
    nb = nbformat.read(run_dir / "01_data.ipynb", 4)
    assert any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "val_fraction must be in" in (run_dir / "01_data.html").read_text()


def test_plain_papermill_runs_a_stage_and_lists_its_parameters(fmnist_env, tmp_path):
    out = tmp_path / "stats.ipynb"
    r = subprocess.run([str(BIN / "papermill"), str(NBS / "03_statistics.ipynb"), str(out), "-p", "profile", "smoke",
                        "-p", "max_images", "800", "--kernel", "python3"], env=fmnist_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    nb = nbformat.read(out, 4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "max_images = 800" in injected[0].source
    h = subprocess.run([str(BIN / "papermill"), "--help-notebook", str(NBS / "03_statistics.ipynb")],
                       capture_output=True, text=True)
    assert h.returncode == 0
    assert "max_images: int (default 3000)" in h.stdout and "0 for all" in h.stdout


def test_every_stage_declares_run_id_and_profile_and_parses_fully():
    from fmnist_gcp.pipeline import STAGES as stages, declared_parameters
    for s in stages:
        d = declared_parameters(NBS / f"{s}.ipynb")  # raises if papermill would drop a line
        assert {"run_id", "profile"} <= set(d) and all(v["help"] for v in d.values()), s


def test_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom fmnist_gcp import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n    except SystemExit: pass\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'google.cloud.aiplatform', 'papermill', 'numpy', 'pandas') if m in sys.modules]\n"
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
