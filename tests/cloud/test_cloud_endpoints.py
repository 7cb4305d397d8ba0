"""Vertex AI Model Registry upload, endpoint deploy/undeploy/delete and batch prediction: the real SDK on its REST
transport against the fake Vertex REST service (tests/vertex_fake.py); the HTTP requests it sent are checked."""
import re

import pytest

from fmnist_gcp.config import DEFAULT_MODEL, Settings
from fmnist_gcp.preprocessing import BATCH_JSONL_PATH
from fmnist_gcp.serving import ALL_CLASSES, SERVING_CONTRACT
from vertex_fake import LOC
MODEL = f"{LOC}/models/456"


@pytest.fixture
def fake(vertex_rest):
    "The fake Vertex service holding MODEL (version 1, made elsewhere: no app label)."
    vertex_rest.seed_model(MODEL, DEFAULT_MODEL)
    return vertex_rest


def sent(fake, method, glob):
    "Bodies of the requests matching `method` and `glob`, in order."
    return [r.body for r in fake.calls(method, glob)]


def shape(fake, start=0):
    "The requests from `start` on as (method, path after the location, ids and operation numbers as N)."
    import re
    return [(r.method, re.sub(r"/\d+", "/N", r.path.split(f"{LOC}", 1)[-1])) for r in fake.requests[start:]]


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


@pytest.fixture
def bucketed(fake, gcs_emulator, monkeypatch, tmp_path):
    "Settings whose models store is a fresh folder of the emulator's bucket."
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return Settings.from_env({**fake.env, "FMNIST_MODELS_BUCKET": f"gs://fmnist-test/models-{tmp_path.name}"})


def test_upload_request(fake, bucketed):
    from fmnist_gcp.cloud.models import upload_to_vertex
    s = bucketed
    registered(s)
    m = upload_to_vertex(s, DEFAULT_MODEL, 2, "europe-docker.pkg.dev/acme-ml/fmnist/serve:1", parent_model=MODEL)
    (req,) = sent(fake, "POST", f"/v1/{LOC}/models:upload")
    assert req["parentModel"] == MODEL
    model = req["model"]
    assert model["displayName"] == DEFAULT_MODEL and model["artifactUri"] == f"{s.models.root}/{DEFAULT_MODEL}/2"
    assert model["versionAliases"] == ["champion", "default"]  # the SDK adds "default" for is_default_version
    c = model["containerSpec"]
    assert c["imageUri"] == "europe-docker.pkg.dev/acme-ml/fmnist/serve:1"
    assert (c["healthRoute"], c["predictRoute"], c["ports"]) == (
        SERVING_CONTRACT.health_route, SERVING_CONTRACT.predict_route, [{"containerPort": SERVING_CONTRACT.port}])
    assert model["labels"]["fmnist-version"] == "2"
    assert m.resource_name == MODEL and m.version_id == "2"  # a second version of the model given
    # the upload is a long-running operation: polled (not done on the first poll), then the new version is read
    assert shape(fake)[:4] == [("POST", "/models:upload"), ("GET", "/models/N/operations/N"),
                               ("GET", "/models/N/operations/N"), ("GET", "/models/N@2")]


def test_uploads_are_versions_of_one_model(fake, bucketed):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.models import upload_to_vertex, vertex_model
    s = bucketed
    registered(s)
    assert vertex_model(s, DEFAULT_MODEL) is None  # MODEL has the name but not our label: not ours
    (listed,) = fake.calls("GET", f"/v1/{LOC}/models")
    assert listed.query["filter"] == f'display_name="{DEFAULT_MODEL}" AND labels.app="fmnist-gcp"'
    first = upload_to_vertex(s, DEFAULT_MODEL, 1, "img:1")
    uploads = sent(fake, "POST", "*/models:upload")
    assert "parentModel" not in uploads[-1] and first.resource_name != MODEL  # the first upload creates it
    assert uploads[-1]["model"].get("versionAliases", []) == []  # v1: neither default nor champion locally
    assert vertex_model(s, DEFAULT_MODEL) == first.resource_name  # the list sees it
    second = upload_to_vertex(s, DEFAULT_MODEL, 2, "img:1")
    assert sent(fake, "POST", "*/models:upload")[-1]["parentModel"] == first.resource_name  # a version, not a new model
    assert (second.resource_name, second.version_id) == (first.resource_name, "2")
    champion = aiplatform.Model(f"{first.resource_name}@champion")
    assert champion.version_id == "2" and sorted(champion.version_aliases) == ["champion", "default"]
    assert list(aiplatform.Model(f"{first.resource_name}@1").version_aliases) == []  # v2 took default from v1


