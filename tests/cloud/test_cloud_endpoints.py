"""Vertex AI Model Registry upload, endpoint deploy/undeploy/delete and batch prediction, on patched gapic clients."""
from unittest import mock

import pytest

from conftest import VERTEX_ENV
from fmnist_gcp.config import DEFAULT_MODEL, Settings
from fmnist_gcp.preprocessing import BATCH_JSONL_PATH
from fmnist_gcp.serving import ALL_CLASSES, SERVING_CONTRACT
from fakes import LOC, FakeEndpointService, FakeModelService
MODEL = f"{LOC}/models/456"
ENDPOINT = f"{LOC}/endpoints/789"


@pytest.fixture
def models(monkeypatch, anonymous):
    "A stateful fake model service holding MODEL (version 1, made elsewhere: no app label)."
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    fake = FakeModelService().patch(monkeypatch)
    fake.seed(MODEL, DEFAULT_MODEL)
    return fake


class Calls:
    "The requests sent, by method name: the endpoint fake's in order, the batch job creates, the model uploads."
    def __init__(self, endpoints, models):
        self.endpoints, self.models, self.other = endpoints, models, {}
    def __getitem__(self, name):
        if name == "upload_model": return self.models.requests
        return self.other.get(name) or [kw for n, kw in self.endpoints.calls if n == name]


@pytest.fixture
def gapic(monkeypatch, gcs_emulator, models):
    "Anonymous credentials, the stateful model and endpoint fakes, and a job service recording batch prediction jobs."
    from google.cloud.aiplatform.compat.services import job_service_client
    from google.cloud.aiplatform.compat.types import batch_prediction_job as gca_bpj, job_state
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    calls = Calls(FakeEndpointService(models).patch(monkeypatch), models)
    def create_batch(self, *a, **kw):
        calls.other.setdefault("create_batch_prediction_job", []).append(kw)
        return gca_bpj.BatchPredictionJob(kw["batch_prediction_job"], name=f"{LOC}/batchPredictionJobs/5",
                                          state=job_state.JobState.JOB_STATE_PENDING)
    monkeypatch.setattr(job_service_client.JobServiceClient, "create_batch_prediction_job", create_batch)
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
    from fmnist_gcp.cloud.models import upload_to_vertex
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
    from fmnist_gcp.cloud.models import upload_to_vertex, vertex_model
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
    from google.api_core.exceptions import NotFound
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.endpoints import deploy, undeploy_and_delete
    s = Settings.from_env(VERTEX_ENV)
    ep = deploy(s, MODEL, machine_type="n1-standard-4", min_replicas=1, max_replicas=3)
    assert ep.resource_name == ENDPOINT
    created = gapic["create_endpoint"][0]
    assert created["parent"] == LOC and created["endpoint"].display_name == f"{DEFAULT_MODEL}-endpoint"
    assert created["endpoint"].labels["app"] == "fmnist-gcp"
    d = gapic["deploy_model"][0]
    assert d["endpoint"] == ENDPOINT and d["deployed_model"].model == f"{MODEL}@1"  # the version the SDK resolved
    res = d["deployed_model"].dedicated_resources
    assert (res.machine_spec.machine_type, res.min_replica_count, res.max_replica_count) == ("n1-standard-4", 1, 3)
    assert d["deployed_model"].service_account == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    assert d["traffic_split"] == {"0": 100}
    deployed = aiplatform.Endpoint(ENDPOINT).list_models()  # a later get sees what deploy made
    assert [m.model for m in deployed] == [f"{MODEL}@1"]
    undeploy_and_delete(s, ENDPOINT)
    assert [u["deployed_model_id"] for u in gapic["undeploy_model"]] == [deployed[0].id]
    assert gapic["delete_endpoint"][0]["name"] == ENDPOINT
    with pytest.raises(NotFound):  # deleted: a later get does not find it
        aiplatform.Endpoint(ENDPOINT).list_models()


def test_deploying_a_version_that_does_not_exist_fails_before_an_endpoint_is_made(gapic, models):
    from google.api_core.exceptions import NotFound
    from fmnist_gcp.cloud.endpoints import deploy
    s = Settings.from_env(VERTEX_ENV)
    with pytest.raises(NotFound):
        deploy(s, f"{MODEL}@7")
    assert gapic["create_endpoint"] == [] and gapic["deploy_model"] == []  # looked up first: no endpoint left behind


def test_teardown_undeploys_before_it_deletes(gapic, models):
    "Vertex refuses to delete an endpoint that still holds a model: undeploy_and_delete sends the undeploys first."
    from google.api_core.exceptions import FailedPrecondition
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.endpoints import deploy, undeploy_and_delete
    s = Settings.from_env(VERTEX_ENV)
    ep = deploy(s, MODEL)
    with pytest.raises(FailedPrecondition):  # the fake's known-bad request: a delete while a model is deployed
        ep.delete()
    held = [m.id for m in aiplatform.Endpoint(ENDPOINT).list_models()]
    start = len(gapic.endpoints.calls)
    undeploy_and_delete(s, ENDPOINT)
    sent = [(n, kw.get("deployed_model_id") or kw.get("name")) for n, kw in gapic.endpoints.calls[start:]
            if n in ("undeploy_model", "delete_endpoint")]
    assert sent == [*(("undeploy_model", i) for i in held), ("delete_endpoint", ENDPOINT)]


