"""`fmnist run` through real papermill: reports, manifest, declared outputs, refused parameters, a failing stage."""
import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, NBS, ROOT
from fmnist_gcp.pipeline.stages import STAGES

NAMES = [s.notebook for s in STAGES]
SECRET = "FAKEKEYMATERIAL0123456789"  # the private key of the fake credentials below: must never reach a report


def fmnist(*args, env, check=True):
    r = subprocess.run([str(BIN / "fmnist"), *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if check and r.returncode:
        raise AssertionError(f"fmnist {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    "One smoke run of every stage (shared by the checks below), with application-default credentials in the env."
    import os
    tmp = tmp_path_factory.mktemp("smoke")
    key = tmp / "key.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "acme-ml", "private_key_id": "kid-42",
                               "private_key": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n",
                               "client_email": "runner@acme-ml.iam.gserviceaccount.com", "client_id": "1"}))
    env = {**os.environ, "FMNIST_HOME": str(tmp / "home"), "FMNIST_RUNS_DIR": str(tmp / "runs"),
           "FMNIST_CACHE_DIR": str(tmp / "cache"), "FMNIST_BACKEND": "local", "GOOGLE_APPLICATION_CREDENTIALS": str(key),
           "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}
    for k in ("FMNIST_DATA_DIR", "FMNIST_DEV_BUCKET", "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"):
        env.pop(k, None)
    r = fmnist("run", "--profile", "smoke", "--run-id", "smoke1", "-p", "statistics.max_images=1500", env=env)
    run_dir = tmp / "runs/smoke1"
    return {"r": r, "env": env, "run_dir": run_dir, "home": tmp / "home", "key": key,
            "m": json.loads((run_dir / "run.json").read_text())}


def test_every_stage_runs_and_records_its_figures_under_its_short_name(smoke):
    r, m, run_dir = smoke["r"], smoke["m"], smoke["run_dir"]
    progress = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert [l.split()[:3] for l in progress] == [[f"[{i}/{len(NAMES)}]", s, "ok"] for i, s in enumerate(NAMES, 1)]
    assert f"report: {run_dir / 'index.html'}" in r.stdout
    assert m["status"] == "ok" and m["profile"] == "smoke" and [s["stage"] for s in m["stages"]] == NAMES
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in m["stages"])
    assert m["params"]["03_statistics"]["max_images"] == 1500  # the override reached the stage
    assert set(m["figures"]) == {s.name for s in STAGES}
    figs = m["figures"]
    assert figs["data"]["test"] == 10_000 and 0.2 < figs["statistics"]["pixel_mean"] < 0.4
    assert figs["statistics"]["n_train_images"] == 1500


def test_manifest_records_the_data_hashes_and_the_commit_it_ran(smoke):
    from fmnist_gcp.data import FILES, locate
    want = {}
    for key, (name, _) in FILES.items():  # hashed here from the files themselves, not from the package's table
        raw = locate(key, fetch=False)[1].read_bytes()
        want[name] = hashlib.sha256(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).hexdigest()
    assert smoke["m"]["data_sha256"] == want
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head) and smoke["m"]["git"]["sha"] == head
    assert {"numpy", "papermill", "python"} <= set(smoke["m"]["packages"])


def test_declared_outputs_exist_in_the_stores(smoke):
    figs = smoke["m"]["figures"]
    subst = {"<model>": figs["training"]["model"], "<version>": str(figs["training"]["version"]), "<run_id>": "smoke1"}
    missing = []
    for st in STAGES:
        asked = st.written(smoke["m"]["params"][st.notebook])
        for art in st.writes:
            store, rel = art.split(":", 1)
            for k, v in subst.items(): rel = rel.replace(k, v)
            if (smoke["home"] / store / rel).exists() != (art in asked): missing.append(f"{st.notebook}: {art}")
    assert missing == []  # every declared output the run asked for exists, and none it did not ask for


def test_reports_fold_code_and_keep_plots_and_secrets_out(smoke):
    run_dir = smoke["run_dir"]
    for s in NAMES:
        page = (run_dir / f"{s}.html").read_text()
        outside = re.sub(r"<details.*?</details>", "", page, flags=re.S)
        assert '<span class="nf">' not in outside, f"{s}: a function definition is visible outside a fold"
        assert not re.search(r"\b[IW]\d{4} |[IW] tensorflow/|oneDNN custom operations", page), f"{s}: TensorFlow log noise"
    for name, plots in (("02_exploration", 3), ("03_statistics", 2), ("08_evaluation", 4)):
        assert (run_dir / f"{name}.html").read_text().count("data:image/png;base64") >= plots, name
    everything = "".join(p.read_text(errors="replace") for p in run_dir.iterdir() if p.suffix in {".html", ".json", ".ipynb"})
    assert SECRET not in everything and "kid-42" not in everything and str(smoke["key"]) not in everything