def test_deploy_undeploy_delete_requests(fake):
    from google.api_core.exceptions import NotFound
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.endpoints import deploy, undeploy_and_delete
    s = Settings.from_env(fake.env)
    ep = deploy(s, MODEL, machine_type="n1-standard-4", min_replicas=1, max_replicas=3)
    (created,) = sent(fake, "POST", f"/v1/{LOC}/endpoints")
    labels = created.pop("labels")  # the run's labels, by which a retried create finds the endpoint a lost answer made
    assert created == {"displayName": f"{DEFAULT_MODEL}-endpoint"}
    assert (labels.pop("app"), labels.pop("fmnist-stage")) == ("fmnist-gcp", "endpoint")
    assert re.fullmatch(r"[a-z0-9_-]{1,63}", labels.pop("fmnist-run")) and not labels
    (d,) = fake.calls("POST", "*:deployModel")
    assert d.path == f"/v1/{ep.resource_name}:deployModel"
    dm = d.body["deployedModel"]
    assert dm["model"] == f"{MODEL}@1"  # the version the SDK resolved
    assert dm["dedicatedResources"] == {"machineSpec": {"machineType": "n1-standard-4"}, "minReplicaCount": 1, "maxReplicaCount": 3}
    assert dm["serviceAccount"] == fake.env["FMNIST_SERVICE_ACCOUNT"] and d.body["trafficSplit"] == {"0": 100}
    deployed = aiplatform.Endpoint(ep.resource_name).list_models()  # a later get sees what deploy made
    assert [(m.model, m.model_version_id) for m in deployed] == [(MODEL, "1")]
    start = len(fake.requests)
    undeploy_and_delete(s, ep.resource_name)
    assert [r.body for r in fake.calls("POST", "*:undeployModel")] == [{"deployedModelId": deployed[0].id}]
    assert [r for r in shape(fake, start) if r[0] != "GET"] == [("POST", "/endpoints/N:undeployModel"), ("DELETE", "/endpoints/N")]
    with pytest.raises(NotFound):  # deleted: a later get does not find it
        aiplatform.Endpoint(ep.resource_name).list_models()


def test_deploying_a_version_that_does_not_exist_fails_before_an_endpoint_is_made(fake):
    from google.api_core.exceptions import NotFound
    from fmnist_gcp.cloud.endpoints import deploy
    with pytest.raises(NotFound):
        deploy(Settings.from_env(fake.env), f"{MODEL}@7")
    assert [(r.method, r.path, r.status) for r in fake.requests] == [("GET", f"/v1/{MODEL}@7", 404)]  # no endpoint left behind


def test_teardown_undeploys_before_it_deletes(fake):
    "Vertex refuses to delete an endpoint that still holds a model: undeploy_and_delete sends the undeploys first."
    from google.api_core.exceptions import BadRequest
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.endpoints import deploy, undeploy_and_delete
    s = Settings.from_env(fake.env)
    ep = deploy(s, MODEL)
    with pytest.raises(BadRequest, match="has deployed models"):  # FAILED_PRECONDITION (HTTP 400 over REST)
        ep.delete()
    held = [m.id for m in aiplatform.Endpoint(ep.resource_name).list_models()]
    start = len(fake.requests)
    undeploy_and_delete(s, ep.resource_name)
    sent_after = [(r.method, r.body.get("deployedModelId") if r.body else r.path) for r in fake.requests[start:]
                  if r.method != "GET"]
    assert sent_after == [*(("POST", i) for i in held), ("DELETE", f"/v1/{ep.resource_name}")]


