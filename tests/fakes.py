"""Stateful gapic-level fakes of the Vertex AI Job and Metadata services, for the tests not yet on the fake Vertex
REST service (tests/vertex_fake.py: the jobs, models, endpoints, prediction and experiment tests run there).

Each keeps its resources in memory: a resource made by one call is returned by a later get or list, a missing one
raises NotFound, long-running operations are finished when returned. `patch(monkeypatch)` puts a fake behind the
SDK's gapic client class, so the SDK's own code (request building, polling, resource syncing) runs unchanged.
"""
from unittest import mock

LOC = "projects/acme-ml/locations/europe-west4"


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
