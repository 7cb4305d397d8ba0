"""Whole Vertex AI sequences: the real SDK on its REST transport against the fake Vertex REST service (tests/vertex_fake.py):
a training job's model imported into the registry, evaluated and registered by the stages, uploaded as versions of
one Vertex model, deployed, asked for predictions through the endpoint's deployed model (our own serving app, as
Vertex runs the container), undeployed and deleted, with the HTTP requests checked in order; and the endpoint and
transport overrides on every client.
"""
import os
import uuid

import numpy as np
import pytest

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from conftest import VERTEX_ENV  # noqa: E402
from vertex_fake import LOC  # noqa: E402
from fmnist_gcp.config import DEFAULT_MODEL, Settings  # noqa: E402

IMAGE = "europe-west4-docker.pkg.dev/acme-ml/fmnist/serve:t1"


@pytest.fixture
def anonymous(monkeypatch):
    import google.auth
    from google.auth import credentials as auth_credentials
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (auth_credentials.AnonymousCredentials(), "acme-ml"))


def test_endpoint_and_transport_overrides_reach_the_sdk_and_our_own_clients(anonymous):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform import initializer, utils
    from fmnist_gcp.cloud.preflight import Clients
    from fmnist_gcp.cloud.vertex import vertex_init
    psc = Settings.from_env({**VERTEX_ENV, "FMNIST_VERTEX_ENDPOINT": "https://vertex-psc.p.googleapis.com/",
                             "FMNIST_VERTEX_TRANSPORT": "rest"})
    vertex_init(psc)
    for cls in (utils.JobClientWithOverride, utils.ModelClientWithOverride, utils.EndpointClientWithOverride,
                utils.PredictionClientWithOverride, utils.MetadataClientWithOverride):
        t = initializer.global_config.create_client(client_class=cls).select_version("v1")._transport
        assert (type(t).__name__.endswith("RestTransport"), t._host) == (True, "https://vertex-psc.p.googleapis.com"), cls
    t = Clients(psc, AnonymousCredentials()).vertex()._transport  # the preflight's quota/job client
    assert (type(t).__name__, t._host) == ("JobServiceRestTransport", "https://vertex-psc.p.googleapis.com")
    vertex_init(Settings.from_env(VERTEX_ENV))  # unset again: the region's endpoint over gRPC
    t = initializer.global_config.create_client(client_class=utils.JobClientWithOverride).select_version("v1")._transport
    assert (type(t).__name__, t._host) == ("JobServiceGrpcTransport", "europe-west4-aiplatform.googleapis.com:443")


