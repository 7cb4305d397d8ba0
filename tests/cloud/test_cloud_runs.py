"""`fmnist run --on vertex` (fmnist_gcp.cloud.runs) where a notebook cell is not enough: the dry-run request with no
credentials and no network, the submitted request on a patched gapic client, the run folder through the GCS
emulator, and a whole run (submit, pending, running, succeeded, fetched reports) against a stateful fake of the Job
service. Nothing reaches Google: google.auth.default is patched and the metadata server is pointed at a closed port.
"""
import json
import os
import socket
import subprocess
import uuid
from unittest import mock

import pytest

# gcsfs reads this when it is imported (the Vertex SDK's tests here import it before the emulator's tests run); at
# collection, before any test, it keeps each emulated bucket's first access from a 60 s bucket-type lookup
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from conftest import BIN, ROOT  # noqa: E402
from fakes import FakeJobService, FakeMetadataService  # noqa: E402
from fmnist_gcp.config import Settings  # noqa: E402

DONE_WHEN = {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
             "FMNIST_SERVICE_ACCOUNT": "sa@acme-ml.iam.gserviceaccount.com"}  # the case (a valid project id)
IMAGE = "europe-west4-docker.pkg.dev/acme-ml/fmnist/train:t1"
NO_METADATA = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}


@pytest.fixture
def no_google(monkeypatch):
    "No credentials (google.auth.default raises) and no connection to anything but loopback."
    import google.auth
    for k, v in NO_METADATA.items(): monkeypatch.setenv(k, v)
    def no_credentials(*a, **k): raise AssertionError("google.auth.default was called: the dry run must need no credentials")
    monkeypatch.setattr(google.auth, "default", no_credentials)
    connect = socket.socket.connect
    def loopback_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a connection to {address} was attempted")
        return connect(self, address)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def anonymous_vertex(monkeypatch):
    "google.auth.default returns anonymous credentials (as in the Vertex SDK's tests); no metadata server."
    import google.auth
    from google.auth import credentials as auth_credentials
    for k, v in NO_METADATA.items(): monkeypatch.setenv(k, v)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (auth_credentials.AnonymousCredentials(), "acme-ml"))


@pytest.fixture
def emulated(gcs_emulator, monkeypatch, tmp_path):
    "Vertex settings whose three stores are fresh folders of the emulator's bucket, and a local runs folder."
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    prefix = f"gs://fmnist-test/{uuid.uuid4().hex[:8]}"
    return Settings.from_env({**DONE_WHEN, **{f"FMNIST_{r.upper()}_BUCKET": f"{prefix}/{r}" for r in ("dev", "datasets", "models")},
                              "FMNIST_RUNS_DIR": str(tmp_path / "runs")})


def _check_done_when(req: dict, image: str) -> None:
    "The issue's Done-when, on the REST JSON of the CreateCustomJobRequest."
    job = req["customJob"]["jobSpec"]
    c = job["workerPoolSpecs"][0]["containerSpec"]
    line = c["command"] + c["args"]
    assert c["imageUri"] == image and line[:2] == ["fmnist", "run"], line
    assert line[line.index("--profile") + 1] == "smoke" and line[line.index("--run-id") + 1] == "r1"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["FMNIST_BACKEND"] == "vertex"
    assert {env[f"FMNIST_{r}_BUCKET"] for r in ("DEV", "DATASETS", "MODELS")} == \
        {"gs://acme-ml-fmnist-dev", "gs://acme-ml-fmnist-datasets", "gs://acme-ml-fmnist-models"}
    assert job["serviceAccount"] == DONE_WHEN["FMNIST_SERVICE_ACCOUNT"]
    assert job["baseOutputDirectory"]["outputUriPrefix"] == "gs://acme-ml-fmnist-dev/runs/r1/"
    assert req["parent"] == "projects/acme-ml/locations/europe-west4"


def test_dry_run_request_needs_no_credentials_and_no_network(no_google):
    from fmnist_gcp.cloud.runs import custom_job_request, default_image, run_job_spec
    s = Settings.from_env(DONE_WHEN)
    image = default_image(s)  # this checkout's train image: a name, nothing looked up
    req = custom_job_request(s, run_job_spec(s, image, profile="smoke", run_id="r1"))
    _check_done_when(json.loads(json.dumps(req)), image)  # one JSON object
    assert image.startswith("europe-west4-docker.pkg.dev/acme-ml/fmnist/train:")