def test_batch_prediction_request(fake):
    from fmnist_gcp.cloud.endpoints import batch_predict
    job = batch_predict(Settings.from_env(fake.env), MODEL)
    (r,) = fake.calls("POST", "*/batchPredictionJobs")
    j = r.body
    assert r.path == f"/v1/{LOC}/batchPredictionJobs" and j["model"] == f"{MODEL}@1"
    assert j["inputConfig"] == {"instancesFormat": "jsonl", "gcsSource": {"uris": [f"gs://acme-ml-fmnist-datasets/{BATCH_JSONL_PATH}"]}}
    assert j["outputConfig"] == {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": "gs://acme-ml-fmnist-dev/batch-predictions"}}
    assert j["dedicatedResources"]["machineSpec"]["machineType"] == "n1-standard-4" and j["dedicatedResources"]["maxReplicaCount"] == 2
    assert j["modelParameters"] == {k: float(v) for k, v in ALL_CLASSES.items()}
    assert job.resource_name.startswith(f"{LOC}/batchPredictionJobs/")


def test_dry_run_requests_equal_what_is_sent(fake):
    from fmnist_gcp.cloud.endpoints import batch_predict, batch_predict_request, deploy, deploy_request
    s = Settings.from_env(fake.env)
    batch_predict(s, MODEL)
    (r,) = fake.calls("POST", "*/batchPredictionJobs")
    built = batch_predict_request(s, f"{MODEL}@1", display_name=f"{DEFAULT_MODEL}-batch")
    assert r.path == f"/v1/{built['parent']}/batchPredictionJobs"
    assert {k: r.body[k] for k in built["batchPredictionJob"]} == built["batchPredictionJob"]
    ep = deploy(s, MODEL)
    deploy(s, MODEL, endpoint=ep.resource_name, machine_type="n1-standard-4", max_replicas=3)
    d = fake.calls("POST", "*:deployModel")[1]
    built = deploy_request(s, f"{MODEL}@1", ep.resource_name, machine_type="n1-standard-4", max_replicas=3)
    assert d.path == f"/v1/{built['endpoint']}:deployModel" and d.body["trafficSplit"] == built["trafficSplit"]
    assert {k: d.body["deployedModel"][k] for k in built["deployedModel"]} == built["deployedModel"]


def test_the_endpoint_service_refuses_what_vertex_refuses(fake):
    "A deploy without resources, with resources the model does not support, or with traffic not summing to 100; an undeploy of a model holding traffic."
    from google.api_core.exceptions import BadRequest
    from google.cloud import aiplatform
    from google.cloud.aiplatform_v1 import EndpointServiceClient, types
    from fmnist_gcp.cloud.endpoints import deploy
    from fmnist_gcp.cloud.vertex import vertex_client_options
    s = Settings.from_env(fake.env)
    client = EndpointServiceClient(transport="rest", client_options=vertex_client_options(s))
    with pytest.raises(BadRequest, match="displayName|display_name"):
        client.create_endpoint(parent=LOC, endpoint=types.Endpoint())
    ep = deploy(s, MODEL).resource_name
    dedicated = types.DedicatedResources(machine_spec={"machine_type": "n1-standard-2"}, min_replica_count=1)
    for dm, split, needle in [
            (types.DeployedModel(model=MODEL), None, "exactly one of dedicated_resources or automatic_resources"),
            (types.DeployedModel(model=MODEL, automatic_resources={"min_replica_count": 1}), None, "does not support AUTOMATIC_RESOURCES"),
            (types.DeployedModel(model=MODEL, dedicated_resources=dedicated), {"0": 60}, "must sum to 100"),
            (types.DeployedModel(dedicated_resources=dedicated), None, r"deployed_model\.model; Message: Required field")]:
        with pytest.raises(BadRequest, match=needle):
            client.deploy_model(endpoint=ep, deployed_model=dm, traffic_split=split)
    assert len(aiplatform.Endpoint(ep).list_models()) == 1  # nothing refused was deployed
    # a second model takes half the traffic; the first cannot be undeployed while it holds the other half
    client.deploy_model(endpoint=ep, deployed_model=types.DeployedModel(model=MODEL, dedicated_resources=dedicated),
                        traffic_split={"0": 50, aiplatform.Endpoint(ep).list_models()[0].id: 50}).result()
    first = aiplatform.Endpoint(ep).list_models()[0].id
    with pytest.raises(BadRequest, match="still has 50% of the endpoint's traffic"):
        client.undeploy_model(endpoint=ep, deployed_model_id=first)
    assert fake.calls("POST", "*:undeployModel")[-1].status == 400


def test_an_automl_model_is_deployed_on_automatic_resources(fake):
    "AutoML image models support only automatic resources: the SDK must send those, not our custom container's machine."
    from fmnist_gcp.cloud.automl import deploy_automl
    automl = f"{LOC}/models/777"
    fake.seed_model(automl, "fmnist-vertex-automl", resources="AUTOMATIC_RESOURCES")
    ep = deploy_automl(Settings.from_env(fake.env), automl)
    (d,) = fake.calls("POST", "*:deployModel")
    assert d.path == f"/v1/{ep.resource_name}:deployModel" and d.body["deployedModel"]["model"] == f"{automl}@1"
    assert "dedicatedResources" not in d.body["deployedModel"]
    assert d.body["deployedModel"]["automaticResources"]["minReplicaCount"] == 1 and d.body["trafficSplit"] == {"0": 100}


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
