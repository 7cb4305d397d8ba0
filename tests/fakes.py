"""Stateful fakes of the Vertex AI gapic services this package calls, in the style of the SDK's own unit tests.

Each keeps its resources in memory: a resource made by one call is returned by a later get or list, a missing one
raises NotFound, long-running operations are finished when returned. `patch(monkeypatch)` puts a fake behind the
SDK's gapic client class, so the SDK's own code (request building, polling, resource syncing) runs unchanged.
"""
from unittest import mock

LOC = "projects/acme-ml/locations/europe-west4"


def _now():
    import datetime
    return datetime.datetime.now(datetime.timezone.utc)


def lro(result, name: str = f"{LOC}/operations/1"):
    "A finished long-running operation whose result is `result`."
    op = mock.Mock(); op.result.return_value = result; op.operation.name = name
    return op


class FakeJobService:
    """The Job service: create keeps the job PENDING; each get reads the job and moves it one state on (RUNNING, then
    `end`); the get that ends it first runs `on_end(job)` (what the container did); an unknown name is NotFound."""
    def __init__(self, end="JOB_STATE_SUCCEEDED", on_end=lambda job: None):
        from google.cloud.aiplatform.compat.types import custom_job, job_state
        self._types, self._state = custom_job, job_state.JobState
        self.jobs, self.created, self.gets = {}, [], 0
        self._next = {"JOB_STATE_PENDING": "JOB_STATE_RUNNING", "JOB_STATE_RUNNING": end}
        self._on_end = on_end

    def create_custom_job(self, client, parent, custom_job, timeout=None, **kw):
        job = self._types.CustomJob(custom_job)
        job.name, job.state = f"{parent}/customJobs/{len(self.jobs) + 1}", self._state.JOB_STATE_PENDING
        self.jobs[job.name] = job; self.created.append(custom_job)
        return self._types.CustomJob(job)

    def get_custom_job(self, client, name, **kw):
        from google.api_core.exceptions import NotFound
        if name not in self.jobs: raise NotFound(f"CustomJob {name} not found")
        job, self.gets = self.jobs[name], self.gets + 1
        out = self._types.CustomJob(job)
        nxt = self._next.get(job.state.name)
        if nxt:
            if nxt not in self._next: self._on_end(job)
            job.state = self._state[nxt]
        return out

    def patch(self):
        from google.cloud.aiplatform.compat.services import job_service_client
        c = job_service_client.JobServiceClient
        return mock.patch.multiple(c, create_custom_job=mock.create_autospec(c.create_custom_job, side_effect=self.create_custom_job),
                                   get_custom_job=mock.create_autospec(c.get_custom_job, side_effect=self.get_custom_job))


class FakeMetadataService:
    "A stateful fake of the metadata service: stores and contexts kept by name, NotFound for what was never created."
    def __init__(self):
        self.stores, self.contexts, self.children, self.calls = {}, {}, {}, []
        self.executions, self.artifacts = {}, {}  # never created here: runs of the old (v1) layout are looked up

    def patch(self, monkeypatch):
        from google.cloud.aiplatform.compat.services import metadata_service_client_v1 as metadata_service_client
        cls = metadata_service_client.MetadataServiceClient
        for n in (n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))
                  and "path" not in n and n not in ("from_service_account_file", "from_service_account_info",
                                                    "from_service_account_json", "get_mtls_endpoint_and_cert_source")):
            # every service method answers from this fake; one it does not model fails the test (never the network)
            monkeypatch.setattr(cls, n, lambda client, request=None, _n=n, **kw: self._call(_n, request, **kw))
        return self

    def _call(self, method, request, **kw):
        if not hasattr(self, method): raise AssertionError(f"unexpected metadata service call {method}")
        return getattr(self, method)(request, **kw)

    @staticmethod
    def _get(table, name):
        from google.api_core import exceptions
        if name not in table: raise exceptions.NotFound(f"{name} not found")
        return table[name]

    @staticmethod
    def _lro(result): return lro(result)

    def get_metadata_store(self, request=None, *, name=None, **kw):
        self.calls.append(("get_metadata_store", name)); return self._get(self.stores, name)

    def create_metadata_store(self, request=None, *, parent=None, metadata_store=None, metadata_store_id=None, **kw):
        from google.cloud.aiplatform.compat.types import metadata_store_v1 as gca_store
        name = f"{parent}/metadataStores/{metadata_store_id}"
        self.calls.append(("create_metadata_store", name))
        self.stores[name] = gca_store.MetadataStore(metadata_store, name=name)
        return self._lro(self.stores[name])

    def get_context(self, request=None, *, name=None, **kw):
        self.calls.append(("get_context", name)); return self._get(self.contexts, name)

    def create_context(self, request=None, *, parent=None, context=None, context_id=None, **kw):
        from google.api_core import exceptions
        from google.cloud.aiplatform.compat.types import context_v1 as gca_context
        self._get(self.stores, parent)  # the store must exist first
        name = f"{parent}/contexts/{context_id}"
        self.calls.append(("create_context", name))
        if name in self.contexts: raise exceptions.AlreadyExists(f"{name} exists")
        self.contexts[name] = gca_context.Context(context, name=name)
        return self.contexts[name]

    def get_execution(self, request=None, *, name=None, **kw):
        self.calls.append(("get_execution", name)); return self._get(self.executions, name)

    def get_artifact(self, request=None, *, name=None, **kw):
        self.calls.append(("get_artifact", name)); return self._get(self.artifacts, name)

    def add_context_children(self, request=None, *, context=None, child_contexts=None, **kw):
        self.calls.append(("add_context_children", context))
        self._get(self.contexts, context)
        self.children.setdefault(context, []).extend(child_contexts)


