"""The Google Cloud preflight: every problem with its fix, every check passing, buckets on gcp-storage-emulator, the
quota check on Google's patched client, and `fmnist run` stopping without credentials. No Google Cloud account here:
the gapic clients' methods are patched (autospec, so a wrong argument fails) with stateful fakes."""
import os
import re
import subprocess
from unittest import mock

import pytest

from conftest import BIN, ROOT, VERTEX_ENV
from iam_fake import FakeIam
from fmnist_gcp.config import Settings

NO_METADATA = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}  # google-auth never probes a metadata server
REPO = "projects/acme-ml/locations/europe-west4/repositories/fmnist"
SA = VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
CPUS, T4 = "CustomModelTrainingCPUsPerProjectPerRegion", "CustomModelTrainingT4GPUsPerProjectPerRegion"  # the real ids
A2, A100 = "CustomModelTrainingA2CPUsPerProjectPerRegion", "CustomModelTrainingA100GPUsPerProjectPerRegion"
METRICS = {CPUS: "custom_model_training_cpus", T4: "custom_model_training_nvidia_t4_gpus", A2: "custom_model_training_a2_cpus",
           A100: "custom_model_training_nvidia_a100_gpus"}  # quota id -> metric (aiplatform.googleapis.com/...)
VERTEX_QUOTAS = "projects/acme-ml/locations/global/services/aiplatform.googleapis.com"


@pytest.fixture(autouse=True)
def no_metadata(monkeypatch):
    for k, v in NO_METADATA.items(): monkeypatch.setenv(k, v)


@pytest.fixture
def emulator(gcs_emulator, monkeypatch):
    "The storage emulator with this test's three buckets created; yields the settings that name them."
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    tag = os.urandom(3).hex()
    buckets = {f"FMNIST_{r.upper()}_BUCKET": f"gs://pf-{tag}-{r}" for r in ("dev", "datasets", "models")}
    client = storage.Client(project="acme-ml", credentials=AnonymousCredentials())
    for uri in buckets.values(): client.create_bucket(uri[len("gs://"):])
    return Settings.from_env({**VERTEX_ENV, **buckets})


class Cloud:
    "What exists in the fake project: the patched gapic methods read it and record every request name."
    def __init__(self, **kw):
        self.projects = kw.get("projects", {"projects/acme-ml": "ACTIVE"})
        self.regions = kw.get("regions", {"europe-west4", "us-central1"})
        self.accounts = kw.get("accounts", {f"projects/acme-ml/serviceAccounts/{SA}"})
        self.repositories = kw.get("repositories", {REPO})
        self.quotas = kw.get("quotas", {})  # quota id -> {region: limit}
        self.iam = kw.get("iam") or FakeIam(projects=self.projects)  # testIamPermissions: everything held unless told
        self.names = []

    def patches(self):
        from google.api_core import exceptions as gexc
        from google.cloud import artifactregistry_v1, cloudquotas_v1 as cq, iam_admin_v1, resourcemanager_v3
        from google.cloud.aiplatform_v1.services.job_service import JobServiceClient
        def look(name, known):
            self.names.append(name)
            if name not in known: raise gexc.NotFound(f"{name} not found")
        def project(_, name, **kw):
            self.names.append(name)
            if name not in self.projects: raise gexc.PermissionDenied("the caller does not have permission")
            return resourcemanager_v3.Project(name=name, state=self.projects[name])
        def location(_, request, **kw):
            look(request["name"], {f"projects/acme-ml/locations/{r}" for r in self.regions})
        def quota(_, name, **kw):  # Cloud Quotas knows only the real ids (no NVIDIA in them)
            look(name, {f"{VERTEX_QUOTAS}/quotaInfos/{q}" for q in self.quotas})
        def quotas(_, request=None, *, parent=None, **kw):
            parent = parent or (request or {}).get("parent")
            self.names.append(parent)
            if not re.fullmatch(r"projects/[^/]+/locations/global/services/[^/]+", parent or ""):
                raise gexc.InvalidArgument(f"Invalid resource field value in the request: parent {parent!r}")
            if parent.split("/")[1] != "acme-ml": raise gexc.PermissionDenied("the caller does not have permission")
            # each metric also has a project-wide quota without a region dimension, as Vertex AI's list has
            return [cq.QuotaInfo(name=f"{parent}/quotaInfos/{q}{kind}", quota_id=f"{q}{kind}", metric=f"aiplatform.googleapis.com/{METRICS[q]}",
                                 quota_display_name="Custom model training", dimensions=dims,
                                 dimensions_infos=[cq.DimensionsInfo(dimensions={"region": r} if dims else {}, applicable_locations=[r],
                                                                     details=cq.QuotaDetails(value=v if dims else 10_000)) for r, v in limits.items()])
                    for q, limits in self.quotas.items() for kind, dims in (("", ["region"]), ("Global", []))]
        p = lambda cls, meth, fn: mock.patch.object(cls, meth, autospec=True, side_effect=fn)
        return [p(resourcemanager_v3.ProjectsClient, "get_project", project), p(JobServiceClient, "get_location", location),
                p(iam_admin_v1.IAMClient, "get_service_account", lambda _, name, **kw: look(name, self.accounts)),
                p(artifactregistry_v1.ArtifactRegistryClient, "get_repository", lambda _, name, **kw: look(name, self.repositories)),
                p(cq.CloudQuotasClient, "get_quota_info", quota), p(cq.CloudQuotasClient, "list_quota_infos", quotas),
                *self.iam.patches()]

    def __enter__(self):
        self._on = self.patches()
        for x in self._on: x.start()
        return self

    def __exit__(self, *exc):
        for x in self._on: x.stop()


