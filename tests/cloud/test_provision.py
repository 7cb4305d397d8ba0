"""`fmnist gcp plan | apply | destroy`: buckets on gcp-storage-emulator, the other services on their patched gapic clients.

No Google Cloud account exists here. Buckets, their settings, their IAM policies and their objects go to the
emulator through google-cloud-storage; its bucket insert ignores the request body (location, iamConfiguration,
versioning, labels), so `emulator_honours_bucket_settings` makes insert apply the body as the emulator's own PATCH
does: that one handler is the only patched storage call. Service Usage, IAM (service accounts), Resource Manager
(project IAM policy) and Artifact Registry run on their real client classes with anonymous credentials and their
RPC methods replaced by one stateful fake that records every request.
"""
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest

from conftest import BIN
from fmnist_gcp.config import Settings

ENV = {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4"}
RUNNER = "serviceAccount:fmnist-runner@acme-ml.iam.gserviceaccount.com"
BUILDER = "serviceAccount:fmnist-builder@acme-ml.iam.gserviceaccount.com"  # Cloud Build runs as this account
ALICE = "user:alice@example.com"  # the submitter
OTHER = "user:bob@example.com"  # someone else's binding that must survive apply and destroy
BUCKETS = ["acme-ml-fmnist-dev", "acme-ml-fmnist-datasets", "acme-ml-fmnist-models"]


@pytest.fixture
def emulator_honours_bucket_settings(monkeypatch):
    "The emulator's bucket insert applies the request body (location, settings, labels) like its PATCH does."
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import buckets

    def insert(request, response, storage, *args, **kwargs):
        bucket = buckets.create_bucket(request.data.get("name"), storage)
        if not bucket:
            response.status = 409
            return response.json(buckets.CONFLICT)
        bucket = buckets._patch_bucket(bucket, request.data)
        storage.create_bucket(bucket["name"], bucket)
        response.json(bucket)
    for _, handlers in server.HANDLERS:
        if handlers.get(server.POST) is buckets.insert:
            monkeypatch.setitem(handlers, server.POST, insert)


@pytest.fixture
def gcp_env(gcs_emulator, emulator_honours_bucket_settings, anonymous, monkeypatch):
    for k, v in {**ENV, "STORAGE_EMULATOR_HOST": gcs_emulator, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                 "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FMNIST_SERVICE_ACCOUNT", raising=False)
    return Settings.from_env(ENV)


class FakeGoogle:
    "Service Usage, IAM, Resource Manager and Artifact Registry in memory; every request is kept in `calls`."

    def __init__(self):
        from google.iam.v1 import policy_pb2
        self.enabled = {"storage.googleapis.com"}  # on by default in a new project
        self.accounts, self.repos, self.packages, self.calls = {}, {}, {}, []
        self.online_stores = {}  # Feature Store V2 online store name -> its feature view ids (publishing makes it, not apply)
        self.faults = {}  # method name -> [(error, made)]: its next calls raise, before acting or (made) after, the answer lost
        self.policies = {"projects/acme-ml": policy_pb2.Policy(version=1, etag=b"e0", bindings=[
            policy_pb2.Binding(role="roles/aiplatform.user", members=[OTHER]),
            policy_pb2.Binding(role="roles/cloudbuild.builds.editor", members=[OTHER])])}

    def _rec(self, name, request):
        self.calls.append((name, request)); return request

    @staticmethod
    def _op(result=None):
        return mock.Mock(**{"result.return_value": result})

    def patches(self):
        from google.api_core import exceptions
        from google.cloud import artifactregistry_v1 as ar, iam_admin_v1 as iam, resourcemanager_v3 as rm, service_usage_v1 as su
        from google.iam.v1 import policy_pb2

        def batch_get(_, request=None, **kw):
            self._rec("batch_get_services", request)
            return su.BatchGetServicesResponse(services=[su.Service(name=n, state=su.State.ENABLED if n.rsplit("/", 1)[-1] in self.enabled
                                                                    else su.State.DISABLED) for n in request.names])
        def batch_enable(_, request=None, **kw):
            self.enabled |= set(self._rec("batch_enable_services", request).service_ids); return self._op()
        def get_found(store, label):
            def get(_, request=None, **kw):
                name = self._rec(label, request)["name"]
                if name not in store: raise exceptions.NotFound(name)
                return store[name]
            return get
        def create_sa(_, request=None, **kw):
            r = self._rec("create_service_account", request)
            email = f"{r.account_id}@acme-ml.iam.gserviceaccount.com"
            name = f"projects/acme-ml/serviceAccounts/{email}"
            if name in self.accounts: raise exceptions.AlreadyExists(f"Service account {r.account_id} already exists within project acme-ml.")
            self.accounts[name] = iam.ServiceAccount(email=email)
        def delete_sa(_, request=None, **kw):
            name = self._rec("delete_service_account", request)["name"]
            if name not in self.accounts: raise exceptions.NotFound(f"Unknown service account {name}")
            self.accounts.pop(name); self.policies.pop(name, None)
        def create_repo(_, request=None, **kw):
            r = self._rec("create_repository", request)
            name = f"{r.parent}/repositories/{r.repository_id}"
            if name in self.repos: raise exceptions.AlreadyExists(f"the repository already exists: {name}")
            self.repos[name] = r.repository; return self._op(r.repository)
        def delete_repo(_, request=None, **kw):
            name = self._rec("delete_repository", request)["name"]
            if name not in self.repos: raise exceptions.NotFound(f"Requested entity was not found: {name}")
            self.repos.pop(name); self.policies.pop(name, None)
            return self._op()
        def list_packages(_, request=None, **kw):
            return list(self.packages.get(self._rec("list_packages", request)["parent"], []))
        def copy(policy, etag=None):
            out = policy_pb2.Policy(); out.CopyFrom(policy)
            if etag is not None: out.etag = etag
            return out
        def get_policy(_, request=None, **kw):
            return copy(self.policies.get(self._rec("get_iam_policy", request)["resource"], policy_pb2.Policy(etag=b"e0")))
        def set_policy(_, request=None, **kw):
            target, new = self._rec("set_iam_policy", request)["resource"], request["policy"]
            if new.etag != self.policies.get(target, policy_pb2.Policy(etag=b"e0")).etag: raise exceptions.Aborted("etag")
            self.policies[target] = copy(new, etag=new.etag + b"+")
            return self.policies[target]
        def get_store(_, request=None, *, name=None, **kw):
            self._rec("get_feature_online_store", name)
            if name not in self.online_stores: raise exceptions.NotFound(name)
            return fs_types.FeatureOnlineStore(name=name, optimized={})
        def list_views(_, request=None, *, parent=None, **kw):
            self._rec("list_feature_views", parent)
            if parent not in self.online_stores: raise exceptions.NotFound(parent)
            return [fs_types.FeatureView(name=f"{parent}/featureViews/{v}") for v in self.online_stores[parent]]
        def delete_store(_, request=None, *, name=None, force=False, **kw):
            self._rec("delete_feature_online_store", {"name": name, "force": force})
            if name not in self.online_stores: raise exceptions.NotFound(name)  # as Vertex: a bad name is NotFound
            if self.online_stores[name] and not force: raise exceptions.FailedPrecondition(f"{name} has feature views; set force")
            del self.online_stores[name]; return self._op()
        from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient as F
        from google.cloud.aiplatform_v1 import types as fs_types
        S, I, P, A = su.ServiceUsageClient, iam.IAMClient, rm.ProjectsClient, ar.ArtifactRegistryClient
        table = [(S, "batch_get_services", batch_get), (S, "batch_enable_services", batch_enable),
                 (I, "get_service_account", get_found(self.accounts, "get_service_account")), (I, "create_service_account", create_sa),
                 (I, "delete_service_account", delete_sa), (I, "get_iam_policy", get_policy), (I, "set_iam_policy", set_policy),
                 (P, "get_iam_policy", get_policy), (P, "set_iam_policy", set_policy),
                 (A, "get_repository", get_found(self.repos, "get_repository")), (A, "create_repository", create_repo),
                 (A, "delete_repository", delete_repo), (A, "list_packages", list_packages),
                 (A, "get_iam_policy", get_policy), (A, "set_iam_policy", set_policy),
                 (F, "get_feature_online_store", get_store), (F, "list_feature_views", list_views),
                 (F, "delete_feature_online_store", delete_store)]
        def faulty(name, fake):
            def call(*a, **kw):
                fault = self.faults.get(name, []) and self.faults[name].pop(0)
                if fault and not fault[1]: raise fault[0]
                out = fake(*a, **kw)
                if fault: raise fault[0]
                return out
            return call
        return [mock.patch.object(cls, name, autospec=True, side_effect=faulty(name, fake)) for cls, name, fake in table]

    def requests(self, name): return [r for n, r in self.calls if n == name]

    def members(self, target, role):
        return {m for b in self.policies.get(target, []).bindings if b.role == role for m in b.members} if target in self.policies else set()


@pytest.fixture
def google():
    fake = FakeGoogle()
    patches = fake.patches()
    for p in patches: p.start()
    try: yield fake
    finally:
        for p in reversed(patches): p.stop()


def test_plan_offline_json_prints_the_desired_state_without_calling_google():
    env = {**os.environ, **ENV, "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1"}
    out = subprocess.run([str(BIN / "python"), "-c", "from fmnist_gcp.cloud.provision import plan_json; print(plan_json())"],
                         env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    state = json.loads(out)
    assert list(state) == ["apis", "buckets", "service_account", "project_roles", "bucket_roles", "artifact_registry"]
    builder = state["artifact_registry"]["builder_service_account"]
    assert builder["email"] == BUILDER.split(":")[1] and state["service_account"]["email"] == RUNNER.split(":")[1]
    grants = [*state["project_roles"], *state["service_account"]["roles"], *state["artifact_registry"]["roles"],
              *builder["roles"], *(g for gs in state["bucket_roles"].values() for g in gs)]
    assert grants and all(g["reason"] for g in grants)
    assert not {g["role"] for g in grants} & {"roles/owner", "roles/editor", "roles/viewer"}
    assert not [g for g in state["project_roles"] if g["role"].startswith("roles/storage.")]
    assert sorted(state["bucket_roles"]) == sorted(BUCKETS)
    assert {b: [g["role"] for g in gs if g["member"] == BUILDER] for b, gs in state["bucket_roles"].items()} == {
        BUCKETS[0]: ["roles/storage.objectViewer"], BUCKETS[1]: [], BUCKETS[2]: []}  # the build context, in dev only
    assert {b["location"] for b in state["buckets"]} == {"europe-west4"}
    assert "google.cloud" not in out  # nothing but the state


def test_plan_apply_plan_apply_destroy(gcp_env, google):
    from google.cloud import artifactregistry_v1 as ar, storage
    from fmnist_gcp.cloud import provision as pv
    s = gcp_env
    first = pv.plan(s, submitters=["alice@example.com"])
    assert {c.what for c in first} == {pv.ENABLE_API, pv.CREATE_SERVICE_ACCOUNT, pv.CREATE_BUCKET, pv.CREATE_REPOSITORY, pv.GRANT}
    assert pv.STORAGE_API not in [c.resource for c in first]  # already enabled
    assert not google.requests("batch_enable_services")  # plan changes nothing

    made = pv.apply(s, submitters=["alice@example.com"])
    assert made == first
    enable, = google.requests("batch_enable_services")
    assert enable.parent == "projects/acme-ml" and set(enable.service_ids) == set(pv.APIS) - {pv.STORAGE_API}
    assert [(sa.name, sa.account_id, sa.service_account.display_name) for sa in google.requests("create_service_account")] == [
        ("projects/acme-ml", "fmnist-runner", "fmnist-gcp runner"), ("projects/acme-ml", "fmnist-builder", "fmnist-gcp builder")]
    assert "Cloud Build" in google.requests("create_service_account")[1].service_account.description
    repo, = google.requests("create_repository")
    assert (repo.parent, repo.repository_id) == ("projects/acme-ml/locations/europe-west4", "fmnist")
    assert repo.repository.format_ == ar.Repository.Format.DOCKER and repo.repository.labels["app"] == "fmnist-gcp"
    project_set = [r for r in google.requests("set_iam_policy") if r["resource"] == "projects/acme-ml"]
    assert len(project_set) == 1 and project_set[0]["policy"].etag == b"e0"  # one write, with the etag it read
    assert google.members("projects/acme-ml", "roles/aiplatform.user") == {OTHER, RUNNER, ALICE}  # bob kept
    assert google.members("projects/acme-ml", "roles/logging.logWriter") == {RUNNER, BUILDER}
    assert google.members("projects/acme-ml", "roles/cloudbuild.builds.editor") == {OTHER, ALICE}  # bob's kept
    project_roles = {b.role for b in google.policies["projects/acme-ml"].bindings}
    assert not project_roles & {"roles/owner", "roles/editor", "roles/viewer"} and not [r for r in project_roles if "storage" in r]
    repo_name = "projects/acme-ml/locations/europe-west4/repositories/fmnist"
    assert google.members(repo_name, "roles/artifactregistry.reader") == {ALICE}  # the Vertex service agent pulls for jobs
    assert google.members(repo_name, "roles/artifactregistry.writer") == {BUILDER}
    for account, acting in (("fmnist-runner", {ALICE, RUNNER}), ("fmnist-builder", {ALICE})):
        sa_name = f"projects/acme-ml/serviceAccounts/{account}@acme-ml.iam.gserviceaccount.com"
        assert google.members(sa_name, "roles/iam.serviceAccountUser") == acting

    client = storage.Client(project="acme-ml")
    for name in BUCKETS:
        b = client.get_bucket(name)
        assert b.location.lower() == "europe-west4" and b.labels == {"app": "fmnist-gcp"}
        assert b.iam_configuration.uniform_bucket_level_access_enabled and b.iam_configuration.public_access_prevention == "enforced"
        assert bool(b.versioning_enabled) == name.endswith("-models")
        builder = [{"role": "roles/storage.objectViewer", "members": [BUILDER]}] if name.endswith("-dev") else []
        assert sorted(b.get_iam_policy().to_api_repr()["bindings"], key=lambda r: r["role"]) == sorted([
            {"role": "roles/storage.objectUser", "members": sorted([ALICE, RUNNER])},
            {"role": "roles/storage.legacyBucketReader", "members": [ALICE]}, *builder], key=lambda r: r["role"])

    assert pv.plan(s, submitters=["alice@example.com"]) == []
    writes = len(google.calls)
    assert pv.apply(s, submitters=["alice@example.com"]) == []
    assert pv.format_plan([]) == "nothing to change"
    assert not [n for n, _ in google.calls[writes:] if n.startswith(("create", "set", "batch_enable", "delete"))]

    # drift: versioning switched off by hand is planned back on, nothing else
    b = client.get_bucket(BUCKETS[2]); b.versioning_enabled = False; b.patch()
    drift = pv.plan(s, submitters=["alice@example.com"])
    assert [(c.what, c.resource, c.args["settings"]) for c in drift] == [(pv.UPDATE_BUCKET, f"gs://{BUCKETS[2]}", {"versioning": True})]
    pv.apply(s, submitters=["alice@example.com"])
    assert client.get_bucket(BUCKETS[2]).versioning_enabled

    # destroy: refuses a bucket with something in it, touching nothing; --force removes everything apply made
    client.bucket(BUCKETS[1]).blob("exports/x.npz").upload_from_string(b"data")
    with pytest.raises(pv.ProvisionError, match=f"not empty: {BUCKETS[1]}.*--force"):
        pv.destroy(s)
    assert all(client.lookup_bucket(n) for n in BUCKETS) and google.accounts and google.repos
    removed = pv.destroy(s, force=True, submitters=["alice@example.com"])
    assert sorted(c.what for c in removed) == sorted([pv.REVOKE] * 9 + [pv.DELETE_REPOSITORY] + [pv.DELETE_SERVICE_ACCOUNT] * 2
                                                     + [pv.DELETE_BUCKET] * 3)
    assert not any(client.lookup_bucket(n) for n in BUCKETS) and not google.accounts and not google.repos
    assert google.members("projects/acme-ml", "roles/aiplatform.user") == {OTHER}  # only ours revoked
    assert google.members("projects/acme-ml", "roles/logging.logWriter") == set()
    assert google.members("projects/acme-ml", "roles/cloudbuild.builds.editor") == {OTHER}  # alice's revoked, bob's kept
    assert google.members("projects/acme-ml", "roles/cloudquotas.viewer") == set()
    assert pv.destroy(s) == []
    assert {c.what for c in pv.plan(s)} == {pv.CREATE_SERVICE_ACCOUNT, pv.CREATE_BUCKET, pv.CREATE_REPOSITORY, pv.GRANT}


def test_destroy_leaves_a_bucket_apply_did_not_create(gcp_env, google):
    from google.cloud import storage
    from fmnist_gcp.cloud import provision as pv
    client = storage.Client(project="acme-ml")
    client.create_bucket("acme-ml-fmnist-dev", location="europe-west4")  # made by hand, before apply
    try:
        pv.apply(gcp_env)
        assert client.get_bucket("acme-ml-fmnist-dev").iam_configuration.public_access_prevention == "enforced"  # settings adopted
        assert "acme-ml-fmnist-dev" not in [c.resource for c in pv.destroy(gcp_env)]
        assert client.lookup_bucket("acme-ml-fmnist-dev") and not client.lookup_bucket("acme-ml-fmnist-models")
    finally:
        client.bucket("acme-ml-fmnist-dev").delete()


def test_bucket_in_another_region_is_an_error_naming_the_fix(gcp_env, google):
    from google.cloud import storage
    from fmnist_gcp.cloud import provision as pv
    client = storage.Client(project="acme-ml")
    client.create_bucket("acme-ml-fmnist-models", location="US")
    try:
        with pytest.raises(pv.ProvisionError, match="exists in US, not europe-west4.*FMNIST_REGION"):
            pv.plan(gcp_env)
    finally:
        client.bucket("acme-ml-fmnist-models").delete()


def test_new_service_account_not_yet_known_to_iam_is_retried(gcp_env, google, monkeypatch):
    from google.api_core import exceptions
    from fmnist_gcp.cloud import provision as pv
    real, failures = pv.write_policy, []
    def flaky(clients, scope, target, policy):
        if scope == "service_account" and not failures:
            failures.append(target); raise exceptions.BadRequest("Service account does not exist")
        return real(clients, scope, target, policy)
    monkeypatch.setattr(pv, "write_policy", flaky)
    monkeypatch.setattr(pv.time, "sleep", lambda s: None)
    pv.apply(gcp_env, submitters=["alice@example.com"])
    assert failures and pv.plan(gcp_env, submitters=["alice@example.com"]) == []
    pv.destroy(gcp_env, force=True)


STORE = "projects/acme-ml/locations/europe-west4/featureOnlineStores/fmnist_features"


def test_destroy_deletes_the_online_store_publishing_made(gcp_env, google):
    "The Feature Store V2 online store bills by the node-hour: destroy lists it with its views and deletes it (force)."
    from google.api_core import exceptions
    from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient
    from fmnist_gcp.cloud import provision as pv
    pv.apply(gcp_env)
    google.online_stores[STORE] = ["image_stats", "image_embedding"]  # as cloud.features.publish leaves it
    removed = pv.destroy(gcp_env, force=True)
    store = [c for c in removed if c.resource == STORE]
    assert len(store) == 1 and removed[0] is store[0]  # listed, and first: before the runner loses its roles
    assert "node-hour" in store[0].reason and "image_stats, image_embedding" in store[0].reason
    assert "featureOnlineStores/fmnist_features?force=true" in pv.format_plan(removed)
    assert google.requests("delete_feature_online_store") == [{"name": STORE, "force": True}]  # with its views
    assert not google.online_stores
    assert pv.destroy(gcp_env) == []  # gone: nothing left to list
    with pytest.raises(exceptions.NotFound):  # the fake refuses a bad name as Vertex does
        pv.Clients.connect(gcp_env).feature_store.delete_feature_online_store(name=STORE + "x", force=True)
    google.online_stores[STORE] = ["image_stats"]
    with pytest.raises(exceptions.FailedPrecondition):  # and views without force
        FeatureOnlineStoreAdminServiceClient.delete_feature_online_store(None, name=STORE)


def test_submitters_and_the_runner_get_what_their_commands_need():
    "A submitter runs `fmnist run --on vertex`, `submit-training`, `gcp check` and `gcp build`; the runner submits the tuning job."
    from fmnist_gcp.cloud import provision as pv
    s = Settings.from_env(ENV)
    state = pv.desired_state(s, submitters=["alice@example.com"])
    held = lambda who, gs: sorted(g["role"] for g in gs if g["member"] == who)
    assert held(ALICE, state["project_roles"]) == sorted([
        "roles/aiplatform.user",  # jobs, experiments, models, endpoints, the preflight's region probe
        "roles/cloudbuild.builds.editor",  # fmnist gcp build
        "roles/cloudquotas.viewer",  # the preflight's list_quota_infos
        "roles/serviceusage.serviceUsageConsumer"])  # a user's credentials carry the project as quota project
    for bucket in BUCKETS:  # object access and storage.buckets.get (the preflight's probe), on the three buckets only
        assert held(ALICE, state["bucket_roles"][bucket]) == ["roles/storage.legacyBucketReader", "roles/storage.objectUser"]
    assert held(ALICE, state["artifact_registry"]["roles"]) == ["roles/artifactregistry.reader"]  # this repository only
    assert not [g for g in state["project_roles"] if g["role"].startswith(("roles/storage.", "roles/artifactregistry."))]
    # the runner acts as itself (the tuning job 06_automl submits from inside a Vertex job), on its own account only
    assert held(RUNNER, state["service_account"]["roles"]) == ["roles/iam.serviceAccountUser"]
    assert held(RUNNER, state["artifact_registry"]["builder_service_account"]["roles"]) == []
    # the Vertex AI service agent pulls the images, not the runner: no registry role for it
    assert held(RUNNER, state["artifact_registry"]["roles"]) == []
    changes = {c.gcloud for c in pv.all_changes(state, "acme-ml") if c.what == pv.GRANT}
    assert ("gcloud storage buckets add-iam-policy-binding gs://acme-ml-fmnist-models --member=user:alice@example.com "
            "--role=roles/storage.legacyBucketReader") in changes
    assert ("gcloud iam service-accounts add-iam-policy-binding fmnist-runner@acme-ml.iam.gserviceaccount.com --project=acme-ml "
            f"--member={RUNNER} --role=roles/iam.serviceAccountUser") in changes
    assert ("gcloud artifacts repositories add-iam-policy-binding fmnist --location=europe-west4 --project=acme-ml "
            "--member=user:alice@example.com --role=roles/artifactregistry.reader") in changes


def test_the_fake_refuses_what_google_refuses(google):
    "A service account or repository made twice is ALREADY_EXISTS; one deleted twice is NOT_FOUND."
    from google.api_core import exceptions
    from google.cloud import artifactregistry_v1 as ar, iam_admin_v1 as iam
    from google.auth.credentials import AnonymousCredentials
    i, a = iam.IAMClient(credentials=AnonymousCredentials()), ar.ArtifactRegistryClient(credentials=AnonymousCredentials())
    sa = iam.CreateServiceAccountRequest(name="projects/acme-ml", account_id="x")
    i.create_service_account(request=sa)
    with pytest.raises(exceptions.AlreadyExists): i.create_service_account(request=sa)
    i.delete_service_account(request={"name": "projects/acme-ml/serviceAccounts/x@acme-ml.iam.gserviceaccount.com"})
    with pytest.raises(exceptions.NotFound): i.delete_service_account(request={"name": "projects/acme-ml/serviceAccounts/x@acme-ml.iam.gserviceaccount.com"})
    req = ar.CreateRepositoryRequest(parent="projects/acme-ml/locations/europe-west4", repository_id="r")
    a.create_repository(request=req)
    with pytest.raises(exceptions.AlreadyExists): a.create_repository(request=req)
    a.delete_repository(request={"name": "projects/acme-ml/locations/europe-west4/repositories/r"})
    with pytest.raises(exceptions.NotFound): a.delete_repository(request={"name": "projects/acme-ml/locations/europe-west4/repositories/r"})


def test_apply_and_destroy_meeting_503s_make_and_remove_each_thing_once(gcp_env, google, capsys, monkeypatch):
    "One 503 on each kind of call, refused or made with its answer lost: apply ends with what a clean apply makes, destroy removes it."
    from google.api_core.exceptions import ServiceUnavailable
    from fmnist_gcp.cloud import provision as pv
    monkeypatch.setenv("FMNIST_RETRY_INITIAL_S", "0.01"); monkeypatch.setenv("FMNIST_RETRY_MAX_S", "0.02")
    down = lambda: ServiceUnavailable("The service is currently unavailable.")
    google.faults = {"batch_get_services": [(down(), False)], "batch_enable_services": [(down(), True)],
                     "create_service_account": [(down(), True)], "create_repository": [(down(), False)],
                     "set_iam_policy": [(down(), True)]}
    made = pv.apply(gcp_env, submitters=["alice@example.com"])
    assert {c.what for c in made} == {pv.ENABLE_API, pv.CREATE_SERVICE_ACCOUNT, pv.CREATE_BUCKET, pv.CREATE_REPOSITORY, pv.GRANT}
    assert len(google.requests("create_service_account")) == 3  # the runner's twice (made, answer lost), the builder's once
    assert len(google.accounts) == 2 and len(google.repos) == 1 and len(google.requests("create_repository")) == 1  # the refused one made nothing
    assert google.members("projects/acme-ml", "roles/aiplatform.user") == {OTHER, RUNNER, ALICE}
    err = capsys.readouterr().err
    runner = "projects/acme-ml/serviceAccounts/fmnist-runner@acme-ml.iam.gserviceaccount.com"
    for line in ("API states read: attempt 2 of 12 after 503 UNAVAILABLE", "API enable: done on attempt 2",
                 "create service account fmnist-runner@acme-ml.iam.gserviceaccount.com: attempt 2 found it made by an earlier attempt",
                 "create repository europe-west4-docker.pkg.dev/acme-ml/fmnist: done on attempt 2"):
        assert line in err, err
    assert re.search(r"IAM policy update of \S+: done on attempt 2", err), err
    assert pv.plan(gcp_env, submitters=["alice@example.com"]) == []  # nothing missing, nothing made twice

    google.faults = {"delete_service_account": [(down(), True)], "delete_repository": [(down(), False)]}
    removed = pv.destroy(gcp_env, force=True, submitters=["alice@example.com"])
    assert pv.DELETE_SERVICE_ACCOUNT in {c.what for c in removed} and not google.accounts and not google.repos
    err = capsys.readouterr().err
    assert f"delete service account {runner}: attempt 2 found it gone: an earlier attempt deleted it" in err, err
    assert "delete repository projects/acme-ml/locations/europe-west4/repositories/fmnist: done on attempt 2" in err, err
