"""The Vertex AI CustomJob and Experiments requests: the real SDK on its REST transport against the fake Vertex REST
service (tests/vertex_fake.py), the HTTP requests checked; the Experiments run API (many metadata calls) on the SDK's
public functions, patched with their own signatures."""
import os
from unittest import mock

import pytest

from conftest import VERTEX_ENV
from fmnist_gcp.config import Settings
from vertex_fake import LOC


def created_jobs(fake) -> list[dict]:
    "The CustomJob bodies sent, in order."
    return [r.body for r in fake.calls("POST", f"/v1/{LOC}/customJobs")]


def test_custom_job_request_has_pools_image_args_env_and_output_dir(vertex_rest):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(vertex_rest.env)
    job = submit_custom_job(s, "europe-docker.pkg.dev/acme-ml/fmnist/train:1", ["--epochs", "30", "--widths", "64,128,256"],
                            display_name="fmnist-train-test", machine_type="n1-standard-16",
                            accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1, workers=2)
    (req,) = created_jobs(vertex_rest)
    assert req["displayName"] == "fmnist-train-test" and req["labels"]["app"] == "fmnist-gcp"
    spec = req["jobSpec"]
    assert spec["baseOutputDirectory"]["outputUriPrefix"] == "gs://acme-ml-fmnist-models/custom-jobs/fmnist-train-test"
    assert spec["serviceAccount"] == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    pools = spec["workerPoolSpecs"]
    assert [p["replicaCount"] for p in pools] == ["1", "2"]  # int64: a string in REST JSON
    from google.cloud.aiplatform_v1.types import AcceleratorType
    for p in pools:
        m = p["machineSpec"]  # the SDK asks for int-encoded enums ($alt=json;enum-encoding=int) and sends them so
        assert (m["machineType"], AcceleratorType(m["acceleratorType"]).name, m["acceleratorCount"]) == ("n1-standard-16", "NVIDIA_TESLA_T4", 1)
        c = p["containerSpec"]
        assert c["imageUri"] == "europe-docker.pkg.dev/acme-ml/fmnist/train:1"
        assert c["command"] == ["python", "-m", "fmnist_gcp.task"]
        assert c["args"] == ["--epochs", "30", "--widths", "64,128,256", "--datasets-uri", "gs://acme-ml-fmnist-datasets"]
        assert {e["name"]: e["value"] for e in c["env"]} == {  # the job's container reaches Vertex the way we do
            "FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
            "FMNIST_VERTEX_ENDPOINT": vertex_rest.host, "FMNIST_VERTEX_TRANSPORT": "rest"}
    assert job.resource_name == f"{LOC}/customJobs/{job.name}" and job.resource_name in vertex_rest.jobs
    assert job.state.name == "JOB_STATE_PENDING"  # queued at create; each read moves it on


