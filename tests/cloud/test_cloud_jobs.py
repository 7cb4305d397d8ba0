"""The Vertex AI CustomJob and Experiments requests, checked on the SDK's patched gapic clients (no GCP account here)."""
import os
from unittest import mock

import pytest

from conftest import VERTEX_ENV
from fakes import FakeMetadataService
from fmnist_gcp.config import Settings


def _create_custom_job_patch():
    from google.cloud.aiplatform.compat.services import job_service_client
    from google.cloud.aiplatform.compat.types import custom_job as gca_custom_job, job_state as gca_job_state
    def fake(self, parent, custom_job, timeout=None, **kw):
        out = gca_custom_job.CustomJob(custom_job)
        out.name = f"{parent}/customJobs/123"
        out.state = gca_job_state.JobState.JOB_STATE_PENDING
        return out
    return mock.patch.object(job_service_client.JobServiceClient, "create_custom_job", autospec=True, side_effect=fake)


def test_custom_job_request_has_pools_image_args_env_and_output_dir(anonymous):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(VERTEX_ENV)
    with _create_custom_job_patch() as create:
        job = submit_custom_job(s, "europe-docker.pkg.dev/acme-ml/fmnist/train:1", ["--epochs", "30", "--widths", "64,128,256"],
                                display_name="fmnist-train-test", machine_type="n1-standard-16",
                                accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1, workers=2)
    assert create.call_count == 1
    kwargs = create.call_args.kwargs
    assert kwargs["parent"] == "projects/acme-ml/locations/europe-west4"
    req = kwargs["custom_job"]
    assert req.display_name == "fmnist-train-test" and req.labels["app"] == "fmnist-gcp"
    spec = req.job_spec
    assert spec.base_output_directory.output_uri_prefix == "gs://acme-ml-fmnist-models/custom-jobs/fmnist-train-test"
    assert spec.service_account == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    pools = spec.worker_pool_specs
    assert [p.replica_count for p in pools] == [1, 2]
    for p in pools:
        assert p.machine_spec.machine_type == "n1-standard-16"
        assert p.machine_spec.accelerator_count == 1 and p.machine_spec.accelerator_type.name == "NVIDIA_TESLA_T4"
        c = p.container_spec
        assert c.image_uri == "europe-docker.pkg.dev/acme-ml/fmnist/train:1"
        assert list(c.command) == ["python", "-m", "fmnist_gcp.task"]
        assert list(c.args) == ["--epochs", "30", "--widths", "64,128,256", "--datasets-uri", "gs://acme-ml-fmnist-datasets"]
        assert {e.name: e.value for e in c.env} == {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml",
                                                      "FMNIST_REGION": "europe-west4"}
    assert job.resource_name == "projects/acme-ml/locations/europe-west4/customJobs/123"


def test_single_machine_job_has_one_pool(anonymous):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    with _create_custom_job_patch() as create:
        submit_custom_job(Settings.from_env(VERTEX_ENV), "img:1", ["--epochs", "1"])
    req = create.call_args.kwargs["custom_job"]
    assert [p.replica_count for p in req.job_spec.worker_pool_specs] == [1]
    assert req.display_name.startswith("fmnist-train-") and not req.job_spec.worker_pool_specs[0].machine_spec.accelerator_count


def test_experiment_run_calls_the_documented_sdk_api(anonymous):
    # Experiments go through many metadata-service calls; here the SDK's public functions are patched with their own
    # signatures (autospec: an argument the SDK does not take fails the call) and the arguments our wrapper passes
    # are checked (the gapic-level check is the CustomJob test above).
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.jobs import ExperimentRun
    names = ["init", "start_run", "log_params", "log_metrics", "log_time_series_metrics", "end_run"]
    with mock.patch.multiple(aiplatform, **{n: mock.DEFAULT for n in names}, autospec=True) as m:
        run = ExperimentRun(Settings.from_env(VERTEX_ENV), "fmnist-custom", "20261126-093000_Quick")
        run.log_params({"epochs": "12"})
        run.log_metrics({"val_accuracy": 0.93})
        run.log_metrics({"val_accuracy": 0.94}, step=3)  # no TensorBoard behind the experiment: the latest value
        run.end()
    m["init"].assert_called_once_with(project="acme-ml", location="europe-west4", experiment="fmnist-custom",
                                      experiment_tensorboard=False, api_endpoint="europe-west4-aiplatform.googleapis.com",
                                      api_transport="grpc")
    m["start_run"].assert_called_once_with("20261126-093000-quick", resume=False)
    m["log_params"].assert_called_once_with({"epochs": "12"})
    assert m["log_metrics"].call_args_list == [mock.call({"val_accuracy": 0.93}), mock.call({"val_accuracy": 0.94})]
    m["log_time_series_metrics"].assert_not_called()
    m["end_run"].assert_called_once_with()


