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


@pytest.fixture
def vertex_rest(tmp_path, monkeypatch):
    """The fake Vertex AI REST service (tests/vertex_fake.py) on a free loopback port, and the environment that points
    the SDK at it over REST: FMNIST_VERTEX_ENDPOINT/TRANSPORT, its certificate in REQUESTS_CA_BUNDLE, a service-account
    key made here (token_uri: the fake's) in GOOGLE_APPLICATION_CREDENTIALS, no metadata server. `fake.env` holds the
    Vertex settings' variables; after the test, no request may have met a method the fake does not model (501)."""
    from vertex_fake import VertexFake
    fake = VertexFake(tmp_path / "vertex-fake").start()
    fake.env = {**VERTEX_ENV, "FMNIST_VERTEX_ENDPOINT": fake.host, "FMNIST_VERTEX_TRANSPORT": "rest"}
    for k, v in {**fake.env, "REQUESTS_CA_BUNDLE": str(fake.cert), "GOOGLE_APPLICATION_CREDENTIALS": str(fake.key_file),
                 "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG", "GOOGLE_API_USE_CLIENT_CERTIFICATE"):
        monkeypatch.delenv(k, raising=False)
    from google.cloud.aiplatform import initializer  # the SDK keeps the first credentials it found: find this key's
    monkeypatch.setattr(initializer.global_config, "_credentials", None)
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.unmodelled(), f"requests the Vertex fake does not model (501): {fake.unmodelled()}"
