"""`make kernel`: a user kernelspec for another JupyterLab (Vertex AI Workbench's), with this venv and the settings."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_make_kernel_registers_this_venv_with_the_fmnist_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_")}
    env.update(HOME=str(tmp_path / "home"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), FMNIST_BACKEND="vertex",
               FMNIST_PROJECT="acme-ml", FMNIST_REGION="europe-west4", FMNIST_MODELS_BUCKET="gs://acme ml/models 'v'")
    # -o: take the venv as installed (its stamp may be older than a pyproject.toml edited in this checkout)
    r = subprocess.run(["make", "-o", ".venv/.installed", "kernel"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    spec = json.loads((tmp_path / "jupyter/kernels/fmnist-gcp/kernel.json").read_text())
    assert spec["argv"][0] == str(ROOT / ".venv/bin/python")  # the project's venv, whatever python Jupyter runs in
    assert spec["argv"][-4:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["env"] == {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
                           "FMNIST_MODELS_BUCKET": "gs://acme ml/models 'v'"}  # exactly the FMNIST_* set, quoting kept
    assert spec["display_name"] == f"fmnist-gcp (Python {sys.version_info.major}.{sys.version_info.minor})"
    assert not (tmp_path / "home/.local/share/jupyter/kernels").exists()  # into JUPYTER_DATA_DIR, the user's place