@pytest.fixture(scope="module")
def job_model(tmp_path_factory):
    "A small model trained on 3,000 real images, exported as the training task leaves it in AIP_MODEL_DIR."
    import time
    from fmnist_gcp.config import Store
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.training import TrainConfig, export_model, fit
    d = tmp_path_factory.mktemp("job") / "model"
    x, y = load_split("train", limit=3000)
    cfg = TrainConfig(widths=(8, 16), convs=1, epochs=2, lr=0.01, seed=0, precision="float32", augment=Augment(True, 1, 0.0))
    model, history = fit(cfg, x, y, x[:300], y[:300], 0.286, 0.353, log=lambda *_: None)
    export_model(model, cfg, {"run_id": "job-run", "name": DEFAULT_MODEL, "history": history, "val_accuracy": history[-1]["val_accuracy"],
                              "normalisation": {"mean": 0.286, "std": 0.353}, "data_sha256": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                 Store("models", str(d)))
    return d


@pytest.fixture
def vertex(vertex_rest, gcs_emulator, monkeypatch, tmp_path):
    "Vertex settings (the fake Vertex REST service's endpoint, REST transport) in the environment, stores in the emulator's bucket."
    prefix = f"gs://fmnist-test/{uuid.uuid4().hex[:8]}"
    env = {**vertex_rest.env, "STORAGE_EMULATOR_HOST": gcs_emulator, "FMNIST_RUNS_DIR": str(tmp_path / "runs"),
           "FMNIST_HOME": str(tmp_path / "home"), **{f"FMNIST_{r.upper()}_BUCKET": f"{prefix}/{r}" for r in ("dev", "datasets", "models")}}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    return {"settings": Settings.from_env(), "fake": vertex_rest}


def finished_job(v, model_dir, state="JOB_STATE_SUCCEEDED") -> str:
    "A training CustomJob made elsewhere, its model folder copied to where the task writes it (base output + /model)."
    from fmnist_gcp.config import filesystem
    s, fake = v["settings"], v["fake"]
    base = s.models.uri("custom-jobs", f"fmnist-train-{len(fake.jobs) + 1}")
    fs, root = filesystem(base + "/model")
    fs.put(str(model_dir), root, recursive=True)
    return fake.seed_job({"displayName": "fmnist-train", "jobSpec": {"baseOutputDirectory": {"outputUriPrefix": base}}}, state)


def shape(fake, start=0):
    "The requests from `start` on as (method, path after the location, resource ids and operation numbers as N)."
    import re
    return [(r.method, re.sub(r"/\d+", "/N", r.path.split(LOC, 1)[-1])) for r in fake.requests[start:]]


def test_a_job_that_has_not_succeeded_or_does_not_exist_is_refused(vertex, job_model):
    from google.api_core.exceptions import NotFound
    from fmnist_gcp.config import ConfigError
    from fmnist_gcp.cloud.jobs import import_job_model
    running = finished_job(vertex, job_model, "JOB_STATE_RUNNING")
    with pytest.raises(ConfigError, match="is JOB_STATE_RUNNING"):
        import_job_model(vertex["settings"], running)
    with pytest.raises(NotFound):
        import_job_model(vertex["settings"], f"{LOC}/customJobs/404")
    assert not vertex["settings"].models.exists(f"{DEFAULT_MODEL}/1/metadata.json")  # nothing half-imported


def test_from_a_finished_job_to_predictions_through_an_endpoint_and_back(vertex, job_model, capsys):
    from google.api_core.exceptions import NotFound
    from google.cloud import aiplatform
    from fmnist_gcp.cli import main
    from fmnist_gcp.data import load_split
    from fmnist_gcp.registry import Registry
    from fmnist_gcp.serving import Predictor
    from fmnist_gcp.cloud.endpoints import deploy, predict, undeploy_and_delete
    s, fake = vertex["settings"], vertex["fake"]
    job = finished_job(vertex, job_model)
    # import, evaluate with the evaluation stage, register and promote with the registry stage, upload (a new model)
    assert main(["models", "import-job", job, "--profile", "smoke", "--upload", IMAGE]) == 0
    meta = s.models.read_json(f"{DEFAULT_MODEL}/1/metadata.json")
    assert (meta["version"], meta["source_job"], meta["run_id"].endswith("-import")) == (1, job, True)
    reg = Registry(s, DEFAULT_MODEL)
    assert reg.aliases["champion"] == reg.aliases["default"] == 1 and 0.2 < reg.versions[1]["metrics"]["accuracy"] < 1  # far above chance (0.1)
    first = fake.calls("POST", "*/models:upload")[0].body
    assert "parentModel" not in first and first["model"]["artifactUri"] == s.models.uri(DEFAULT_MODEL, "1")
    assert sorted(first["model"]["versionAliases"]) == ["champion", "default"]
    (vertex_model,) = fake.models
    # the same job imported again (copied only): version 2 in the registry and a second version of the same Vertex model
    assert main(["models", "import-job", job, "--no-evaluate", "--upload", IMAGE]) == 0
    assert fake.calls("POST", "*/models:upload")[1].body["parentModel"] == vertex_model and len(fake.models) == 1
    assert [v.version_id for v in aiplatform.ModelRegistry(vertex_model).list_versions()] == ["1", "2"]
    aliases = Registry(s, DEFAULT_MODEL).aliases  # not evaluated: the new default, but champion stays with v1
    assert (aliases["default"], aliases["champion"]) == (2, 1)
    assert "champion" in aiplatform.Model(f"{vertex_model}@1").version_aliases
    # deploy the champion, predict through the endpoint: the answers are the model's own
    start = len(fake.requests)
    ep = deploy(s, f"{vertex_model}@champion")
    x, _ = load_split("test", limit=8)
    got = predict(s, ep.resource_name, x)
    want = Predictor(s.models.uri(DEFAULT_MODEL, "1", "model.keras"))(x)
    assert [int(p["ids"][0]) for p in got["predictions"]] == list(want.argmax(1))
    np.testing.assert_allclose([p["confidences"][0] for p in got["predictions"]], want.max(1), rtol=1e-5)
    assert got["model_version_id"] == "1" and got["deployed_model_id"] == aiplatform.Endpoint(ep.resource_name).list_models()[0].id
    (sent,) = fake.calls("POST", "*:predict")
    params = sent.body["parameters"]  # what reached Vertex: protobuf numbers, so whole numbers as floats
    assert params == {"confidenceThreshold": 0.0, "maxPredictions": 10.0} and isinstance(params["maxPredictions"], float)
    undeploy_and_delete(s, ep.resource_name)
    with pytest.raises(NotFound):
        aiplatform.Endpoint(ep.resource_name).list_models()
    # the whole conversation, in order: every long-running operation polled until done, nothing else sent
    seen = [r for r in shape(fake, start) if r != ("GET", "/endpoints/N")]  # the SDK's re-reads of the endpoint
    assert seen == [("GET", "/models/N@champion"), ("POST", "/endpoints"), *[("GET", "/endpoints/N/operations/N")] * 2,
                    ("POST", "/endpoints/N:deployModel"), *[("GET", "/endpoints/N/operations/N")] * 2,
                    ("POST", "/endpoints/N:predict"), ("POST", "/endpoints/N:undeployModel"),
                    *[("GET", "/endpoints/N/operations/N")] * 2, ("DELETE", "/endpoints/N"),
                    *[("GET", "/endpoints/N/operations/N")] * 2]
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL} v1: imported from {job}" in out and f"uploaded as {vertex_model}@2" in out


