"""The import rules in pyproject.toml fail when someone breaks them.

`make test` runs `lint-imports` on the package as it is. These tests run it on a temporary copy of the package
with one throwaway import added, and expect the contract that forbids it to fail, naming the import.
"""
import os
import shutil
import subprocess

import pytest

from conftest import BIN, ROOT
from import_rules import forbidden_imports


def test_forbidden_imports_reads_lazy_and_module_level_imports():
    src = "import numpy as np\nfrom google.cloud import storage\ndef f():\n    import tensorflow as tf\n    from google.auth import default\n"
    assert forbidden_imports(src, ["google.cloud"]) == [(2, "google.cloud", "google.cloud")]
    assert forbidden_imports(src, ["tensorflow"]) == [(4, "tensorflow", "tensorflow")]
    assert forbidden_imports(src, ["tensorflow"], module_level_only=True) == []  # lazy: allowed
    assert forbidden_imports("try:\n    import keras\nexcept ImportError:\n    pass\n", ["keras"], module_level_only=True) == [(2, "keras", "keras")]
    assert forbidden_imports("import google.auth\nfrom google import auth\n", ["google.cloud"]) == []
    assert forbidden_imports("from google import cloud\n", ["google.cloud"]) == [(1, "google.cloud", "google.cloud")]


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    "The package, pyproject.toml and the contract type in a temporary folder, as lint-imports sees a checkout."
    root = tmp_path_factory.mktemp("lint")
    shutil.copytree(ROOT / "fmnist_gcp", root / "fmnist_gcp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    (root / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "import_rules.py", root / "tests")
    return root


def lint(root, module: str = "", line: str = ""):
    "lint-imports on `root` with `line` appended to `module` (restored afterwards): (exit code, output)."
    path = root / "fmnist_gcp" / f"{module.replace('.', '/')}.py" if module else None
    before = path.read_text() if path else None
    try:
        if path: path.write_text(before + "\n" + line + "\n")
        env = {**os.environ, "PYTHONPATH": str(root)}
        p = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        return p.returncode, " ".join((p.stdout + p.stderr).split())  # rich wraps long lines
    finally:
        if path: path.write_text(before)


def test_the_package_as_committed_keeps_every_contract(package_copy):
    rc, out = lint(package_copy)
    assert rc == 0, out
    assert "0 broken" in out


@pytest.mark.parametrize("module, line, expect", [
    ("data", "from fmnist_gcp import training", "fmnist_gcp.data is not allowed to import fmnist_gcp.training"),
    ("training", "def f():\n    from fmnist_gcp.cloud import jobs", "fmnist_gcp.training is not allowed to import fmnist_gcp.cloud"),
    ("pipeline.stages", "def f():\n    from fmnist_gcp.pipeline import runs", "fmnist_gcp.pipeline.stages is not allowed to import fmnist_gcp.pipeline.runs"),
    ("features", "def f():\n    from google.cloud import bigquery", "fmnist_gcp.features imports google.cloud"),
    ("statistics", "import tensorflow as tf", "fmnist_gcp.statistics imports tensorflow at module level"),
])
def test_a_forbidden_import_breaks_its_contract(package_copy, module, line, expect):
    rc, out = lint(package_copy, module, line)
    assert rc != 0 and expect in out, out


def test_a_lazy_tensorflow_import_outside_training_is_allowed(package_copy):
    rc, out = lint(package_copy, "statistics", "def f():\n    import tensorflow as tf")
    assert rc == 0, out
