"""Run every authored notebook with nbdev's test runner (the cells, the inline tests and the report cells)."""
import pytest
import nbdev.test as nbt

from conftest import NBS

NOTEBOOKS = sorted(NBS.glob("*.ipynb"))


def test_notebooks_were_found():
    # nbdev-test exits 0 with "No files were eligible for testing"; an empty glob must fail here instead.
    names = {p.stem for p in NOTEBOOKS}
    assert {"00_config", "01_data", "02_exploration", "03_statistics", "10_pipeline", "10a_cli"} <= names, names


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, fmnist_env):
    ok, _ = nbt.test_nb(nb, showerr=True)
    assert ok, f"{nb.name} failed under nbdev's test runner (see the traceback above)"