def test_submit_training_with_import_follows_the_job_then_imports_and_evaluates_its_model(vertex, job_model, monkeypatch):
    from fmnist_gcp.pipeline import runs as pipeline_runs
    from fmnist_gcp.cli import main
    from fmnist_gcp.config import filesystem
    fake = vertex["fake"]
    evaluated = []
    monkeypatch.setattr(pipeline_runs, "run_pipeline", lambda *a, **kw: evaluated.append(a))  # the stages: tested above
    def container(job):  # what the task does in the job: the model lands in <base output>/model
        fs, root = filesystem(job["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"].rstrip("/") + "/model")
        fs.put(str(job_model), root, recursive=True)
    fake.on_job_end = container
    assert main(["submit-training", "--image", "img:1", "--no-check", "--import", "--poll-seconds", "0", "--", "--epochs", "1"]) == 0
    (job,) = fake.jobs
    (sent,) = fake.calls("POST", "*/customJobs")  # what we sent: the image and the task's arguments, passed on after `--`
    pool = sent.body["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
    args = pool["args"]
    assert pool["imageUri"] == "img:1" and args[args.index("--epochs") + 1] == "1"
    # followed through every state (queued, pending, running, succeeded) before the import
    assert [s for s in shape(fake) if s[0] == "GET" and "/customJobs/" in s[1]][:3] == [("GET", "/customJobs/N")] * 3
    assert fake.jobs[job]["state"] == "JOB_STATE_SUCCEEDED" and len(fake.calls("GET", f"/v1/{job}")) >= 3
    # the model only exists once the job's last get ran the container: imported after following the job to its end,
    # from the base output directory we sent
    meta = vertex["settings"].models.read_json(f"{DEFAULT_MODEL}/1/metadata.json")
    assert meta["source_job"] == job
    assert meta["imported_from"] == sent.body["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"].rstrip("/") + "/model"
    (args,) = evaluated
    assert args[1:3] == (["08_evaluation", "09_registry"], [f"model_name={DEFAULT_MODEL}", "version=1"])