def test_batch_prediction_request(gapic):
    from fmnist_gcp.cloud.endpoints import batch_predict
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
    from fmnist_gcp.cloud.endpoints import batch_predict, batch_predict_request, deploy, deploy_request
    s = Settings.from_env(VERTEX_ENV)
    batch_predict(s, MODEL)
    sent = gapic["create_batch_prediction_job"][0]
    built = batch_predict_request(s, f"{MODEL}@1", display_name=f"{DEFAULT_MODEL}-batch")
    assert built["parent"] == sent["parent"]
    got = _json(sent["batch_prediction_job"])
    assert {k: got[k] for k in built["batchPredictionJob"]} == built["batchPredictionJob"]
    deploy(s, MODEL)  # makes ENDPOINT
    deploy(s, MODEL, endpoint=ENDPOINT, machine_type="n1-standard-4", max_replicas=3)
    d = gapic["deploy_model"][1]
    built = deploy_request(s, f"{MODEL}@1", ENDPOINT, machine_type="n1-standard-4", max_replicas=3)
    got = _json(d["deployed_model"])
    assert (d["endpoint"], dict(d["traffic_split"])) == (built["endpoint"], built["trafficSplit"])
    assert {k: got[k] for k in built["deployedModel"]} == built["deployedModel"]


def test_the_endpoint_fake_refuses_what_vertex_refuses(gapic, models):
    "A deploy without resources, with resources the model does not support, or with traffic not summing to 100."
    from google.api_core.exceptions import InvalidArgument
    from google.cloud.aiplatform.compat.types import endpoint as gca_endpoint, machine_resources
    eps = FakeEndpointService(models)
    eps.endpoints[ENDPOINT] = gca_endpoint.Endpoint(name=ENDPOINT, display_name="e")
    dedicated = machine_resources.DedicatedResources(machine_spec={"machine_type": "n1-standard-2"}, min_replica_count=1)
    for dm, split, needle in [
            (gca_endpoint.DeployedModel(model=MODEL), None, "dedicated_resources or automatic_resources is required"),
            (gca_endpoint.DeployedModel(model=MODEL, automatic_resources={"min_replica_count": 1}), None, "does not support AUTOMATIC_RESOURCES"),
            (gca_endpoint.DeployedModel(model=MODEL, dedicated_resources=dedicated), {"0": 60}, "must sum to 100")]:
        with pytest.raises(InvalidArgument, match=needle):
            eps.deploy_model(endpoint=ENDPOINT, deployed_model=dm, traffic_split=split)
    assert eps.endpoints[ENDPOINT].deployed_models == []


def test_an_automl_model_is_deployed_on_automatic_resources(gapic, models):
    "AutoML image models support only automatic resources: the SDK must send those, not our custom container's machine."
    from fmnist_gcp.cloud.automl import deploy_automl
    automl = f"{LOC}/models/777"
    models.seed(automl, "fmnist-vertex-automl", resources="AUTOMATIC_RESOURCES")
    ep = deploy_automl(Settings.from_env(VERTEX_ENV), automl)
    (d,) = gapic["deploy_model"]
    assert d["endpoint"] == ep.resource_name and d["deployed_model"].model == f"{automl}@1"
    assert "dedicated_resources" not in d["deployed_model"] and d["deployed_model"].automatic_resources.min_replica_count == 1
    assert d["traffic_split"] == {"0": 100}


def test_automl_predictions_become_class_probabilities_in_label_order():
    "Vertex AutoML answers each instance with ids, displayNames and confidences, most confident first, at most maxPredictions."
    import base64, io
    import numpy as np
    from PIL import Image
    from fmnist_gcp.cloud.automl import predict_automl
    from fmnist_gcp.preprocessing import AUTOML_LABELS
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (230, 28, 28), dtype=np.uint8)
    truth = rng.dirichlet(np.ones(10), len(x))
    class AutoMLEndpoint:  # the shape of a real AutoML image classification answer (PredictResponse.predictions)
        def __init__(self): self.calls = []
        def predict(self, instances, parameters):
            self.calls.append((len(instances), dict(parameters)))
            preds = []
            for inst in instances:  # which image: decode the PNG the client sent
                img = np.array(Image.open(io.BytesIO(base64.b64decode(inst["content"]))))
                p = truth[next(i for i in range(len(x)) if (x[i] == img).all())]
                order = np.argsort(-p)[: int(parameters["maxPredictions"])]
                preds.append({"ids": [str(1000 + i) for i in order], "displayNames": [AUTOML_LABELS[i] for i in order],
                              "confidences": [float(p[i]) for i in order]})
            return type("R", (), {"predictions": preds})()
    ep = AutoMLEndpoint()
    probs = predict_automl(ep, x, batch=100)
    assert [n for n, _ in ep.calls] == [100, 100, 30] and all(p == {"maxPredictions": 10} for _, p in ep.calls)
    np.testing.assert_allclose(probs, truth)  # every class back in its own column