def test_each_stage_report_opens_with_its_results(smoke):
    for s in NAMES:
        page = (smoke["run_dir"] / f"{s}.html").read_text()
        assert page.index(f"{s}: results") < page.index('<p class="fmnist-verdict">') < page.index("How this stage works</h2>") < page.index("<details"), s
    top = (smoke["run_dir"] / "08_evaluation.html").read_text().split("How this stage works")[0]
    assert re.search(r"test accuracy, auPrc 0\.\d{3}: (beats|does not beat) Vertex AutoML's 0\.972", top)
    assert "data:image/png;base64" in top  # its key plot


def test_run_page_opens_with_the_results_and_links_every_report(smoke):
    page = (smoke["run_dir"] / "index.html").read_text()
    top = page.split("<h2>Stages</h2>")[0]
    ev = smoke["m"]["figures"]["evaluation"]
    assert f"{ev['accuracy']:.2%}" in top and f"{ev['au_prc']:.4f}" in top and "0.972" in top and "93.90%" in top
    assert all(f"href='{s}.html'" in page for s in NAMES)
    assert smoke["m"]["data_sha256"]["t10k-images-idx3-ubyte"] not in top  # long values are folded below


def test_training_evaluation_registry_and_serving_hand_on(smoke):
    m, home = smoke["m"], smoke["home"]
    figs = m["figures"]
    tr, ev = figs["training"], figs["evaluation"]
    assert tr["version"] == 1 and len(tr["history"]) == tr["epochs"] >= 1 and tr["history"][-1]["loss"] > 0
    model_dir = home / "models" / tr["model"] / "1"
    assert json.loads((model_dir / "metadata.json").read_text())["run_id"] == "smoke1"
    assert ev["n"] == m["params"]["08_evaluation"]["max_images"] and 0 <= ev["accuracy"] <= 1
    for k in ("au_prc", "micro_ap", "macro_ap", "macro_roc_auc", "log_loss", "accuracy"):
        assert isinstance(ev[k], float), k
    assert figs["registry"]["version"] == 1 and figs["registry"]["promoted"] and figs["registry"]["champion"] == 1
    sv = figs["serving"]
    assert sv["version"] == 1 and 0 < sv["p50_ms"] <= sv["p99_ms"]
    assert sv["bad_requests_rejected"] == sv["bad_requests_sent"] > 0


def test_exports_agree_with_the_data_and_statistics_stages(smoke):
    import numpy as np
    from fmnist_gcp.config import Settings
    from fmnist_gcp.data import load_split, read_split
    from fmnist_gcp.preprocessing import load_tfrecords, read_preprocessing
    s = Settings.from_env({"FMNIST_HOME": str(smoke["home"])})
    ds, n = smoke["home"] / "datasets", smoke["m"]["params"]["04_preprocessing"]["max_images"]
    norm = json.loads((ds / "stats/normalisation.json").read_text())
    assert norm["mean"] == pytest.approx(smoke["m"]["figures"]["statistics"]["pixel_mean"]) and norm["run_id"] == "smoke1"
    pre_norm, aug = read_preprocessing(s)
    assert pre_norm == {"mean": norm["mean"], "std": norm["std"]}  # read from statistics, not recomputed
    x_all, y_all = load_split("train")
    tr, va = read_split(s)  # the split the data stage wrote
    for split, idx in (("train", tr[:n]), ("val", va[:n])):
        x, y, index = load_tfrecords(split, s)
        assert (index == idx).all() and (x == x_all[idx]).all() and (y == y_all[idx]).all()
    # only Vertex AutoML reads the PNG export: a run that does not train it writes none (test_png_export_when_asked)
    assert not smoke["m"]["params"]["04_preprocessing"]["export_png"] and not (ds / "exports/png").exists()
    x_test, _ = load_split("test", limit=n)
    lines = (ds / "exports/batch/test_instances.jsonl").read_text().splitlines()
    assert len(lines) == n and (np.array([json.loads(l) for l in lines]) == x_test).all()
    assert (np.load(ds / "exports/npz/fashion_mnist.npz")["index_val"] == va[:n]).all()


def test_png_export_when_asked_matches_the_split(fmnist_env):
    from fmnist_gcp.config import Settings
    from fmnist_gcp.data import read_split
    from fmnist_gcp.preprocessing import AUTOML_LABEL_RE, AUTOML_LABELS
    fmnist("run", "--profile", "smoke", "--run-id", "png1", "--stages", "01", "03", "04", "-p", "export_png=true", env=fmnist_env)
    s, ds = Settings.from_env(fmnist_env), Path(fmnist_env["FMNIST_HOME"]) / "datasets"
    m = json.loads((Path(fmnist_env["FMNIST_RUNS_DIR"]) / "png1" / "run.json").read_text())
    n, (tr, va) = m["params"]["04_preprocessing"]["max_images"], read_split(s)
    rows = (ds / "exports/automl/import.csv").read_text().splitlines()
    assert len(rows) == 3 * n == m["figures"]["preprocessing"]["automl_csv_rows"]
    for row in rows:
        ml_use, uri, label = row.split(",")
        assert ml_use in {"training", "validation", "test"} and AUTOML_LABEL_RE.match(label) and label in AUTOML_LABELS
        assert Path(uri).exists() and f"/{label}/" in uri
    train_rows = sorted(int(r.split(",")[1].rsplit("_", 1)[1][:5]) for r in rows if r.startswith("training,"))
    assert train_rows == sorted(int(i) for i in tr[:n])  # the data stage's split, by source index