def test_gpu_run_names_the_accelerator_and_a_bad_one_fails_before_anything_is_sent(no_google):
    from fmnist_gcp.cloud.runs import custom_job_request, run_job_spec
    s = Settings.from_env(DONE_WHEN)
    spec = run_job_spec(s, IMAGE, profile="smoke", run_id="r1", machine_type="n1-standard-4",
                        accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1)
    machine = custom_job_request(s, spec)["customJob"]["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]
    assert machine == {"machineType": "n1-standard-4", "acceleratorType": "NVIDIA_TESLA_T4", "acceleratorCount": 1}
    with pytest.raises(ValueError, match="NVIDIA_TESLA_T4"):
        run_job_spec(s, IMAGE, profile="smoke", run_id="r1", accelerator_type="T4", accelerator_count=1)
    with pytest.raises(ValueError, match="unknown stage"):
        run_job_spec(s, IMAGE, profile="smoke", run_id="r1", stages=["no_such_stage"])


def test_fmnist_run_on_vertex_dry_run_prints_the_job(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FMNIST_", "GOOGLE_"))}, **DONE_WHEN, **NO_METADATA,
           "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json"), "CLOUDSDK_CONFIG": str(tmp_path)}  # no credentials
    r = subprocess.run([str(BIN / "fmnist"), "run", "--on", "vertex", "--dry-run", "--profile", "smoke", "--run-id", "r1",
                        "--image", IMAGE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_done_when(json.loads(r.stdout), IMAGE)


def test_submit_sends_the_dry_run_job_as_the_service_account(anonymous_vertex):
    from google.cloud.aiplatform.compat.types import custom_job
    from fmnist_gcp.cloud.runs import custom_job_request, run_job_spec, submit_run
    s = Settings.from_env(DONE_WHEN)
    spec = run_job_spec(s, IMAGE, profile="smoke", run_id="r1", stages=["data"], overrides=["01_data.val_fraction=0.1"])
    fake = FakeJobService()
    with fake.patch():
        job = submit_run(s, spec)
    assert job.resource_name == "projects/acme-ml/locations/europe-west4/customJobs/1"
    sent, want = fake.created[0], custom_job.CustomJob(spec)
    assert list(sent.job_spec.worker_pool_specs) == list(want.job_spec.worker_pool_specs)
    assert sent.job_spec.service_account == DONE_WHEN["FMNIST_SERVICE_ACCOUNT"]
    assert sent.job_spec.base_output_directory.output_uri_prefix == "gs://acme-ml-fmnist-dev/runs/r1/"
    assert sent.display_name == "fmnist-run-r1" and sent.labels["app"] == "fmnist-gcp"
    args = list(sent.job_spec.worker_pool_specs[0].container_spec.args)
    assert args[args.index("--stages") + 1] == "01_data" and "01_data.val_fraction=0.1" in args
    dry = custom_job_request(s, spec)["customJob"]
    assert dry["jobSpec"]["workerPoolSpecs"] == custom_job_request(s, custom_job.CustomJob.to_dict(sent))["customJob"]["jobSpec"]["workerPoolSpecs"]


def test_a_run_with_an_experiment_gets_or_creates_it_and_the_training_stage_logs_into_the_jobs_run(anonymous_vertex, monkeypatch):
    from fmnist_gcp.cloud.runs import run_job_spec, submit_run
    metadata = FakeMetadataService().patch(monkeypatch)
    s = Settings.from_env(DONE_WHEN)
    fake = FakeJobService()
    with fake.patch():
        for run_id in ("r1", "r2"):
            submit_run(s, run_job_spec(s, IMAGE, profile="smoke", run_id=run_id, experiment="fmnist-runs"), experiment="fmnist-runs")
    exp = "projects/acme-ml/locations/europe-west4/metadataStores/default/contexts/fmnist-runs"
    assert [n for c, n in metadata.calls if c == "create_context"] == [exp]  # created once, then found
    for sent in fake.created:
        assert (sent.job_spec.experiment, sent.job_spec.experiment_run) == (exp, "")  # Vertex makes each job's run
        assert "07_training.experiment=fmnist-runs" in list(sent.job_spec.worker_pool_specs[0].container_spec.args)


def test_wait_follows_the_job_pending_running_succeeded_and_a_missing_job_is_not_found(anonymous_vertex):
    from google.api_core.exceptions import NotFound
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.runs import run_job_spec, submit_run, wait_for_run
    s = Settings.from_env(DONE_WHEN)
    fake, log = FakeJobService(), []
    with fake.patch():
        job = submit_run(s, run_job_spec(s, IMAGE, profile="smoke", run_id="r1"))
        assert wait_for_run(job, 0, log.append) == "JOB_STATE_SUCCEEDED"
        with pytest.raises(NotFound):
            aiplatform.CustomJob.get("projects/acme-ml/locations/europe-west4/customJobs/99")
    assert [l.split()[1] for l in log] == ["pending", "running", "succeeded"] and fake.gets == 3


def _container_run(tmp_path, run_id: str, status: str = "ok"):
    "A run folder as `fmnist run` leaves it in the container."
    d = tmp_path / "container" / run_id
    (d / "tensorboard").mkdir(parents=True)
    (d / "01_data.html").write_text("<html>data report</html>")
    (d / "01_data.ipynb").write_text("{}")
    (d / "tensorboard" / "events.out").write_bytes(b"\x00\x01")
    (d / "index.html").write_text("<html>run page</html>")
    (d / "run.json").write_text(json.dumps({"run_id": run_id, "profile": "smoke", "status": status, "started": "2026-11-27T10:00:00",
                                            "stages": [{"stage": "01_data", "status": status}], "figures": {}}))
    return d


def test_upload_and_fetch_a_run_folder_through_the_gcs_emulator(emulated, tmp_path):
    from fmnist_gcp.cloud.runs import CloudRunError, fetch_run, upload_run
    from fmnist_gcp.pipeline.runs import list_runs
    made = _container_run(tmp_path, "r1")
    uris = upload_run(emulated, made)
    assert uris[-1] == emulated.dev.uri("runs/r1/run.json") and len(uris) == 5  # the manifest last
    assert emulated.dev.ls("runs/r1") == ["01_data.html", "01_data.ipynb", "index.html", "run.json", "tensorboard"]
    page = fetch_run(emulated, "r1", emulated.runs_dir)
    assert page.read_text() == "<html>run page</html>" and (page.parent / "tensorboard/events.out").read_bytes() == b"\x00\x01"
    assert [m["folder"] for m in list_runs(emulated.runs_dir)] == ["r1"]
    assert "r1/index.html" in (page.parent.parent / "index.html").read_text()
    with pytest.raises(CloudRunError, match="no run r2"):
        fetch_run(emulated, "r2", emulated.runs_dir)


def test_a_run_on_vertex_from_submit_to_fetched_reports(anonymous_vertex, emulated, tmp_path):
    from fmnist_gcp.cloud.runs import CloudRunError, run_job_spec, run_on_vertex, upload_run
    from fmnist_gcp.pipeline.runs import list_runs
    s = emulated
    spec = run_job_spec(s, IMAGE, profile="smoke", run_id="r1")
    fake, log = FakeJobService(on_end=lambda job: upload_run(s, _container_run(tmp_path, "r1"))), []
    with fake.patch():
        out = run_on_vertex(s, spec, "r1", poll_s=0, log=log.append)
        assert out["state"] == "JOB_STATE_SUCCEEDED" and out["report"].read_text() == "<html>run page</html>"
        assert [m["folder"] for m in list_runs(s.runs_dir)] == ["r1"]
        assert log[0] == "submitted projects/acme-ml/locations/europe-west4/customJobs/1"
        assert [l.split()[1] for l in log[1:]] == ["pending", "running", "succeeded"]
        with pytest.raises(CloudRunError, match="already exists"):  # the same run id again: refused before submitting
            run_on_vertex(s, spec, "r1", poll_s=0, log=log.append)
    assert len(fake.created) == 1


def test_a_failed_run_still_brings_its_reports_home_and_no_wait_returns_at_once(anonymous_vertex, emulated, tmp_path):
    from fmnist_gcp.cloud.runs import run_job_spec, run_on_vertex, upload_run
    s = emulated
    fake = FakeJobService(end="JOB_STATE_FAILED", on_end=lambda job: upload_run(s, _container_run(tmp_path, "r2", "failed")))
    with fake.patch():
        out = run_on_vertex(s, run_job_spec(s, IMAGE, profile="smoke", run_id="r2"), "r2", poll_s=0, log=lambda m: None)
        assert out["state"] == "JOB_STATE_FAILED" and json.loads((out["report"].parent / "run.json").read_text())["status"] == "failed"
        later = run_on_vertex(s, run_job_spec(s, IMAGE, profile="smoke", run_id="r3"), "r3", wait=False, log=lambda m: None)
    assert later["state"] is None and later["report"] is None and fake.gets == 3  # no get for the run not waited for


def test_a_run_with_an_experiment_on_more_than_one_replica_is_refused_before_anything_is_sent(anonymous_vertex, monkeypatch):
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.runs import run_job_spec, submit_run
    metadata = FakeMetadataService().patch(monkeypatch)
    s = Settings.from_env(DONE_WHEN)
    spec = run_job_spec(s, IMAGE, profile="smoke", run_id="r1", experiment="fmnist-runs")
    pools = spec["job_spec"]["worker_pool_specs"]
    pools.append({**pools[0], "replica_count": 1})  # a worker pool beside the chief
    fake = FakeJobService()
    with fake.patch(), pytest.raises(ConfigError, match="multi-worker"):
        submit_run(s, spec, experiment="fmnist-runs")
    assert fake.created == [] and not metadata.calls


def test_a_runs_container_gets_the_private_endpoint_and_transport_when_set(no_google):
    from fmnist_gcp.cloud.runs import run_job_spec
    private = {"FMNIST_VERTEX_ENDPOINT": "vertex-psc.p.googleapis.com:443", "FMNIST_VERTEX_TRANSPORT": "rest"}
    for extra, want in (({}, {}), (private, private)):
        spec = run_job_spec(Settings.from_env({**DONE_WHEN, **extra}), IMAGE, profile="smoke", run_id="r1")
        env = {e["name"]: e["value"] for e in spec["job_spec"]["worker_pool_specs"][0]["container_spec"]["env"]}
        assert {k: v for k, v in env.items() if k.startswith("FMNIST_VERTEX_")} == want