def test_every_check_passes_on_a_ready_project(anonymous, emulator):
    from fmnist_gcp.cloud.preflight import preflight
    with Cloud(quotas={CPUS: {"europe-west4": 24}, T4: {"europe-west4": 2}}) as cloud:
        passed = preflight(emulator, machine_type="n1-standard-8", accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1, replicas=2)
    assert passed[:3] == ["application-default credentials found", "project acme-ml is active", "region europe-west4 serves Vertex AI"]
    assert [p for p in passed if p.startswith("gs://")] == [f"{u} exists and is writable" for u in emulator.buckets.values()]
    assert f"service account {SA} exists" in passed
    assert "image repository europe-west4-docker.pkg.dev/acme-ml/fmnist exists" in passed
    assert passed[-2:] == [f"quota {CPUS}: the job needs 16, the limit in europe-west4 is 24",
                           f"quota {T4}: the job needs 2, the limit in europe-west4 is 2"]
    assert cloud.names == ["projects/acme-ml", "projects/acme-ml/locations/europe-west4",
                           f"projects/acme-ml/serviceAccounts/{SA}", REPO, VERTEX_QUOTAS]  # one list of every Vertex quota


def test_every_problem_is_listed_with_its_fix(anonymous, gcs_emulator, monkeypatch):
    from fmnist_gcp.cloud.preflight import PreflightError, preflight
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    s = Settings.from_env({**VERTEX_ENV, "FMNIST_PROJECT": "gone-ml", "FMNIST_REGION": "mars-north1"})
    with Cloud(accounts=set(), repositories=set()), pytest.raises(PreflightError) as e:
        preflight(s)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("project gone-ml does not exist or these credentials cannot see it: check FMNIST_PROJECT")
    assert lines[1].startswith("region mars-north1 is not a Vertex AI region (or it could not be reached): set FMNIST_REGION")
    assert lines[2:5] == [f"bucket gs://gone-ml-fmnist-{r} does not exist: run `fmnist gcp apply` (or set the store's "
                          "FMNIST_<ROLE>_BUCKET)" for r in ("dev", "datasets", "models")]
    assert lines[5] == f"service account {SA} does not exist: run `fmnist gcp apply` (or set FMNIST_SERVICE_ACCOUNT to an existing one)"
    assert lines[6] == "image repository mars-north1-docker.pkg.dev/gone-ml/fmnist does not exist: run `fmnist gcp apply`"
    assert len(lines) == 7


