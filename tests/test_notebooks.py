"""Run every authored notebook with nbdev's test runner (the cells, the inline tests and the report cells).

The notebooks share one set of stores for the session and run in file order, as in a pipeline run: a stage's report
cells read what the stages before it wrote (04_preprocessing reads 03_statistics' normalisation, 07_training reads
04's TFRecords, 08_evaluation evaluates 07's model).
"""
import pytest
import nbdev.test as nbt

from conftest import NBS

NOTEBOOKS = sorted(NBS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("nb-stores")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMNIST_HOME", str(home / "home"))
        mp.setenv("FMNIST_RUNS_DIR", str(home / "runs"))
        mp.setenv("FMNIST_CACHE_DIR", str(home / "cache"))
        mp.setenv("FMNIST_BACKEND", "local")
        for k in ("FMNIST_DATA_DIR", "FMNIST_DEV_BUCKET", "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"):
            mp.delenv(k, raising=False)
        yield home


def test_notebooks_were_found():
    # nbdev-test exits 0 with "No files were eligible for testing"; an empty glob must fail here instead.
    names = {p.stem for p in NOTEBOOKS}
    assert {"00_config", "01_data", "02_exploration", "03_statistics", "04_preprocessing", "07_training", "task",
            "vertex_training", "08_evaluation", "pipeline", "cli"} <= names, names


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, shared_env):
    ok, _ = nbt.test_nb(nb, showerr=True)
    assert ok, f"{nb.name} failed under nbdev's test runner (see the traceback above)"