def test_epochs_are_time_series_in_an_experiment_backed_by_a_tensorboard(anonymous):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.jobs import ExperimentRun
    tb = "projects/acme-ml/locations/europe-west4/tensorboards/7"
    env = {**VERTEX_ENV, "FMNIST_VERTEX_ENDPOINT": "vertex-psc.p.googleapis.com", "FMNIST_VERTEX_TRANSPORT": "rest"}
    names = ["init", "start_run", "log_metrics", "log_time_series_metrics", "end_run"]
    with mock.patch.multiple(aiplatform, **{n: mock.DEFAULT for n in names}, autospec=True) as m:
        run = ExperimentRun(Settings.from_env(env), "fmnist-custom", "r1", tensorboard=tb)
        for epoch in (1, 2): run.log_metrics({"val_accuracy": 0.9 + epoch / 100}, step=epoch)
        run.log_metrics({"temperature": 1.2})
    m["init"].assert_called_once_with(project="acme-ml", location="europe-west4", experiment="fmnist-custom",
                                      experiment_tensorboard=tb, api_endpoint="vertex-psc.p.googleapis.com",
                                      api_transport="rest")
    assert m["log_time_series_metrics"].call_args_list == [mock.call({"val_accuracy": 0.91}, step=1),
                                                           mock.call({"val_accuracy": 0.92}, step=2)]
    m["log_metrics"].assert_called_once_with({"temperature": 1.2})


STORE = "projects/acme-ml/locations/europe-west4/metadataStores/default"


@pytest.fixture
def metadata(monkeypatch, anonymous):
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    return FakeMetadataService().patch(monkeypatch)


def test_experiment_is_created_once_then_found(metadata):
    from fmnist_gcp.cloud.jobs import ensure_experiment
    s = Settings.from_env(VERTEX_ENV)
    exp, run = ensure_experiment(s, "fmnist-custom")
    assert run is None and exp.resource_name == f"{STORE}/contexts/fmnist-custom"
    created = [n for c, n in metadata.calls if c.startswith("create")]
    assert created == [STORE, f"{STORE}/contexts/fmnist-custom"]  # the default store, then the experiment
    assert metadata.contexts[exp.resource_name].schema_title == "system.Experiment"
    metadata.calls.clear()
    again, _ = ensure_experiment(s, "fmnist-custom")
    assert again.resource_name == exp.resource_name
    assert [c for c, _ in metadata.calls] == ["get_metadata_store", "get_context"]  # found: nothing created


def test_named_run_is_created_in_its_experiment_then_found(metadata):
    from fmnist_gcp.cloud.jobs import ensure_experiment
    s = Settings.from_env(VERTEX_ENV)
    exp, run = ensure_experiment(s, "fmnist-custom", "20261126-093000_Quick")
    run_name = f"{STORE}/contexts/fmnist-custom-20261126-093000-quick"
    assert run.resource_name == run_name and run.name == "20261126-093000-quick"
    assert metadata.contexts[run_name].schema_title == "system.ExperimentRun"
    assert metadata.children[exp.resource_name] == [run_name]  # the run belongs to the experiment
    metadata.calls.clear()
    _, again = ensure_experiment(s, "fmnist-custom", "20261126-093000_Quick")
    assert again.resource_name == run_name and not [c for c, _ in metadata.calls if c.startswith(("create", "add"))]


def test_experiment_needs_the_service_account(metadata):
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import submit_custom_job
    env = {k: v for k, v in VERTEX_ENV.items() if k != "FMNIST_SERVICE_ACCOUNT"}
    with _create_custom_job_patch() as create, pytest.raises(ConfigError, match="FMNIST_SERVICE_ACCOUNT"):
        submit_custom_job(Settings.from_env(env), "img:1", [], experiment="fmnist-custom")
    assert not create.called and not metadata.calls  # refused before anything was sent