class FakeModelService:
    "The Model service: uploads make models and versions that get and list then return; aliases move between versions."
    def __init__(self):
        self.models: dict[str, list] = {}  # resource name -> versions (gapic Model), oldest first
        self.requests: list = []  # UploadModelRequest, in order

    def seed(self, name: str, display_name: str, labels: dict | None = None,
             resources: str = "DEDICATED_RESOURCES") -> None:  # AUTOMATIC_RESOURCES: an AutoML image model
        "A model made elsewhere (version 1; a custom container's dedicated resources unless told otherwise)."
        from google.cloud.aiplatform.compat.types import model as gca_model
        self.models[name] = [gca_model.Model(name=name, display_name=display_name, version_id="1", labels=labels or {},
                                             version_aliases=["default"],
                                             supported_deployment_resources_types=[gca_model.Model.DeploymentResourcesType[resources]])]

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
        v = gca_model.Model(request.model, name=name, version_id=str(len(versions) + 1), create_time=_now(),
                            supported_deployment_resources_types=[gca_model.Model.DeploymentResourcesType.DEDICATED_RESOURCES])
        for old in versions:  # an alias names one version of a model
            old.version_aliases = [a for a in old.version_aliases if a not in v.version_aliases]
        versions.append(v)
        return lro(gca_model_service.UploadModelResponse(model=name, model_version_id=v.version_id))

    def get_model(self, request=None, *, name=None, **kw):
        from google.api_core import exceptions
        name = name or request.name
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


