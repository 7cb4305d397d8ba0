"""Run every authored notebook with nbdev's test runner (its cells, its inline tests and its report cells).

A stage notebook's report cells read what earlier stages wrote to the stores; before a notebook runs, the stages
it needs (the pipeline's `prerequisites`, from the stage records' reads and writes) run in the same stores, once
each, so any single notebook test passes on its own.
"""
import pytest
import nbdev.test as nbt

from conftest import NBS
from fmnist_gcp.pipeline.stages import STAGES, prerequisites

NOTEBOOKS = sorted(NBS.glob("*.ipynb"))
STAGE_NOTEBOOKS = [s.notebook for s in STAGES]
# library notebooks whose examples read a stage's outputs
LIBRARY_NEEDS = {"task": prerequisites("07_training")}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    "One set of stores for the module, and the notebooks already run in them."
    home = tmp_path_factory.mktemp("nb-stores")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMNIST_HOME", str(home / "home"))
        mp.setenv("FMNIST_RUNS_DIR", str(home / "runs"))
        mp.setenv("FMNIST_CACHE_DIR", str(home / "cache"))
        mp.setenv("FMNIST_BACKEND", "local")
        for k in ("FMNIST_DATA_DIR", "FMNIST_DEV_BUCKET", "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"):
            mp.delenv(k, raising=False)
        yield set()


def run_notebook(name: str, done: set) -> None:
    ok, _ = nbt.test_nb(NBS / f"{name}.ipynb", showerr=True)
    assert ok, f"{name}.ipynb failed under nbdev's test runner (see the traceback above)"
    done.add(name)


def test_every_stage_and_library_notebook_is_found():
    # nbdev-test exits 0 with "No files were eligible for testing"; a missing notebook must fail here instead.
    names = {p.stem for p in NOTEBOOKS}
    assert set(STAGE_NOTEBOOKS) <= names and {"task", "cli", "cloud_jobs", "cloud_endpoints", "cloud_automl", "cloud_features", "cloud_models", "cloud_vertex", "cloud_pipelines",
            *(f"pipeline_{m}" for m in ("stages", "params", "execute", "cache", "pages", "runs"))} <= names
    assert all(n in STAGE_NOTEBOOKS or not n[:2].isdigit() for n in names), "a numbered notebook is not a declared stage"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, stores):
    needs = prerequisites(nb.stem) if nb.stem in STAGE_NOTEBOOKS else LIBRARY_NEEDS.get(nb.stem, [])
    for name in needs:
        if name not in stores: run_notebook(name, stores)
    run_notebook(nb.stem, stores)