def test_disabled_api_and_unwritable_bucket_name_their_fixes(anonymous, monkeypatch):
    from google.api_core import exceptions as gexc
    from fmnist_gcp.cloud import preflight as pf
    class Blob:
        def upload_from_string(self, data): raise gexc.Forbidden("fmnist@acme-ml does not have storage.objects.create access")
    class Storage:
        project = "acme-ml"
        def lookup_bucket(self, name): return mock.Mock(blob=lambda n: Blob())
        def bucket(self, name): return mock.Mock(test_iam_permissions=lambda permissions, **kw: list(permissions))
    disabled = gexc.PermissionDenied("Cloud Quotas API has not been used in project acme-ml before or it is disabled. "
                                     "reason: SERVICE_DISABLED")
    monkeypatch.setattr(pf.Clients, "storage", lambda self: Storage())
    with Cloud() as cloud, mock.patch.object(pf.Clients, "quotas", lambda self: mock.Mock(list_quota_infos=mock.Mock(side_effect=disabled))):
        with pytest.raises(pf.PreflightError) as e:
            pf.preflight(Settings.from_env(VERTEX_ENV), machine_type="n1-standard-4")
    lines = str(e.value).splitlines()
    assert lines[:3] == [f"bucket gs://acme-ml-fmnist-{r} is not writable with these credentials (fmnist@acme-ml does not have "
                         "storage.objects.create access): run `fmnist gcp apply` to grant roles/storage.objectUser on it, "
                         "or ask its owner" for r in ("dev", "datasets", "models")]
    assert lines[3] == ("Vertex AI quotas of project acme-ml: the cloudquotas.googleapis.com API is not enabled in project acme-ml: "
                        "run `gcloud services enable cloudquotas.googleapis.com --project acme-ml` (or `fmnist gcp apply`)")


def test_expired_credentials_say_log_in_again(monkeypatch):
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import RefreshError
    from fmnist_gcp.cloud import preflight as pf
    monkeypatch.setattr(google.auth, "default", lambda **k: (AnonymousCredentials(), "acme-ml"))
    def expired(self): raise RefreshError("Reauthentication is needed.")
    for name in ("projects", "vertex", "storage", "iam", "registry"): monkeypatch.setattr(pf.Clients, name, expired)
    with pytest.raises(pf.PreflightError) as e:
        pf.preflight(Settings.from_env(VERTEX_ENV))
    assert e.value.problems == ["application-default credentials could not be refreshed (Reauthentication is needed.): "
                                "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key)"]


