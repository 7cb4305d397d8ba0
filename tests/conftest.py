"""Shared fixtures: every test gets its own stores, runs directory and download cache."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
BIN = Path(sys.executable).parent


@pytest.fixture
def fmnist_env(tmp_path, monkeypatch):
    "Point FMNIST_HOME, the runs directory and the download cache at a fresh temporary directory."
    env = {"FMNIST_HOME": str(tmp_path / "home"), "FMNIST_RUNS_DIR": str(tmp_path / "runs"),
           "FMNIST_CACHE_DIR": str(tmp_path / "cache"), "FMNIST_BACKEND": "local"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("FMNIST_DATA_DIR", "FMNIST_PROJECT", "FMNIST_REGION", "FMNIST_DEV_BUCKET",
              "FMNIST_DATASETS_BUCKET", "FMNIST_MODELS_BUCKET"):
        monkeypatch.delenv(k, raising=False)
    return {**os.environ, **env}


from fmnist_gcp.serving import free_port  # noqa: E402  (one helper for the package and the tests)

VERTEX_ENV = {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
              "FMNIST_SERVICE_ACCOUNT": "fmnist@acme-ml.iam.gserviceaccount.com"}


@pytest.fixture
def anonymous(monkeypatch):
    "google.auth.default returns anonymous credentials, as in the Vertex SDK's own tests."
    import google.auth
    from google.auth import credentials as auth_credentials
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (auth_credentials.AnonymousCredentials(), "acme-ml"))


@pytest.fixture(scope="session")
def gcs_emulator():
    "A gcp-storage-emulator on a free loopback port with bucket 'fmnist-test'; yields its URL."
    from gcp_storage_emulator.server import create_server
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="fmnist-test")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