def test_single_machine_job_has_one_pool(vertex_rest):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    submit_custom_job(Settings.from_env(vertex_rest.env), "img:1", ["--epochs", "1"])
    (req,) = created_jobs(vertex_rest)
    assert [p["replicaCount"] for p in req["jobSpec"]["workerPoolSpecs"]] == ["1"]
    assert req["displayName"].startswith("fmnist-train-") and "acceleratorCount" not in req["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]


def test_the_job_service_refuses_what_vertex_refuses(vertex_rest):
    "A CustomJob without a display name, pools, a machine type, an image, or with a chief pool of two replicas."
    from google.api_core.exceptions import BadRequest, NotFound
    from google.cloud.aiplatform_v1 import JobServiceClient, types
    from fmnist_gcp.cloud.vertex import vertex_client_options
    client = JobServiceClient(transport="rest", client_options=vertex_client_options(Settings.from_env(vertex_rest.env)))
    pool = {"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1, "container_spec": {"image_uri": "img:1"}}
    for job, needle in [
            ({"job_spec": {"worker_pool_specs": [pool]}}, r"custom_job\.display_name; Message: Required field is not set"),
            ({"display_name": "j", "job_spec": {}}, r"custom_job\.job_spec\.worker_pool_specs; Message: Required"),
            ({"display_name": "j", "job_spec": {"worker_pool_specs": [{**pool, "machine_spec": {}}]}}, r"\[0\]\.machine_spec\.machine_type"),
            ({"display_name": "j", "job_spec": {"worker_pool_specs": [{**pool, "container_spec": {"command": ["x"]}}]}}, r"container_spec\.image_uri"),
            ({"display_name": "j", "job_spec": {"worker_pool_specs": [{**pool, "replica_count": 2}]}}, "must be 1 for the primary")]:
        with pytest.raises(BadRequest, match=needle):
            client.create_custom_job(parent=LOC, custom_job=types.CustomJob(job))
    assert vertex_rest.jobs == {}  # nothing refused was made
    with pytest.raises(NotFound):
        client.get_custom_job(name=f"{LOC}/customJobs/404")
    made = client.create_custom_job(parent=LOC, custom_job=types.CustomJob({"display_name": "j", "job_spec": {"worker_pool_specs": [pool]}}))
    assert made.state.name == "JOB_STATE_QUEUED"
    client.cancel_custom_job(name=made.name)
    assert client.get_custom_job(name=made.name).state.name == "JOB_STATE_CANCELLED"
    with pytest.raises(BadRequest, match="Cannot cancel"):  # FAILED_PRECONDITION: the job has ended
        client.cancel_custom_job(name=made.name)


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


def metadata_calls(fake, start=0) -> list[tuple[str, str]]:
    "(method, what) of the metadata requests from `start` on: the path after the store, the id a create asked for."
    out = []
    for r in fake.requests[start:]:
        if "/metadataStores" not in r.path: continue
        what = r.path.split("/metadataStores", 1)[1].removeprefix("/default")
        ask = r.query.get("contextId") or r.query.get("metadataStoreId")
        out.append((r.method, f"{what}?{ask}" if ask else what))
    return out


def test_experiment_is_created_once_then_found(vertex_rest):
    from fmnist_gcp.cloud.jobs import ensure_experiment
    s = Settings.from_env(vertex_rest.env)
    exp, run = ensure_experiment(s, "fmnist-custom")
    assert run is None and exp.resource_name == f"{STORE}/contexts/fmnist-custom"
    creates = [w for m, w in metadata_calls(vertex_rest) if m == "POST"]
    assert creates == ["?default", "/contexts?fmnist-custom"]  # the default store, then the experiment
    assert vertex_rest.metadata[exp.resource_name]["schemaTitle"] == "system.Experiment"
    start = len(vertex_rest.requests)
    again, _ = ensure_experiment(s, "fmnist-custom")
    assert again.resource_name == exp.resource_name
    assert metadata_calls(vertex_rest, start) == [("GET", ""), ("GET", "/contexts/fmnist-custom")]  # found: nothing created


def test_named_run_is_created_in_its_experiment_then_found(vertex_rest):
    from fmnist_gcp.cloud.jobs import ensure_experiment
    s = Settings.from_env(vertex_rest.env)
    exp, run = ensure_experiment(s, "fmnist-custom", "20261126-093000_Quick")
    run_name = f"{STORE}/contexts/fmnist-custom-20261126-093000-quick"
    assert run.resource_name == run_name and run.name == "20261126-093000-quick"
    assert vertex_rest.metadata[run_name]["schemaTitle"] == "system.ExperimentRun"
    (added,) = vertex_rest.calls("POST", "*:addContextChildren")  # the run belongs to the experiment
    assert (added.path, added.body) == (f"/v1/{exp.resource_name}:addContextChildren", {"childContexts": [run_name]})
    start = len(vertex_rest.requests)
    _, again = ensure_experiment(s, "fmnist-custom", "20261126-093000_Quick")
    assert again.resource_name == run_name and not [r for r in vertex_rest.requests[start:] if r.method != "GET"]


def test_the_metadata_service_refuses_what_vertex_refuses(vertex_rest):
    "A context in a store that does not exist, a context id Vertex does not accept, a context made twice."
    from google.api_core.exceptions import BadRequest, Conflict, NotFound
    from google.cloud.aiplatform_v1 import MetadataServiceClient, types
    from fmnist_gcp.cloud.vertex import vertex_client_options
    client = MetadataServiceClient(transport="rest", client_options=vertex_client_options(Settings.from_env(vertex_rest.env)))
    with pytest.raises(NotFound):
        client.create_context(parent=STORE, context=types.Context(schema_title="system.Experiment"), context_id="e1")
    client.create_metadata_store(parent=LOC, metadata_store=types.MetadataStore(), metadata_store_id="default").result()
    with pytest.raises(BadRequest, match="context_id 'E_1' must match"):
        client.create_context(parent=STORE, context=types.Context(schema_title="system.Experiment"), context_id="E_1")
    client.create_context(parent=STORE, context=types.Context(schema_title="system.Experiment"), context_id="e1")
    with pytest.raises(Conflict):  # ALREADY_EXISTS is HTTP 409: api-core's Conflict over REST, not AlreadyExists
        client.create_context(parent=STORE, context=types.Context(schema_title="system.Experiment"), context_id="e1")
    with pytest.raises(NotFound):  # a child that does not exist
        client.add_context_children(context=f"{STORE}/contexts/e1", child_contexts=[f"{STORE}/contexts/nope"])


def test_experiment_needs_the_service_account(vertex_rest):
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import submit_custom_job
    env = {k: v for k, v in vertex_rest.env.items() if k != "FMNIST_SERVICE_ACCOUNT"}
    with pytest.raises(ConfigError, match="FMNIST_SERVICE_ACCOUNT"):
        submit_custom_job(Settings.from_env(env), "img:1", [], experiment="fmnist-custom")
    assert vertex_rest.requests == []  # refused before anything was sent


def test_submit_with_experiment_gets_or_creates_it_then_submits(vertex_rest):
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(vertex_rest.env)
    submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j1", experiment="fmnist-custom")
    submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j2", experiment="fmnist-custom",
                      experiment_run="r_2")
    exp = f"{STORE}/contexts/fmnist-custom"
    first, second = (j["jobSpec"] for j in created_jobs(vertex_rest))
    assert (first["experiment"], "experimentRun" in first) == (exp, False)  # Vertex makes the job's run
    assert (second["experiment"], second["experimentRun"]) == (exp, f"{exp}-r-2")
    assert first["serviceAccount"] == second["serviceAccount"] == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    assert first["workerPoolSpecs"][0]["containerSpec"]["args"][-2:] == ["--experiment", "fmnist-custom"]
    # a job with an experiment runs the task through the cloud wing's entry point, which brings the Vertex tracker
    assert first["workerPoolSpecs"][0]["containerSpec"]["command"] == ["python", "-m", "fmnist_gcp.cloud.jobs"]
    assert second["workerPoolSpecs"][0]["containerSpec"]["args"][-4:] == ["--experiment", "fmnist-custom",
                                                                          "--experiment-run", "r-2"]
    assert [w for m, w in metadata_calls(vertex_rest) if m == "POST" and "/contexts?" in w] == [
        "/contexts?fmnist-custom", "/contexts?fmnist-custom-r-2"]  # each made once
    # the experiment (and the run) exist before the job that names them is created
    posts = [r.path.rsplit("/", 1)[-1] for r in vertex_rest.requests if r.method == "POST"]
    assert posts.index("customJobs") > posts.index("contexts") and posts[-1] == "customJobs"


def test_task_resumes_the_run_vertex_made_for_the_job(anonymous, monkeypatch):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.jobs import JOB_RUN_VAR, ExperimentRun
    monkeypatch.setenv(JOB_RUN_VAR, f"{STORE}/contexts/fmnist-custom-j1-run")
    with mock.patch.multiple(aiplatform, init=mock.DEFAULT, start_run=mock.DEFAULT, autospec=True) as m:
        ExperimentRun(Settings.from_env(VERTEX_ENV), "fmnist-custom", "ignored")
    m["start_run"].assert_called_once_with("j1-run", resume=True)


def test_an_experiment_with_more_than_one_worker_is_refused_before_anything_is_sent(vertex_rest):
    "Vertex AI Experiments cannot be combined with multi-worker jobs (Google's docs): say so before submitting."
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env(vertex_rest.env)
    with pytest.raises(ConfigError) as e:
        submit_custom_job(s, "img:1", [], workers=2, experiment="fmnist-custom")
    msg = str(e.value)
    assert "\n" not in msg and "multi-worker" in msg and "3 replicas" in msg and "--experiment" in msg and "--workers 0" in msg
    assert vertex_rest.requests == []  # refused before anything was sent
    submit_custom_job(s, "img:1", [], workers=2)  # no experiment: multi-worker is fine
    assert created_jobs(vertex_rest)[0]["jobSpec"]["workerPoolSpecs"][1]["replicaCount"] == "2"


def test_a_private_endpoint_and_transport_reach_the_jobs_container(vertex_rest):
    "A private-endpoint user's job logs its experiment through the same endpoint, not the public one."
    from fmnist_gcp.cloud.jobs import submit_custom_job
    s = Settings.from_env({**vertex_rest.env, "FMNIST_VERTEX_ENDPOINT": f"https://{vertex_rest.host}/"})  # as a URL
    submit_custom_job(s, "img:1", ["--epochs", "1"], display_name="j", workers=1)
    for pool in created_jobs(vertex_rest)[0]["jobSpec"]["workerPoolSpecs"]:
        env = {e["name"]: e["value"] for e in pool["containerSpec"]["env"]}
        assert env["FMNIST_VERTEX_ENDPOINT"] == vertex_rest.host and env["FMNIST_VERTEX_TRANSPORT"] == "rest"
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
