"""Whose credentials carry a quota project: real google-auth credential objects (a service-account key made here with
`cryptography`, and user credentials as `gcloud auth application-default login` leaves them), found by the real
`google.auth.default` through GOOGLE_APPLICATION_CREDENTIALS. Nothing is refreshed, so nothing reaches Google.

On a service account the `x-goog-user-project` header needs `serviceusage.services.use`, which the runner lacks: every
storage, BigQuery and Feature Store call would answer 403. Only user credentials get the project as quota project."""
import json

import pytest

from conftest import VERTEX_ENV
from fmnist_gcp.config import Settings

PROJECT = VERTEX_ENV["FMNIST_PROJECT"]
RUNNER = VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture
def adc(monkeypatch, tmp_path):
    "Write an application-default credentials file of a kind and point GOOGLE_APPLICATION_CREDENTIALS at it."
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.delenv("GOOGLE_CLOUD_QUOTA_PROJECT", raising=False)
    from fmnist_gcp import config
    config._cached_credentials.cache_clear()
    def write(kind: str):
        info = ({"type": "service_account", "project_id": PROJECT, "private_key_id": "k1", "private_key": _rsa_pem(),
                 "client_email": RUNNER, "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}
                if kind == "service_account" else  # as `gcloud auth application-default login` writes it, no quota project
                {"type": "authorized_user", "client_id": "c.apps.googleusercontent.com", "client_secret": "s",
                 "refresh_token": "r"})
        path = tmp_path / f"{kind}.json"; path.write_text(json.dumps(info))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    yield write
    config._cached_credentials.cache_clear()


def _headers(credentials) -> dict:
    "The headers these credentials put on a request (a token set by hand: nothing is refreshed)."
    credentials.token, headers = "t", {}
    credentials.apply(headers)
    return headers


def test_a_service_account_gets_no_quota_project(adc):
    from google.oauth2 import service_account
    from fmnist_gcp.config import default_credentials, storage_options
    adc("service_account")
    creds = default_credentials(Settings.from_env(VERTEX_ENV))
    assert isinstance(creds, service_account.Credentials) and creds.service_account_email == RUNNER
    assert creds.quota_project_id is None and "x-goog-user-project" not in _headers(creds)
    assert storage_options(Settings.from_env(VERTEX_ENV))["token"].quota_project_id is None  # gcsfs, BigQuery's stores


def test_user_credentials_bill_the_project(adc):
    import google.oauth2.credentials
    from fmnist_gcp.config import default_credentials
    adc("authorized_user")
    creds = default_credentials(Settings.from_env(VERTEX_ENV))
    assert isinstance(creds, google.oauth2.credentials.Credentials)
    assert creds.quota_project_id == PROJECT and _headers(creds)["x-goog-user-project"] == PROJECT


def test_user_credentials_made_by_hand_get_the_quota_project_through_with_quota_project(monkeypatch):
    "google.auth.default patched to hand back `Credentials(token=...)`, as the brief's minimal case."
    import google.auth
    import google.oauth2.credentials
    from fmnist_gcp.config import default_credentials
    monkeypatch.setattr(google.auth, "default", lambda scopes=None, **kw: (google.oauth2.credentials.Credentials(token="t"), None))
    creds = default_credentials(Settings.from_env(VERTEX_ENV))
    assert creds.quota_project_id == PROJECT and _headers(creds)["x-goog-user-project"] == PROJECT


@pytest.mark.parametrize("kind, quota", [("service_account", None), ("authorized_user", PROJECT)])
def test_provisioning_clients_use_the_same_credentials(adc, kind, quota):
    "User ADC without a default project still reaches Service Usage: every client has the quota project (or none)."
    from fmnist_gcp.cloud.provision import Clients
    adc(kind)
    c = Clients.connect(Settings.from_env(VERTEX_ENV))
    gapic = {n: getattr(c, n)._transport._credentials for n in ("services", "iam", "projects", "registry")}
    assert {n: cr.quota_project_id for n, cr in {**gapic, "storage": c.storage._credentials}.items()} == dict.fromkeys(
        ("services", "iam", "projects", "registry", "storage"), quota)


@pytest.mark.parametrize("kind, quota", [("service_account", None), ("authorized_user", PROJECT)])
def test_cloud_build_client_uses_the_same_credentials(adc, monkeypatch, kind, quota):
    from google.cloud.devtools import cloudbuild_v1
    from fmnist_gcp.cloud.build import submit_build
    adc(kind)
    seen = []
    class Done:
        def result(self, *a, **k): return cloudbuild_v1.Build(id="b-1", status="SUCCESS")
    def create_build(self, request=None, **kw):
        seen.append(self._transport._credentials); return Done()
    monkeypatch.setattr(cloudbuild_v1.CloudBuildClient, "create_build", create_build)
    submit_build(Settings.from_env(VERTEX_ENV), {"steps": [{"name": "gcr.io/cloud-builders/docker", "args": ["version"]}]})
    (creds,) = seen
    assert creds.quota_project_id == quota
