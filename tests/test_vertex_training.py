"""The Vertex AI CustomJob and Experiments requests, checked on the SDK's patched gapic clients (no GCP account here)."""
from unittest import mock

import pytest

from conftest import VERTEX_ENV
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
    from fmnist_gcp.vertex_training import submit_custom_job
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
    from fmnist_gcp.vertex_training import submit_custom_job
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
    from fmnist_gcp.vertex_training import ExperimentRun
    names = ["init", "start_run", "log_params", "log_metrics", "end_run"]
    with mock.patch.multiple(aiplatform, **{n: mock.DEFAULT for n in names}, autospec=True) as m:
        run = ExperimentRun(Settings.from_env(VERTEX_ENV), "fmnist-custom", "20261126-093000_Quick")
        run.log_params({"epochs": "12"})
        run.log_metrics({"val_accuracy": 0.93})
        with pytest.raises(TypeError):  # a step would be dropped: Vertex keeps summary metrics only
            run.log_metrics({"val_accuracy": 0.94}, step=3)
        run.end()
    m["init"].assert_called_once_with(project="acme-ml", location="europe-west4", experiment="fmnist-custom",
                                      experiment_tensorboard=False)
    m["start_run"].assert_called_once_with("20261126-093000-quick", resume=False)
    m["log_params"].assert_called_once_with({"epochs": "12"})
    m["log_metrics"].assert_called_once_with({"val_accuracy": 0.93})
    m["end_run"].assert_called_once_with()