def test_buckets_are_checked_by_writing_and_deleting_a_probe(anonymous, emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from fmnist_gcp.cloud.preflight import Clients, check_bucket
    client = Clients(emulator, AnonymousCredentials()).storage()
    uri = emulator.dev.uri("team")
    assert check_bucket(client, uri) == f"{uri} exists and is writable"
    assert list(client.list_blobs(uri[len("gs://"):].split("/")[0])) == []  # the probe is gone


def test_quota_shortfall_names_limit_need_regions_and_how_to_ask(anonymous):
    from fmnist_gcp.cloud.preflight import PreflightError, preflight
    s = Settings.from_env(VERTEX_ENV)
    quotas = {CPUS: {"europe-west4": 32}, T4: {"europe-west4": 0, "us-central1": 4, "asia-east1": 1}}
    with Cloud(quotas=quotas) as cloud, mock.patch("fmnist_gcp.cloud.preflight.check_bucket", lambda c, u: f"{u} ok"):
        with pytest.raises(PreflightError) as e:
            preflight(s, machine_type="n1-standard-8", accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1, replicas=2)
    assert "free" not in str(e.value)  # Cloud Quotas reports limits, not usage
    assert e.value.problems == [
        f"Vertex AI quota {T4} (Custom model training): the limit in europe-west4 is 0, the job needs 2; it is enough in: us-central1: "
        "request more at https://console.cloud.google.com/iam-admin/quotas?project=acme-ml&service=aiplatform.googleapis.com "
        f"or `gcloud beta quotas preferences create --service=aiplatform.googleapis.com --quota-id={T4} --preferred-value=2 "
        "--dimensions=region=europe-west4 --project=acme-ml --email=YOU`, or set FMNIST_REGION to a region where it is enough"]
    assert cloud.names[-1:] == [VERTEX_QUOTAS]


def test_a2_machines_need_a2_cpus_and_a100s(anonymous):
    from fmnist_gcp.cloud.preflight import preflight
    with Cloud(quotas={A2: {"europe-west4": -1}, A100: {"europe-west4": 1}}), \
         mock.patch("fmnist_gcp.cloud.preflight.check_bucket", lambda c, u: f"{u} ok"):
        passed = preflight(Settings.from_env(VERTEX_ENV), machine_type="a2-highgpu-1g",
                           accelerator_type="NVIDIA_TESLA_A100", accelerator_count=1)
    assert passed[-2:] == [f"quota {A2}: the job needs 12, the limit in europe-west4 is unlimited",
                           f"quota {A100}: the job needs 1, the limit in europe-west4 is 1"]


def test_the_quota_fake_refuses_what_cloud_quotas_refuses(anonymous):
    "The fake answers the bad requests the real API refuses: a parent outside locations/global, an id with NVIDIA in it."
    from google.api_core import exceptions as gexc
    from google.cloud import cloudquotas_v1 as cq
    from google.auth.credentials import AnonymousCredentials
    client = cq.CloudQuotasClient(credentials=AnonymousCredentials())
    with Cloud(quotas={T4: {"europe-west4": 1}}):
        with pytest.raises(gexc.InvalidArgument): client.list_quota_infos(parent="projects/acme-ml/locations/europe-west4/services/aiplatform.googleapis.com")
        with pytest.raises(gexc.NotFound): client.get_quota_info(name=f"{VERTEX_QUOTAS}/quotaInfos/CustomModelTrainingNVIDIAT4GPUsPerProjectPerRegion")
        assert {i.quota_id for i in client.list_quota_infos(parent=VERTEX_QUOTAS)} == {T4, f"{T4}Global"}


@pytest.mark.parametrize("machine, accelerator, count, ok", [
    ("a2-highgpu-2g", "NVIDIA_TESLA_A100", 2, True), ("a2-highgpu-2g", None, 0, False),
    ("a2-highgpu-2g", "NVIDIA_TESLA_T4", 2, False), ("a2-highgpu-2g", "NVIDIA_TESLA_A100", 1, False)])
def test_a2_machine_specs_carry_their_built_in_a100s_or_are_refused(machine, accelerator, count, ok):
    "Vertex AI refuses an a2-highgpu-Ng machine spec without its N A100s: so does the job spec, before anything is sent."
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import worker_pool_specs
    from fmnist_gcp.cloud.preflight import job_quotas
    if ok:
        (pool,) = worker_pool_specs("img:1", [], machine, accelerator, count)
        assert pool["machine_spec"] == {"machine_type": machine, "accelerator_type": "NVIDIA_TESLA_A100", "accelerator_count": 2}
        assert job_quotas(machine, accelerator, count) == {"aiplatform.googleapis.com/custom_model_training_a2_cpus": 24,
                                                           "aiplatform.googleapis.com/custom_model_training_nvidia_a100_gpus": 2}
    else:
        for f in (lambda: worker_pool_specs("img:1", [], machine, accelerator, count), lambda: job_quotas(machine, accelerator, count)):
            with pytest.raises(ConfigError, match="a2-highgpu-2g carries 2 NVIDIA_TESLA_A100: give --accelerator-type NVIDIA_TESLA_A100 --accelerator-count 2"):
                f()


def test_fmnist_run_without_credentials_stops_before_the_first_stage(fmnist_env, tmp_path):
    env = {**fmnist_env, **NO_METADATA, "FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
           "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing-key.json"), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    env.pop("STORAGE_EMULATOR_HOST", None)
    r = subprocess.run([str(BIN / "fmnist"), "run", "--profile", "smoke", "--stages", "00_config", "--run-id", "nocreds"],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "fmnist run: error: no application-default credentials: run `gcloud auth application-default login` (or set "
        f"GOOGLE_APPLICATION_CREDENTIALS to a service-account key); GOOGLE_APPLICATION_CREDENTIALS={tmp_path / 'missing-key.json'} names no file"]
    assert not (tmp_path / "runs" / "nocreds").exists()


def _closed_port() -> int:
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_google_out_of_reach_is_one_line_naming_what_could_not_be_reached(monkeypatch, transport):
    "A real client on a loopback port nobody listens on: api-core's RetryError (gRPC) or requests' ConnectionError (REST)."
    import time
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import resourcemanager_v3
    from fmnist_gcp.cloud import preflight as pf
    monkeypatch.setattr(pf, "REACH_TIMEOUT_S", 1.0, raising=False)
    host = f"127.0.0.1:{_closed_port()}"
    client = resourcemanager_v3.ProjectsClient(credentials=AnonymousCredentials(), transport=transport,
                                               client_options={"api_endpoint": host if transport == "grpc" else f"http://{host}"})
    t0 = time.monotonic()
    with pytest.raises(pf.PreflightError) as e: pf.check_project(client, "acme-ml")
    assert time.monotonic() - t0 < 15
    (line,) = e.value.problems
    assert line.startswith("project acme-ml: cloudresourcemanager.googleapis.com could not be reached"), line
    assert "check the network" in line and "--no-check" in line and "\n" not in line


def test_preflight_stops_at_the_first_check_that_cannot_reach_google(anonymous, monkeypatch):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import resourcemanager_v3
    from fmnist_gcp.cloud import preflight as pf
    monkeypatch.setattr(pf, "REACH_TIMEOUT_S", 1.0, raising=False)
    client = resourcemanager_v3.ProjectsClient(credentials=AnonymousCredentials(), client_options={"api_endpoint": f"127.0.0.1:{_closed_port()}"})
    monkeypatch.setattr(pf.Clients, "projects", lambda self: client)
    def not_after(self): raise AssertionError("a check ran after Google was found out of reach")
    for name in ("vertex", "storage", "iam", "registry", "quotas"): monkeypatch.setattr(pf.Clients, name, not_after)
    with pytest.raises(pf.PreflightError) as e:
        pf.preflight(Settings.from_env(VERTEX_ENV), machine_type="n1-standard-4")
    (line,) = e.value.problems
    assert line.startswith("project acme-ml: cloudresourcemanager.googleapis.com could not be reached")


def test_a_region_vertex_does_not_serve_is_named_over_rest_too(vertex_rest):
    "Over REST Google's 400 INVALID_ARGUMENT is api-core's BadRequest, not InvalidArgument: the region line, not a raw API error."
    import google.auth
    from fmnist_gcp.cloud.preflight import Clients, PreflightError, check_region
    s = Settings.from_env(vertex_rest.env)
    client = Clients(s, google.auth.default()[0]).vertex()
    assert type(client._transport).__name__ == "JobServiceRestTransport"
    assert check_region(client, "acme-ml", "europe-west4") == "region europe-west4 serves Vertex AI"
    with pytest.raises(PreflightError) as e:
        check_region(client, "acme-ml", "europe-west99")
    assert str(e.value).startswith("region europe-west99 is not a Vertex AI region") and "FMNIST_REGION" in str(e.value)
    assert [(r.path.split("/", 2)[2], r.status) for r in vertex_rest.requests] == [
        ("projects/acme-ml/locations/europe-west4", 200), ("projects/acme-ml/locations/europe-west99", 400)]
