"""Shared fixtures: every test gets its own stores, runs directory and download cache."""
import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
