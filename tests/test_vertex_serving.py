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


class FakeModelService:
    "A stateful fake of the model service: uploads make models and versions that get and list then return."
    def __init__(self):
        self.models: dict[str, list] = {}  # resource name -> versions (gapic Model), oldest first
        self.requests: list = []  # UploadModelRequest, in order

    def seed(self, name: str, display_name: str, labels: dict | None = None) -> None:
        "A model made elsewhere (version 1, dedicated resources)."
        from google.cloud.aiplatform.compat.types import model as gca_model
        self.models[name] = [gca_model.Model(name=name, display_name=display_name, version_id="1", labels=labels or {},
                                             version_aliases=["default"],
                                             supported_deployment_resources_types=[gca_model.Model.DeploymentResourcesType.DEDICATED_RESOURCES])]

    def patch(self, monkeypatch):
        from google.cloud.aiplatform.compat.services import model_service_client
        for n in ("upload_model", "get_model", "list_models"):
            monkeypatch.setattr(model_service_client.ModelServiceClient, n,
                                lambda client, request=None, _n=n, **kw: getattr(self, _n)(request, **kw))
        return self

    def upload_model(self, request, **kw):
        from google.cloud.aiplatform.compat.types import model as gca_model, model_service as gca_model_service
        self.requests.append(request)
        name = request.parent_model or f"{request.parent}/models/{len(self.models) + 100}"
        if request.parent_model: self.get_model(name=name)  # the parent must exist
        versions = self.models.setdefault(name, [])
        v = gca_model.Model(request.model, name=name, version_id=str(len(versions) + 1),
                            supported_deployment_resources_types=[gca_model.Model.DeploymentResourcesType.DEDICATED_RESOURCES])
        for old in versions:  # an alias names one version of a model
            old.version_aliases = [a for a in old.version_aliases if a not in v.version_aliases]
        versions.append(v)
        op = mock.Mock(); op.operation.name = f"{LOC}/operations/1"
        op.result.return_value = gca_model_service.UploadModelResponse(model=name, model_version_id=v.version_id)
        return op

    def get_model(self, request=None, *, name=None, **kw):
        from google.api_core import exceptions
        base, _, tag = name.partition("@")
        if base not in self.models: raise exceptions.NotFound(f"{name} not found")
        versions = self.models[base]
        found = [v for v in versions if v.version_id == tag or tag in v.version_aliases] if tag else \
                [v for v in versions if "default" in v.version_aliases] or versions[-1:]
        if not found: raise exceptions.NotFound(f"{name} not found")
        return found[0]

    def list_models(self, request=None, **kw):
        "Default versions whose display name and labels match the filter's `key=\"value\"` terms."
        import re
        from google.cloud.aiplatform.compat.types import model_service as gca_model_service
        request = gca_model_service.ListModelsRequest(request)
        assert request.parent == LOC
        terms = dict(re.findall(r'([\w.-]+)="([^"]*)"', request.filter))
        def matches(m):
            return all((m.display_name if k == "display_name" else m.labels.get(k.removeprefix("labels."))) == v
                       for k, v in terms.items())
        return [m for m in (self.get_model(name=n) for n in self.models) if matches(m)]


@pytest.fixture
def models(monkeypatch, anonymous):
    "A stateful fake model service holding MODEL (version 1, made elsewhere: no app label)."
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    fake = FakeModelService().patch(monkeypatch)
    fake.seed(MODEL, DEFAULT_MODEL)
    return fake


@pytest.fixture
def gapic(monkeypatch, gcs_emulator, models):
    "Anonymous credentials, the fake model service, and fake endpoint and job service clients that record their requests."
    from google.cloud.aiplatform.compat.services import endpoint_service_client, job_service_client
    from google.cloud.aiplatform.compat.types import batch_prediction_job as gca_bpj, endpoint as gca_endpoint, job_state
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
    calls["upload_model"] = models.requests  # the same list, filled as uploads happen
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
    assert m.resource_name == MODEL and m.version_id == "2"  # a second version of the model given


def test_uploads_are_versions_of_one_model(gapic, models, tmp_path):
    from fmnist_gcp.registry import upload_to_vertex, vertex_model
    s = Settings.from_env({**VERTEX_ENV, "FMNIST_MODELS_BUCKET": f"gs://fmnist-test/models-{tmp_path.name}"})
    registered(s)
    assert vertex_model(s, DEFAULT_MODEL) is None  # MODEL has the name but not our label: not ours
    first = upload_to_vertex(s, DEFAULT_MODEL, 1, "img:1")
    assert models.requests[-1].parent_model == "" and first.resource_name != MODEL  # the first upload creates it
    assert vertex_model(s, DEFAULT_MODEL) == first.resource_name  # list_models sees it
    second = upload_to_vertex(s, DEFAULT_MODEL, 2, "img:1")
    assert models.requests[-1].parent_model == first.resource_name  # a version under it, not a new model
    assert (second.resource_name, second.version_id) == (first.resource_name, "2")
    assert list(models.requests[0].model.version_aliases) == []  # v1: neither default nor champion any more
    assert sorted(models.get_model(name=f"{first.resource_name}@champion").version_aliases) == ["champion", "default"]
    assert models.get_model(name=f"{first.resource_name}@champion").version_id == "2"


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


def _json(message) -> dict:
    import json
    return json.loads(type(message).to_json(message, always_print_fields_with_no_presence=False))


def test_dry_run_requests_equal_what_is_sent(gapic):
    from fmnist_gcp.vertex_serving import batch_predict, batch_predict_request, deploy, deploy_request
    s = Settings.from_env(VERTEX_ENV)
    batch_predict(s, MODEL)
    sent = gapic["create_batch_prediction_job"][0]
    built = batch_predict_request(s, f"{MODEL}@1", display_name=f"{DEFAULT_MODEL}-batch")
    assert built["parent"] == sent["parent"]
    got = _json(sent["batch_prediction_job"])
    assert {k: got[k] for k in built["batchPredictionJob"]} == built["batchPredictionJob"]
    deploy(s, MODEL, endpoint=ENDPOINT, machine_type="n1-standard-4", max_replicas=3)
    d = gapic["deploy_model"][0]
    built = deploy_request(s, f"{MODEL}@1", ENDPOINT, machine_type="n1-standard-4", max_replicas=3)
    got = _json(d["deployed_model"])
    assert (d["endpoint"], dict(d["traffic_split"])) == (built["endpoint"], built["trafficSplit"])
    assert {k: got[k] for k in built["deployedModel"]} == built["deployedModel"]
