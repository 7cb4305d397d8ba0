"""Reproducible runs: the stage cache key, reuse and its verification, `fmnist rerun`, stopping with SIGINT/SIGTERM
and `fmnist run --resume`. Small stage subsets of the smoke profile, and stand-in notebooks for the signal tests."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, NBS, ROOT
from fmnist_gcp.pipeline import cache, params
from fmnist_gcp.config import Settings


def fmnist(*args, env, check=True):
    r = subprocess.run([str(BIN / "fmnist"), *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"fmnist {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def manifest(env, run_id):
    return json.loads((Path(env["FMNIST_RUNS_DIR"]) / run_id / "run.json").read_text())


def stages(m):
    return {s["stage"]: s for s in m["stages"]}


# ---------------------------------------------------------------------------------------------- the cache key
@pytest.fixture
def keyed(fmnist_env, tmp_path):
    "A statistics step, its settings and a copy of the notebooks to edit."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    shutil.copy(NBS / "03_statistics.ipynb", nbs)
    step = params.plan_run("smoke", ["statistics"], run_id="k1", nbs=nbs)[0]
    s = Settings.from_env()
    s.datasets.write_json("splits/train_val.json", {"train": [1, 2], "val": [3]})
    return {"step": step, "settings": s, "nbs": nbs, "data": {"train-images-idx3-ubyte": "a" * 64}}


def key(k, step=None, settings=None, data=None, figures=None):
    return cache.stage_key(step or k["step"], settings or k["settings"], data or k["data"], figures or {})


def test_each_part_of_the_key_changes_it_and_the_run_id_does_not(keyed, monkeypatch, tmp_path):
    k, base = keyed, key(keyed)
    elsewhere = Settings.from_env({"FMNIST_HOME": str(tmp_path / "elsewhere")})
    elsewhere.datasets.write_bytes("splits/train_val.json", k["settings"].datasets.read_bytes("splits/train_val.json"))
    assert set(base["parts"]) == {"notebook", "params", "inputs", "data", "packages", "stores"}
    assert "run_id" not in base["parts"]["params"]
    assert key(k, step={**k["step"], "params": {**k["step"]["params"], "run_id": "k2"}})["key"] == base["key"]
    changed = {"params": key(k, step={**k["step"], "params": {**k["step"]["params"], "max_images": 11}}),
               "data": key(k, data={"train-images-idx3-ubyte": "b" * 64}),
               "stores": key(k, settings=elsewhere)}
    nb = nbformat.read(k["nbs"] / "03_statistics.ipynb", 4)
    nb.cells[-1].source += "\n# an edit"
    nbformat.write(nb, k["nbs"] / "03_statistics.ipynb")
    changed["notebook"] = key(k)
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="an output")]  # outputs do not count
    nbformat.write(nb, k["nbs"] / "03_statistics.ipynb")
    assert key(k)["key"] == changed["notebook"]["key"]
    shutil.copy(NBS / "03_statistics.ipynb", k["nbs"])
    k["settings"].datasets.write_json("splits/train_val.json", {"train": [1], "val": [2, 3]})
    changed["inputs"] = key(k)
    shutil.copy(NBS / "03_statistics.ipynb", k["nbs"]); k["settings"].datasets.write_json("splits/train_val.json", {"train": [1, 2], "val": [3]})
    assert key(k)["key"] == base["key"]  # everything back as it was: the same key
    real = cache.import_versions
    monkeypatch.setattr(cache, "import_versions", lambda mods: {**real(mods), "numpy": "0.0.1"})
    changed["packages"] = key(k)
    for part, new in changed.items():
        assert new["key"] != base["key"], part
        assert [p for p in base["parts"] if base["parts"][p] != new["parts"][p]] == [part], part


def test_packages_in_the_key_are_what_the_notebook_imports():
    from importlib.metadata import version
    v = cache.import_versions(cache.notebook_imports(NBS / "07_training.ipynb"))
    assert v["numpy"] == version("numpy") and "fmnist_gcp/preprocessing.py" in v
    assert any(k.startswith("tensorflow") for k in v)  # imported inside config.import_tensorflow


# ---------------------------------------------------------------------------------------------- reuse
@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    "Four runs of config, data and statistics in one home: fresh, unchanged, one statistics parameter changed, split deleted."
    tmp = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "FMNIST_HOME": str(tmp / "home"), "FMNIST_RUNS_DIR": str(tmp / "runs"),
           "FMNIST_CACHE_DIR": str(tmp / "cache"), "FMNIST_BACKEND": "local"}
    for k in ("FMNIST_DATA_DIR", "FMNIST_DEV_BUCKET", "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"):
        env.pop(k, None)
    run = lambda rid, *more: fmnist("run", "--profile", "smoke", "--stages", "config", "data", "statistics",
                                    "--run-id", rid, "-p", "statistics.max_images=400", *more, env=env)
    out = {"c1": run("c1"), "c2": run("c2", "--explain-cache")}
    out["c3"] = fmnist("run", "--profile", "smoke", "--stages", "config", "data", "statistics", "--run-id", "c3",
                       "-p", "statistics.max_images=300", env=env)
    (tmp / "home/datasets/splits/train_val.json").unlink()
    out["c4"] = run("c4")
    out["c5"] = fmnist("run", "--profile", "smoke", "--stages", "config", "--run-id", "c5", "--no-cache", env=env)
    return {"env": env, "out": out, "m": {r: manifest(env, r) for r in out}, "tmp": tmp}


def test_an_unchanged_key_reuses_the_stage_and_copies_its_reports_and_figures(cached):
    m1, m2 = cached["m"]["c1"], cached["m"]["c2"]
    assert not any("reused_from" in s for s in m1["stages"])
    assert all(s["status"] == "ok" and s["reused_from"] == "c1" for s in m2["stages"])
    assert m2["figures"] == m1["figures"] and m2["figures"]["statistics"]["n_train_images"] == 400
    run_dir = Path(cached["env"]["FMNIST_RUNS_DIR"]) / "c2"
    for s in m2["stages"]:
        assert (run_dir / s["notebook"]).is_file() and (run_dir / s["report"]).is_file()
        assert s["cache"]["key"] == stages(m1)[s["stage"]]["cache"]["key"] and s["cache"]["reason"].startswith("key unchanged since c1")
    page = (run_dir / "index.html").read_text()
    assert "reused from <a href='../c1/index.html'>c1</a>" in page
    out = cached["out"]["c2"].stdout
    assert "(reused from c1)" in out and "3 of 3 stages reused" in out
    assert "params   {" in out and "input    datasets:splits/train_val.json" in out and "reused: key unchanged since c1" in out


def test_a_changed_parameter_reruns_that_stage_and_nothing_before_it(cached):
    s3 = stages(cached["m"]["c3"])
    assert s3["00_config"]["reused_from"] == "c1" and s3["01_data"]["reused_from"] == "c1"
    assert "reused_from" not in s3["03_statistics"] and s3["03_statistics"]["status"] == "ok"
    assert "max_images 400 -> 300" in s3["03_statistics"]["cache"]["reason"]
    assert cached["m"]["c3"]["figures"]["statistics"]["n_train_images"] == 300


def test_a_deleted_output_forces_the_stage_and_its_readers_to_run(cached):
    s4 = stages(cached["m"]["c4"])
    assert s4["00_config"]["reused_from"] == "c1"
    assert "reused_from" not in s4["01_data"] and "output datasets:splits/train_val.json is missing" in s4["01_data"]["cache"]["reason"]
    assert "reused_from" not in s4["03_statistics"] and "inputs: datasets:splits/train_val.json" in s4["03_statistics"]["cache"]["reason"]
    assert all(s["status"] == "ok" for s in s4.values())
    assert (cached["tmp"] / "home/datasets/splits/train_val.json").is_file()


def test_no_cache_executes_every_stage(cached):
    (s,) = cached["m"]["c5"]["stages"]
    assert s["cache"]["key"] == stages(cached["m"]["c1"])["00_config"]["cache"]["key"]  # reusable, but the cache is off
    assert "reused_from" not in s and s["cache"]["reason"] == "the cache is off (--no-cache)"


def test_rerun_reproduces_every_figure_and_shows_the_comparison(cached):
    env = cached["env"]
    r = fmnist("rerun", "c1", env=env)
    m = manifest(env, "c1-rerun")
    assert m["reproduces"] == "c1" and m["profile"] == "smoke" and m["status"] == "ok"
    assert m["params"]["03_statistics"] == {**cached["m"]["c1"]["params"]["03_statistics"], "run_id": "c1-rerun"}
    assert all("reused_from" not in s and s["cache"]["reason"].startswith("a rerun executes every stage") for s in m["stages"])
    rep = m["reproduction"]
    assert rep["of"] == "c1" and rep["identical"] and rep["differ"] == []
    assert {r["figure"] for r in rep["rows"]} >= {"statistics.pixel_mean", "statistics.n_train_images", "data.validation"}
    assert "other result figures identical" in r.stdout and "run c1-rerun reproduces c1" in r.stdout
    page = (Path(env["FMNIST_RUNS_DIR"]) / "c1-rerun/index.html").read_text()
    assert "Reproduces run <a href='../c1/index.html'>c1</a>" in page and "every result figure is identical" in page


# ---------------------------------------------------------------------------------------------- rerun checks
@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    "A config-only run made from a copy of the data in FMNIST_DATA_DIR (so that a test can tamper with it)."
    from fmnist_gcp.data import FILES, locate
    tmp = tmp_path_factory.mktemp("rerun")
    data = tmp / "data"
    data.mkdir()
    for k in FILES:
        shutil.copy(locate(k, fetch=False)[1], data)
    env = {**os.environ, "FMNIST_HOME": str(tmp / "home"), "FMNIST_RUNS_DIR": str(tmp / "runs"), "FMNIST_CACHE_DIR": str(tmp / "cache"),
           "FMNIST_BACKEND": "local", "FMNIST_DATA_DIR": str(data)}
    fmnist("run", "--profile", "smoke", "--stages", "config", "--run-id", "o1", env=env)
    return {"env": env, "data": data}


def test_rerun_warns_of_other_package_versions_and_refuses_them_with_strict(own_data):
    env = own_data["env"]
    p = Path(env["FMNIST_RUNS_DIR"]) / "o1/run.json"
    m = json.loads(p.read_text())
    shutil.copytree(p.parent, p.parent.parent / "o2")
    m2 = {**m, "run_id": "o2", "packages": {**m["packages"], "numpy": "0.0.1"}}
    (p.parent.parent / "o2/run.json").write_text(json.dumps(m2))
    strict = fmnist("rerun", "o2", "--strict", env=env, check=False)
    assert strict.returncode == 2 and "package numpy: 0.0.1 when o2 ran" in strict.stderr
    assert not (p.parent.parent / "o2-rerun").exists()
    loose = fmnist("rerun", "o2", env=env)
    assert "warning: package numpy: 0.0.1 when o2 ran" in loose.stderr and manifest(env, "o2-rerun")["status"] == "ok"


def test_rerun_exits_non_zero_when_a_figure_differs(own_data):
    env = own_data["env"]
    p = Path(env["FMNIST_RUNS_DIR"]) / "o1/run.json"
    shutil.copytree(p.parent, p.parent.parent / "o3")
    m = json.loads(p.read_text())
    m["run_id"], m["figures"]["config"]["backend"] = "o3", "elsewhere"
    (p.parent.parent / "o3/run.json").write_text(json.dumps(m))
    r = fmnist("rerun", "o3", env=env, check=False)
    assert r.returncode == 1 and "config.backend" in r.stderr and "differ although training was deterministic" in r.stderr
    assert manifest(env, "o3-rerun")["reproduction"]["differ"] == ["config.backend"]


def test_rerun_refuses_tampered_data_naming_the_file(own_data):
    env, data = own_data["env"], own_data["data"]
    f = data / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    f.write_bytes(gzip.compress(bytes(raw)))
    r = fmnist("rerun", "o1", "--run-id", "tampered", env=env, check=False)
    assert r.returncode == 2 and "cannot rerun o1" in r.stderr and str(f) in r.stderr
    assert not (Path(env["FMNIST_RUNS_DIR"]) / "tampered").exists()


# ---------------------------------------------------------------------------------------------- signals and resume
SLOW = """import os, pathlib, time
pathlib.Path(os.environ["FMNIST_TEST_PIDFILE"]).write_text(str(os.getpid()))
for _ in range(int(float(os.environ.get("FMNIST_TEST_SLEEP", "0")) * 10)): time.sleep(0.1)"""


def notebook(path, *cells):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "python3"}})
    nb.cells = [nbformat.v4.new_code_cell('run_id: str = "dev"  # run\nprofile: str = "smoke"  # profile', metadata={"tags": ["parameters"]}),
                *[nbformat.v4.new_code_cell(c) for c in cells]]
    nbformat.write(nb, path)


@pytest.fixture
def slow_env(fmnist_env, tmp_path):
    "Stand-in notebooks: 00_config finishes at once, 01_data writes its kernel's pid and sleeps FMNIST_TEST_SLEEP seconds."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    notebook(nbs / "00_config.ipynb", "print('config')")
    notebook(nbs / "01_data.ipynb", SLOW, "print('data done')")
    return {**fmnist_env, "FMNIST_NBS_DIR": str(nbs), "FMNIST_TEST_PIDFILE": str(tmp_path / "kernel.pid"), "FMNIST_TEST_SLEEP": "120"}


def alive(pid):
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1]


def start_and_stop(env, run_id, sig, group):
    p = subprocess.Popen([str(BIN / "fmnist"), "run", "--profile", "smoke", "--stages", "config", "data", "--run-id", run_id],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pidfile = Path(env["FMNIST_TEST_PIDFILE"])
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline and p.poll() is None: time.sleep(0.1)
    assert pidfile.exists(), p.communicate()
    kernel = int(pidfile.read_text())
    time.sleep(0.5)
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(p.pid, sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, time.monotonic() - t0, kernel, out, err


@pytest.mark.parametrize("sig,group,status", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_a_signal_stops_the_run_cleanly_and_resume_finishes_it(slow_env, sig, group, status):
    rc, seconds, kernel, out, err = start_and_stop(slow_env, "sig1", sig, group)
    assert rc == status and seconds < 20, (rc, seconds, out, err)
    assert f"interrupted by {signal.Signals(sig).name} in 01_data" in err and "fmnist run --resume sig1" in err
    for _ in range(50):
        if not alive(kernel): break
        time.sleep(0.1)
    assert not alive(kernel), "the stage's kernel outlived the run"
    m = manifest(slow_env, "sig1")
    assert m["status"] == "interrupted" and m["interrupted_by"] == signal.Signals(sig).name
    assert [(s["stage"], s["status"]) for s in m["stages"]] == [("00_config", "ok"), ("01_data", "interrupted")]
    run_dir = Path(slow_env["FMNIST_RUNS_DIR"]) / "sig1"
    partial = nbformat.read(run_dir / "01_data.ipynb", 4)
    assert any(o.get("ename") == "KeyboardInterrupt" for c in partial.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert (run_dir / "01_data.html").is_file()
    assert "<td class=interrupted>interrupted</td>" in (run_dir.parent / "index.html").read_text()
    assert "sig1" in fmnist("runs", env=slow_env).stdout.split("interrupted")[0].splitlines()[-1]

    r = fmnist("run", "--resume", "sig1", env={**slow_env, "FMNIST_TEST_SLEEP": "0"})
    m2 = manifest(slow_env, "sig1")
    assert m2["status"] == "ok" and [(s["stage"], s["status"]) for s in m2["stages"]] == [("00_config", "ok"), ("01_data", "ok")]
    assert stages(m2)["00_config"].get("kept") and stages(m2)["00_config"]["seconds"] == stages(m)["00_config"]["seconds"]
    assert "kept from the earlier attempt" in r.stdout and m2["resumed"][0]["was"] == "interrupted"
    assert "data done" in (run_dir / "01_data.html").read_text()


def test_resume_refuses_a_finished_run_and_options_of_its_own(slow_env):
    fmnist("run", "--profile", "smoke", "--stages", "config", "--run-id", "done", env=slow_env)
    r = fmnist("run", "--resume", "done", env=slow_env, check=False)
    assert r.returncode == 2 and "finished ok: nothing to resume" in r.stderr
    r = fmnist("run", "--resume", "done", "--profile", "quick", env=slow_env, check=False)
    assert r.returncode == 2 and "leave out --profile" in r.stderr


def test_a_run_whose_process_died_is_stale_and_can_be_resumed(slow_env):
    fmnist("run", "--profile", "smoke", "--stages", "config", "--run-id", "dead", env=slow_env)
    p = Path(slow_env["FMNIST_RUNS_DIR"]) / "dead/run.json"
    gone = subprocess.Popen(["true"]); gone.wait()
    m = json.loads(p.read_text())
    p.write_text(json.dumps({**m, "status": "running", "process": {**m["process"], "pid": gone.pid}}))
    assert "stale" in [l.split()[1] for l in fmnist("runs", env=slow_env).stdout.splitlines() if l.startswith("dead ")]
    r = fmnist("run", "--resume", "dead", env=slow_env)
    assert manifest(slow_env, "dead")["status"] == "ok" and "kept from the earlier attempt" in r.stdout