def test_every_stage_records_its_cache_key_and_output_hashes(smoke):
    m = smoke["m"]
    assert m["process"]["pid"] > 0 and m["process"]["host"]
    for s in m["stages"]:
        c, st = s["cache"], next(x for x in STAGES if x.notebook == s["stage"])
        assert re.fullmatch(r"[0-9a-f]{64}", c["key"]), s["stage"]
        assert set(c["parts"]) == {"notebook", "params", "inputs", "data", "packages", "stores"} and "run_id" not in c["parts"]["params"]
        assert c["parts"]["data"] == m["data_sha256"] and c["parts"]["packages"]["python"] == m["packages"]["python"]
        assert len(c["parts"]["inputs"]) == len(st.reads) and all(c["parts"]["inputs"].values()), s["stage"]  # each input existed
        assert len(s["outputs"]) == len(st.writes) and all(h for a, h in s["outputs"].items() if a not in set(st.writes) - set(st.written(s["params"]))), s["stage"]  # each asked-for output was written
        first = "always runs: it " if st.side_effects and not st.writes else "no earlier run of this stage with a cache key"
        assert "reused_from" not in s and c["reason"].startswith(first), (s["stage"], c["reason"])
    assert "models:fmnist-cnn/1/" in m["stages"][NAMES.index("07_training")]["outputs"]


def test_runs_are_listed_and_compared_by_folder(smoke, tmp_path):
    import shutil
    env = {**smoke["env"], "FMNIST_RUNS_DIR": str(tmp_path)}
    shutil.copytree(smoke["run_dir"], tmp_path / "smoke1")
    shutil.copytree(smoke["run_dir"], tmp_path / "smoke1-copy")
    listing = fmnist("runs", env=env).stdout
    assert "smoke1-copy" in listing and re.search(r"^smoke1 .*03:ok", listing, re.M)
    table = fmnist("runs", "--compare", "smoke1", "smoke1-copy", env=env).stdout
    row = [l for l in table.splitlines() if l.startswith("evaluation.au_prc")]
    au = smoke["m"]["figures"]["evaluation"]["au_prc"]
    assert row and [float(v) for v in row[0].split()[1:]] == pytest.approx([au, au])


def test_bad_parameters_are_refused_before_anything_runs(fmnist_env):
    for args, needle in ((["-p", "learning_rate=0.1"], "learning_rate is not declared by any selected stage"),
                         (["-p", "01_data.max_images=5"], "01_data.max_images is not declared"),
                         (["-p", "seed=abc"], "not a valid int"),
                         (["-p", "run_id=other"], "set run_id with --run-id"),
                         (["-p", "03_statistics.profile=full"], "set profile with --profile")):
        r = fmnist("run", "--profile", "smoke", "--run-id", "bad", *args, env=fmnist_env, check=False)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
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
    page = (run_dir / "01_data.html").read_text()  # the report opens with the error
    assert page.index("01_data: failed") < page.index("val_fraction must be in") < page.index("How this stage works")


def test_plain_papermill_runs_a_stage_and_lists_its_parameters(fmnist_env, tmp_path):
    from fmnist_gcp.pipeline.params import declared_parameters
    out = tmp_path / "cfg.ipynb"
    r = subprocess.run([str(BIN / "papermill"), str(NBS / "00_config.ipynb"), str(out), "-p", "profile", "quick",
                        "--kernel", "python3"], env=fmnist_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    injected = [c for c in nbformat.read(out, 4).cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'profile = "quick"' in injected[0].source
    h = subprocess.run([str(BIN / "papermill"), "--help-notebook", str(NBS / "03_statistics.ipynb")],
                       capture_output=True, text=True)
    d = declared_parameters(NBS / "03_statistics.ipynb")["max_images"]
    assert h.returncode == 0 and f"max_images: int (default {d['default']})" in h.stdout and d["help"] in h.stdout


def test_every_stage_declares_run_id_and_profile_and_parses_fully():
    from fmnist_gcp.pipeline.params import declared_parameters
    for s in NAMES:
        d = declared_parameters(NBS / f"{s}.ipynb")  # raises if papermill would drop a line
        assert {"run_id", "profile"} <= set(d) and all(v["help"] for v in d.values()), s


def test_help_imports_nothing_heavy():
    import sys
    code = ("import sys, contextlib, io\nfrom fmnist_gcp import cli\n"
            "for argv in (['--help'], ['run', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: cli.main(argv)\n        except SystemExit: pass\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'google.cloud.aiplatform', 'papermill', 'numpy', 'pandas') if m in sys.modules]\n"
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