class FakeEndpointService:
    """The Endpoint service: endpoints made by create, models deployed (the model version must exist in `models`,
    traffic split updated), undeployed, and deleted (refused while a model is deployed, as Vertex does)."""
    def __init__(self, models: FakeModelService):
        self.models, self.endpoints, self.calls = models, {}, []

    def patch(self, monkeypatch):
        from google.cloud.aiplatform.compat.services import endpoint_service_client
        for n in ("create_endpoint", "get_endpoint", "deploy_model", "undeploy_model", "delete_endpoint"):
            monkeypatch.setattr(endpoint_service_client.EndpointServiceClient, n,
                                lambda client, request=None, _n=n, **kw: self._call(_n, request, kw))
        return self

    def _call(self, name, request, kw):
        kw = {k: v for k, v in kw.items() if k not in ("metadata", "timeout", "retry")}
        if request is not None: kw = {f.name: getattr(request, f.name) for f in type(request).pb(request).DESCRIPTOR.fields}
        self.calls.append((name, kw))
        return getattr(self, name)(**kw)

    def _get(self, name):
        from google.api_core.exceptions import NotFound
        if name not in self.endpoints: raise NotFound(f"Endpoint {name} not found")
        return self.endpoints[name]

    def create_endpoint(self, parent, endpoint, endpoint_id=None, **kw):
        from google.cloud.aiplatform.compat.types import endpoint as gca_endpoint
        ep = gca_endpoint.Endpoint(endpoint, name=f"{parent}/endpoints/{789 + len(self.endpoints)}", create_time=_now())
        self.endpoints[ep.name] = ep
        return lro(gca_endpoint.Endpoint(ep))

    def get_endpoint(self, name, **kw):
        from google.cloud.aiplatform.compat.types import endpoint as gca_endpoint
        return gca_endpoint.Endpoint(self._get(name))

    def deploy_model(self, endpoint, deployed_model, traffic_split=None, **kw):
        from google.cloud.aiplatform.compat.types import endpoint as gca_endpoint, endpoint_service
        ep = self._get(endpoint)
        from google.api_core.exceptions import InvalidArgument
        m = self.models.get_model(name=deployed_model.model)  # NotFound for a model or version that does not exist
        kind = "dedicated_resources" if "dedicated_resources" in deployed_model else "automatic_resources" if "automatic_resources" in deployed_model else None
        if kind is None:  # DeployedModel's prediction_resources oneof is required
            raise InvalidArgument("deployed_model: one of dedicated_resources or automatic_resources is required")
        supported = {t.name.lower() for t in m.supported_deployment_resources_types}
        if kind not in supported:
            raise InvalidArgument(f"Model {m.name} does not support {kind.upper()}; it supports {', '.join(sorted(s.upper() for s in supported))}")
        if traffic_split and sum(traffic_split.values()) != 100:
            raise InvalidArgument(f"traffic_split must sum to 100, not {sum(traffic_split.values())}")
        dm = gca_endpoint.DeployedModel(deployed_model, id=str(1000 + len(self.calls)), model_version_id=m.version_id)
        ep.deployed_models.append(dm)
        split = dict(traffic_split or {"0": 100})
        ep.traffic_split = {(dm.id if k == "0" else k): v for k, v in split.items()}
        return lro(endpoint_service.DeployModelResponse(deployed_model=dm))

    def undeploy_model(self, endpoint, deployed_model_id, traffic_split=None, **kw):
        from google.api_core.exceptions import NotFound
        from google.cloud.aiplatform.compat.types import endpoint_service
        ep = self._get(endpoint)
        if deployed_model_id not in [d.id for d in ep.deployed_models]:
            raise NotFound(f"{endpoint} has no deployed model {deployed_model_id}")
        keep = [d for d in ep.deployed_models if d.id != deployed_model_id]
        del ep.deployed_models[:]; ep.deployed_models.extend(keep)
        ep.traffic_split = {k: v for k, v in dict(traffic_split or ep.traffic_split).items() if k != deployed_model_id}
        return lro(endpoint_service.UndeployModelResponse())

    def delete_endpoint(self, name, **kw):
        from google.api_core.exceptions import FailedPrecondition
        if self._get(name).deployed_models:
            raise FailedPrecondition(f"{name} still has deployed models: undeploy them first")
        del self.endpoints[name]
        return lro(None)


class FakePredictionService:
    """The Prediction service as Vertex runs a custom container: the endpoint's traffic picks the deployed model, the
    model version's serving container (our own server app, started on loopback with that version's artifacts, as
    Vertex would with AIP_STORAGE_URI) gets the instances and parameters on its predict route, and its JSON answer
    comes back as the PredictResponse."""
    def __init__(self, endpoints: FakeEndpointService):
        self.endpoints, self.servers, self.calls = endpoints, {}, []

    def patch(self, monkeypatch):
        from google.cloud.aiplatform.compat.services import prediction_service_client
        monkeypatch.setattr(prediction_service_client.PredictionServiceClient, "predict",
                            lambda client, request=None, **kw: self.predict(**kw))
        return self

    def _server(self, dm, model):
        from fmnist_gcp.serving import BackgroundServer, Predictor, create_app
        if dm.id not in self.servers:
            c = model.container_spec
            app = create_app(lambda: Predictor(model.artifact_uri.rstrip("/") + "/model.keras", model.display_name, model.version_id),
                             health_route=c.health_route, predict_route=c.predict_route, deployed_model_id=dm.id)
            srv = BackgroundServer(app).start(); srv.wait_ready(c.health_route)
            self.servers[dm.id] = (srv, c.predict_route)
        return self.servers[dm.id]

    def predict(self, endpoint, instances, parameters=None, **kw):
        import json
        import httpx
        from google.protobuf import json_format
        from google.cloud.aiplatform.compat.types import prediction_service
        ep = self.endpoints._get(endpoint)
        dm_id = max(ep.traffic_split, key=ep.traffic_split.get)  # the deployed model with the most traffic
        dm = next(d for d in ep.deployed_models if d.id == dm_id)
        model = self.endpoints.models.get_model(name=dm.model)
        srv, route = self._server(dm, model)
        to_json = lambda v: json_format.MessageToDict(v) if hasattr(v, "DESCRIPTOR") else v
        body = {"instances": [to_json(i) for i in instances], "parameters": to_json(parameters) or {}}
        self.calls.append(body)
        r = httpx.post(srv.url + route, json=body, timeout=60)
        r.raise_for_status()
        out = r.json()
        return prediction_service.PredictResponse.from_json(json.dumps(
            {"predictions": out["predictions"], "deployedModelId": dm.id, "model": dm.model.partition("@")[0],
             "modelVersionId": model.version_id}))

    def stop(self):
        for srv, _ in self.servers.values(): srv.stop()
