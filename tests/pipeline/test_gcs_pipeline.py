"""The whole smoke pipeline with all three stores on `gs://`, against the GCS emulator (issue 8, point 4).

Every stage must read and write through the one storage layer: TensorBoard logs and checkpoints included, and no
stage may create a local folder named after a bucket (`gs:/<bucket>`). The backend stays `local` (nothing here has
Google credentials); only the stores are `gs://` URIs, which the settings allow. The run's own folder (reports,
run.json) is local, as on a laptop. The stages are shrunk with `-p` so the test stays a CI test.
"""
import json
import os
import secrets
import subprocess

import pytest

from conftest import BIN, ROOT
from fmnist_gcp.config import DEFAULT_MODEL, ROLES, Settings
from fmnist_gcp.pipeline.stages import STAGES

SHRINK = ["02_exploration.max_images=400", "02_exploration.embed_images=200", "03_statistics.max_images=500",
          "04_preprocessing.max_images=200", "07_training.max_train_images=400", "08_evaluation.max_images=400"]
SKIP_DIRS = {".venv", ".git", "node_modules"}  # too big to walk, and no stage writes there


def bucket_named_dirs(root) -> list[str]:
    "Folders under `root` named like a URI scheme (`gs:`), as `Path('gs://b').mkdir()` makes."
    found = []
    for d, dirs, _ in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        found += [os.path.join(d, x) for x in dirs if x.endswith(":")]
    return found


@pytest.fixture(scope="module")
def gcs_run(gcs_emulator, tmp_path_factory):
    "One shrunk smoke run with the dev, datasets and models stores in the emulator's bucket."
    tmp = tmp_path_factory.mktemp("gcs-run")
    prefix = f"gs://fmnist-test/pipeline-{secrets.token_hex(4)}"  # the emulator is shared by the session's tests
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "FMNIST_BACKEND": "local", "FMNIST_HOME": str(tmp / "home"), "FMNIST_RUNS_DIR": str(tmp / "runs"),
           "FMNIST_CACHE_DIR": str(tmp / "cache"), "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1",
           **{f"FMNIST_{r.upper()}_BUCKET": f"{prefix}/{r}" for r in ROLES}}
    for k in ("FMNIST_DATA_DIR", "GOOGLE_APPLICATION_CREDENTIALS"): env.pop(k, None)
    before = set(bucket_named_dirs(ROOT))
    args = [str(BIN / "fmnist"), "run", "--profile", "smoke", "--run-id", "gcs1"]
    for p in SHRINK: args += ["-p", p]
    r = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"fmnist run exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return {"r": r, "env": env, "tmp": tmp, "settings": Settings.from_env(env), "new_dirs": set(bucket_named_dirs(ROOT)) - before,
            "m": json.loads((tmp / "runs/gcs1/run.json").read_text())}


@pytest.fixture
def emulator_env(gcs_emulator, monkeypatch):
    "This process reads the emulator's bucket the way the run's stages did."
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def test_every_stage_runs_with_its_stores_on_gcs(gcs_run):
    m = gcs_run["m"]
    assert m["status"] == "ok" and [s["stage"] for s in m["stages"]] == [s.notebook for s in STAGES]
    assert all(s["status"] == "ok" for s in m["stages"]), m["stages"]
    # each stage's figures, recorded in the dev bucket by the stage's process, reached run.json (no stale listing)
    assert set(m["figures"]) == {s.name for s in STAGES}, sorted(m["figures"])
    assert all(gcs_run["settings"].buckets[r].startswith("gs://fmnist-test/") for r in ROLES)


def test_the_model_version_and_its_checkpoint_are_in_the_models_bucket(gcs_run, emulator_env):
    from fmnist_gcp.training import model_versions
    s, version = gcs_run["settings"], gcs_run["m"]["figures"]["training"]["version"]
    assert model_versions(s, DEFAULT_MODEL) == [version] == [1]
    assert {"model.keras", "metadata.json", "evaluation.json"} <= set(s.models.ls(f"{DEFAULT_MODEL}/{version}"))
    assert s.models.exists(f"{DEFAULT_MODEL}/registry.json")
    assert s.models.read_json(f"checkpoints/gcs1/{DEFAULT_MODEL}/state.json")["epoch"] >= 1


def test_tensorboard_event_files_are_in_the_dev_bucket(gcs_run, emulator_env):
    dev = gcs_run["settings"].dev
    events = [n for n in dev.ls(f"runs/gcs1/tensorboard/{DEFAULT_MODEL}") if n.startswith("events.out.tfevents")]
    assert len(events) == 1, dev.ls(f"runs/gcs1/tensorboard/{DEFAULT_MODEL}")
    assert len(dev.read_bytes(f"runs/gcs1/tensorboard/{DEFAULT_MODEL}/{events[0]}")) > 100  # more than the header
    assert dev.ls("runs/gcs1/figures"), "the stages' figures were not recorded in the dev bucket"


def test_no_local_folder_is_made_for_a_bucket(gcs_run):
    assert gcs_run["new_dirs"] == set(), f"folders named after a bucket: {sorted(gcs_run['new_dirs'])}"
    assert bucket_named_dirs(gcs_run["tmp"]) == []
    home = gcs_run["tmp"] / "home"
    # no store folder: only the local feature store's own state (Feast's SQLite online store and registry, which live
    # on this machine by design; their offline tables are in the datasets bucket)
    assert {p.name for p in home.iterdir()} <= {"feast"} if home.exists() else True, sorted(p.name for p in home.iterdir())
    assert not any((home / r).exists() for r in ROLES), "a local store was created although every store is on gs://"
