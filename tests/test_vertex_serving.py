"""Vertex AI Model Registry upload, endpoint deploy/undeploy/delete and batch prediction, on patched gapic clients."""
from unittest import mock

import pytest

from conftest import VERTEX_ENV
from fmnist_gcp.config import DEFAULT_MODEL, Settings
from fmnist_gcp.preprocessing import BATCH_JSONL_PATH
from fmnist_gcp.serving import ALL_CLASSES, SERVING_CONTRACT
LOC = "projects/acme-ml/locations/europe-west4"
MODEL = f"{LOC}/models/456"
ENDPOINT = f"{LOC}/endpoints/789"


@pytest.fixture
def gapic(monkeypatch, gcs_emulator, anonymous):
    "Anonymous credentials and fake model, endpoint and job service clients that record their requests."
    from google.cloud.aiplatform.compat.services import (endpoint_service_client, job_service_client,
                                                          model_service_client)
    from google.cloud.aiplatform.compat.types import (batch_prediction_job as gca_bpj, endpoint as gca_endpoint,
                                                       job_state, model as gca_model, model_service as gca_model_service)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    calls = {}
    def lro(result):
        op = mock.Mock(); op.result.return_value = result; op.operation.name = f"{LOC}/operations/1"
        return op
    def rec(name, result, dynamic=False):
        def f(self, *a, **kw):
            calls.setdefault(name, []).append(kw.get("request") or kw)
            return result(kw) if dynamic else result
        return f
    deployed = gca_endpoint.DeployedModel(id="1", model=MODEL)
    ep = gca_endpoint.Endpoint(name=ENDPOINT, display_name=f"{DEFAULT_MODEL}-endpoint", deployed_models=[deployed],
                               traffic_split={"1": 100})
    patches = {
        (model_service_client.ModelServiceClient, "upload_model"): rec("upload_model", lro(gca_model_service.UploadModelResponse(model=MODEL, model_version_id="1"))),
        (model_service_client.ModelServiceClient, "get_model"): rec("get_model", gca_model.Model(name=MODEL, display_name=DEFAULT_MODEL, version_id="1", supported_deployment_resources_types=[gca_model.Model.DeploymentResourcesType.DEDICATED_RESOURCES])),
        (endpoint_service_client.EndpointServiceClient, "create_endpoint"): rec("create_endpoint", lro(ep)),
        (endpoint_service_client.EndpointServiceClient, "get_endpoint"): rec("get_endpoint", ep),
        (endpoint_service_client.EndpointServiceClient, "deploy_model"): rec("deploy_model", lro(mock.Mock(deployed_model=deployed))),
        (endpoint_service_client.EndpointServiceClient, "undeploy_model"): rec("undeploy_model", lro(None)),
        (endpoint_service_client.EndpointServiceClient, "delete_endpoint"): rec("delete_endpoint", lro(None)),
        (job_service_client.JobServiceClient, "create_batch_prediction_job"): rec("create_batch_prediction_job",
            lambda kw: gca_bpj.BatchPredictionJob(kw["batch_prediction_job"], name=f"{LOC}/batchPredictionJobs/5",
                                                  state=job_state.JobState.JOB_STATE_PENDING), dynamic=True),
    }
    for (cls, name), fn in patches.items():
        monkeypatch.setattr(cls, name, fn)
    return calls


def registered(settings):
    "Versions 1 and 2 of the model in the models store, registered; v2 (the better) holds champion."
    from fmnist_gcp.registry import Registry, promote
    reg = Registry(settings, DEFAULT_MODEL)
    for v, au in ((1, 0.97), (2, 0.98)):
        st = reg.version_store(v)
        st.write_json("metadata.json", {"run_id": f"r{v}"}); st.write_json("evaluation.json", {"metrics": {"au_prc": au, "accuracy": 0.93}})
        reg.register(v)
    promote(reg, 2)
    return reg


def test_upload_request(gapic, tmp_path):
    from fmnist_gcp.registry import upload_to_vertex
    bucket = f"gs://fmnist-test/models-{tmp_path.name}"  # a fresh registry on every run of this test
    s = Settings.from_env({**VERTEX_ENV, "FMNIST_MODELS_BUCKET": bucket})
    registered(s)
    m = upload_to_vertex(s, DEFAULT_MODEL, 2, "europe-docker.pkg.dev/acme-ml/fmnist/serve:1", parent_model=MODEL)
    req = gapic["upload_model"][0]
    assert req.parent == LOC and req.parent_model == MODEL
    assert req.model.display_name == DEFAULT_MODEL and req.model.artifact_uri == f"{bucket}/{DEFAULT_MODEL}/2"
    assert list(req.model.version_aliases) == ["champion", "default"]  # the SDK adds "default" for is_default_version
    c = req.model.container_spec
    assert c.image_uri == "europe-docker.pkg.dev/acme-ml/fmnist/serve:1"
    assert (c.health_route, c.predict_route, [p.container_port for p in c.ports]) == (
        SERVING_CONTRACT.health_route, SERVING_CONTRACT.predict_route, [SERVING_CONTRACT.port])
    assert req.model.labels["fmnist-version"] == "2"
    assert m.resource_name == MODEL


def test_deploy_undeploy_delete_requests(gapic):
    from fmnist_gcp.vertex_serving import deploy, undeploy_and_delete
    s = Settings.from_env(VERTEX_ENV)
    ep = deploy(s, MODEL, machine_type="n1-standard-4", min_replicas=1, max_replicas=3)
    assert ep.resource_name == ENDPOINT
    created = gapic["create_endpoint"][0]
    assert created["parent"] == LOC and created["endpoint"].display_name == f"{DEFAULT_MODEL}-endpoint"
    d = gapic["deploy_model"][0]
    assert d["endpoint"] == ENDPOINT and d["deployed_model"].model == f"{MODEL}@1"  # the version the SDK resolved
    res = d["deployed_model"].dedicated_resources
    assert (res.machine_spec.machine_type, res.min_replica_count, res.max_replica_count) == ("n1-standard-4", 1, 3)
    assert d["deployed_model"].service_account == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    assert d["traffic_split"] == {"0": 100}
    undeploy_and_delete(s, ENDPOINT)
    assert gapic["undeploy_model"][0]["endpoint"] == ENDPOINT and gapic["undeploy_model"][0]["deployed_model_id"] == "1"
    assert gapic["delete_endpoint"][0]["name"] == ENDPOINT


def test_batch_prediction_request(gapic):
    from fmnist_gcp.vertex_serving import batch_predict
    s = Settings.from_env(VERTEX_ENV)
    job = batch_predict(s, MODEL)
    req = gapic["create_batch_prediction_job"][0]
    j = req["batch_prediction_job"]
    assert req["parent"] == LOC and j.model == f"{MODEL}@1"
    assert list(j.input_config.gcs_source.uris) == [f"gs://acme-ml-fmnist-datasets/{BATCH_JSONL_PATH}"]  # the preprocessing export
    assert j.input_config.instances_format == "jsonl" and j.output_config.predictions_format == "jsonl"
    assert j.output_config.gcs_destination.output_uri_prefix == "gs://acme-ml-fmnist-dev/batch-predictions"
    assert j.dedicated_resources.machine_spec.machine_type == "n1-standard-4" and j.dedicated_resources.max_replica_count == 2
    assert dict(j.model_parameters) == {k: float(v) for k, v in ALL_CLASSES.items()}  # protobuf sends doubles
    assert job.resource_name.endswith("/batchPredictionJobs/5")