def test_submit_with_experiment_gets_or_creates_it_then_submits(metadata):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(VERTEX_ENV)
    with _create_custom_job_patch() as create:
        submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j1", experiment="fmnist-custom")
        submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j2", experiment="fmnist-custom",
                          experiment_run="r_2")
    exp = f"{STORE}/contexts/fmnist-custom"
    first, second = (c.kwargs["custom_job"].job_spec for c in create.call_args_list)
    assert (first.experiment, first.experiment_run) == (exp, "")  # Vertex makes the job's run
    assert (second.experiment, second.experiment_run) == (exp, f"{exp}-r-2")
    assert first.service_account == second.service_account == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    assert list(first.worker_pool_specs[0].container_spec.args)[-2:] == ["--experiment", "fmnist-custom"]
    # a job with an experiment runs the task through the cloud wing's entry point, which brings the Vertex tracker
    assert list(first.worker_pool_specs[0].container_spec.command) == ["python", "-m", "fmnist_gcp.cloud.jobs"]
    assert list(second.worker_pool_specs[0].container_spec.args)[-4:] == ["--experiment", "fmnist-custom",
                                                                          "--experiment-run", "r-2"]
    assert [n for c, n in metadata.calls if c == "create_context"] == [exp, f"{exp}-r-2"]  # each made once


def test_task_resumes_the_run_vertex_made_for_the_job(anonymous, monkeypatch):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.jobs import JOB_RUN_VAR, ExperimentRun
    monkeypatch.setenv(JOB_RUN_VAR, f"{STORE}/contexts/fmnist-custom-j1-run")
    with mock.patch.multiple(aiplatform, init=mock.DEFAULT, start_run=mock.DEFAULT, autospec=True) as m:
        ExperimentRun(Settings.from_env(VERTEX_ENV), "fmnist-custom", "ignored")
    m["start_run"].assert_called_once_with("j1-run", resume=True)


def test_an_experiment_with_more_than_one_worker_is_refused_before_anything_is_sent(metadata):
    "Vertex AI Experiments cannot be combined with multi-worker jobs (Google's docs): say so before submitting."
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(VERTEX_ENV)
    with _create_custom_job_patch() as create, pytest.raises(ConfigError) as e:
        submit_custom_job(s, "img:1", [], workers=2, experiment="fmnist-custom")
    msg = str(e.value)
    assert "\n" not in msg and "multi-worker" in msg and "3 replicas" in msg and "--experiment" in msg and "--workers 0" in msg
    assert not create.called and not metadata.calls  # refused before anything was sent
    with _create_custom_job_patch() as create:
        submit_custom_job(s, "img:1", [], workers=2)  # no experiment: multi-worker is fine
    assert create.call_args.kwargs["custom_job"].job_spec.worker_pool_specs[1].replica_count == 2


PRIVATE = {"FMNIST_VERTEX_ENDPOINT": "https://vertex-psc.p.googleapis.com", "FMNIST_VERTEX_TRANSPORT": "rest"}


def test_a_private_endpoint_and_transport_reach_the_jobs_container(anonymous):
    "A private-endpoint user's job logs its experiment through the same endpoint, not the public one."
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env({**VERTEX_ENV, **PRIVATE})
    with _create_custom_job_patch() as create:
        submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j", workers=1)
    for pool in create.call_args.kwargs["custom_job"].job_spec.worker_pool_specs:
        env = {e.name: e.value for e in pool.container_spec.env}
        assert env["FMNIST_VERTEX_ENDPOINT"] == "vertex-psc.p.googleapis.com" and env["FMNIST_VERTEX_TRANSPORT"] == "rest"
        assert Settings.from_env(env).vertex_endpoint == s.vertex_endpoint  # the container reads back what was set


def test_submit_training_refuses_an_experiment_on_several_workers_before_the_preflight(tmp_path):
    # no credentials here: had the preflight run first, it would have failed on them instead
    import subprocess
    from conftest import BIN, VERTEX_ENV
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FMNIST_HOME": str(tmp_path / "home"), **VERTEX_ENV,
           "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1", "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json")}
    p = subprocess.run([str(BIN / "fmnist"), "submit-training", "--image", "img", "--workers", "2", "--experiment", "e",
                        "--", "--epochs", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith("cannot track a multi-worker job (3 replicas): drop --experiment or "
                                                      "train on one machine (--workers 0)"), p.stderr
