"""The fake Vertex AI REST service itself (tests/vertex_fake.py): the SDK reaches it over REST with the credentials made
in the test, it refuses what Vertex refuses with Google's error shape (the real api-core exceptions), keeps jobs and
operations unfinished over several polls, answers 501 for what it does not model, and injects faults on request."""
import pytest

from fmnist_gcp.config import Settings
from vertex_fake import LOC

MODEL = f"{LOC}/models/456"
POOL = {"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1, "container_spec": {"image_uri": "img:1"}}


def client(fake, name):
    "The v1 gapic client `name` on the REST transport, pointed at the fake as the package points its own."
    from google.cloud import aiplatform_v1
    from fmnist_gcp.cloud.vertex import vertex_client_options
    return getattr(aiplatform_v1, name)(transport="rest", client_options=vertex_client_options(Settings.from_env(fake.env)))


def test_the_sdk_reaches_the_fake_over_rest_with_the_key_made_here(vertex_rest):
    import requests
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.auth.transport.requests import Request
    from google.cloud import aiplatform
    from google.oauth2 import service_account
    from fmnist_gcp.cloud.vertex import vertex_init
    fake = vertex_rest
    fake.seed_model(MODEL, "fmnist-cnn")
    vertex_init(Settings.from_env(fake.env))
    assert aiplatform.Model(MODEL).display_name == "fmnist-cnn"
    (r,) = fake.requests  # over REST (a gRPC call would never reach an HTTPS server), to the fake, authorised
    assert (r.method, r.path, r.status) == ("GET", f"/v1/{MODEL}", 200)
    assert google.auth.default()[0].service_account_email == fake.email
    # no credentials: Google's 401 in its error shape
    bare = requests.get(f"https://{fake.host}/v1/{MODEL}", timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["status"] == "UNAUTHENTICATED"
    # the key's token_uri is the fake's: an access token for the key's signed assertion, and requests made with it pass
    creds = service_account.Credentials.from_service_account_file(fake.key_file, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    creds.refresh(Request())
    assert creds.token in fake.tokens
    ok = requests.get(f"https://{fake.host}/v1/{MODEL}", headers={"Authorization": f"Bearer {creds.token}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["versionAliases"] == ["default"]
    # an assertion signed by another key is refused, as Google's token endpoint refuses it
    from vertex_fake import make_service_account_key
    other = fake.folder / "other.json"
    make_service_account_key(other, fake.token_uri)
    with pytest.raises(auth_exceptions.RefreshError, match="invalid_grant"):
        service_account.Credentials.from_service_account_file(other, scopes=["https://www.googleapis.com/auth/cloud-platform"]).refresh(Request())


def test_a_method_the_fake_does_not_model_answers_501_and_fails_the_test(vertex_rest):
    from google.api_core.exceptions import MethodNotImplemented
    fake = vertex_rest
    fake.seed_model(MODEL, "fmnist-cnn")
    with pytest.raises(MethodNotImplemented, match="not modelled by the Vertex fake"):
        client(fake, "ModelServiceClient").delete_model(name=MODEL)
    assert [(r.method, r.path) for r in fake.unmodelled()] == [("DELETE", f"/v1/{MODEL}")]  # what the fixture's finaliser fails on
    fake.requests.clear()  # seen here on purpose: let the finaliser pass


def test_the_model_service_refuses_and_keeps_aliases_as_vertex_does(vertex_rest):
    from google.api_core.exceptions import BadRequest, NotFound
    from google.cloud.aiplatform_v1 import types
    fake, models = vertex_rest, client(vertex_rest, "ModelServiceClient")
    image = {"image_uri": "img:1"}
    with pytest.raises(BadRequest, match=r"model\.display_name; Message: Required field is not set"):
        models.upload_model(parent=LOC, model=types.Model(container_spec=image))
    with pytest.raises(BadRequest, match=r"model\.container_spec\.image_uri; Message: Required"):
        models.upload_model(parent=LOC, model=types.Model(display_name="m"))
    with pytest.raises(BadRequest, match="alias 'Champion_1' does not match"):
        models.upload_model(parent=LOC, model=types.Model(display_name="m", container_spec=image, version_aliases=["Champion_1"]))
    with pytest.raises(NotFound):
        models.upload_model(request=types.UploadModelRequest(parent=LOC, parent_model=MODEL, model=types.Model(display_name="m", container_spec=image)))
    assert fake.models == {}
    op = models.upload_model(parent=LOC, model=types.Model(display_name="m", container_spec=image))
    assert op.done() is False  # the first poll: not done
    name = op.result().model
    assert (op.done(), op.result().model_version_id) == (True, "1")
    assert list(models.get_model(name=name).version_aliases) == ["default"]  # version 1 always carries default
    def version(*aliases):
        return models.upload_model(request=types.UploadModelRequest(parent=LOC, parent_model=name, model=types.Model(
            display_name="m", container_spec=image, version_aliases=list(aliases)))).result()
    v2 = version("challenger")
    assert models.get_model(name=name).version_id == "1"  # not asked for default: v1 keeps it
    assert list(models.get_model(name=f"{name}@{v2.model_version_id}").version_aliases) == ["challenger"]
    version("default", "challenger")
    got = {v.version_id: sorted(v.version_aliases) for v in models.list_model_versions(name=name)}
    assert got == {"1": [], "2": [], "3": ["challenger", "default"]}  # aliases moved to the new version
    models.merge_version_aliases(name=f"{name}@1", version_aliases=["champion"])
    with pytest.raises(BadRequest, match="default alias cannot be removed"):
        models.merge_version_aliases(name=f"{name}@3", version_aliases=["-default"])
    assert models.get_model(name=f"{name}@champion").version_id == "1"
    with pytest.raises(BadRequest, match="Unsupported filter"):
        list(models.list_models(request=types.ListModelsRequest(parent=LOC, filter="display_name~m")))


def test_jobs_and_operations_finish_over_several_polls(vertex_rest):
    from google.cloud.aiplatform_v1 import types
    fake, jobs = vertex_rest, client(vertex_rest, "JobServiceClient")
    made = jobs.create_custom_job(parent=LOC, custom_job=types.CustomJob(display_name="j", job_spec={"worker_pool_specs": [POOL]}))
    states = [made.state.name] + [jobs.get_custom_job(name=made.name).state.name for _ in range(4)]
    assert states == ["JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED", "JOB_STATE_SUCCEEDED"]
    fake.job_end = "JOB_STATE_FAILED"
    failed = jobs.create_custom_job(parent=LOC, custom_job=types.CustomJob(display_name="j", job_spec={"worker_pool_specs": [POOL]}))
    for _ in range(3): got = jobs.get_custom_job(name=failed.name)
    assert got.state.name == "JOB_STATE_FAILED" and "non-zero status" in got.error.message
    eps = client(fake, "EndpointServiceClient")
    op = eps.create_endpoint(parent=LOC, endpoint=types.Endpoint(display_name="e"))
    polls = [op.done() for _ in range(2)]
    assert polls == [False, True] and op.result().display_name == "e"
    assert [r.path.startswith(("/ui/", "/v1/")) and "/operations/" in r.path for r in fake.calls("GET", "*/operations/*")] == [True, True]


def test_a_predict_request_over_the_payload_limit_is_refused(vertex_rest):
    "200 raw 28x28 images as the SDK's REST transport sends them: over the 1.5 MB limit of a public endpoint."
    from google.api_core.exceptions import BadRequest
    from google.protobuf import json_format, struct_pb2
    fake = vertex_rest
    instances = [json_format.ParseDict([[255] * 28] * 28, struct_pb2.Value()) for _ in range(200)]
    with pytest.raises(BadRequest, match="Request payload size exceeds the limit: 1572864 bytes"):
        client(fake, "PredictionServiceClient").predict(endpoint=f"{LOC}/endpoints/1", instances=instances)
    assert fake.requests[-1].status == 400


def test_faults_are_injected_on_the_matching_requests(vertex_rest):
    from google.api_core.exceptions import ServiceUnavailable, TooManyRequests
    from google.cloud.aiplatform_v1 import types
    fake, jobs = vertex_rest, client(vertex_rest, "JobServiceClient")
    job = types.CustomJob(display_name="j", job_spec={"worker_pool_specs": [POOL]})
    fake.inject(method="POST", path_glob="*/customJobs", status=503, times=2)
    for _ in range(2):
        with pytest.raises(ServiceUnavailable, match="injected 503"):
            jobs.create_custom_job(parent=LOC, custom_job=job)
    assert fake.jobs == {}  # refused before it was applied
    made = jobs.create_custom_job(parent=LOC, custom_job=job)  # the third goes through
    assert [(r.status, r.injected) for r in fake.calls("POST", "*/customJobs")] == [(503, True), (503, True), (200, False)]
    jobs.get_custom_job(name=made.name)  # a get does not match the glob: not injected
    # a create that happened on the server but answered 503
    fake.inject(method="POST", path_glob="*/customJobs", status=503, after_apply=True)
    with pytest.raises(ServiceUnavailable):
        jobs.create_custom_job(parent=LOC, custom_job=job)
    assert len(fake.jobs) == 2
    # quota: 429 RESOURCE_EXHAUSTED with a RetryInfo detail
    fake.inject(method="GET", path_glob="*/customJobs/*", status=429, retry_delay_s=1)
    with pytest.raises(TooManyRequests) as e:
        jobs.get_custom_job(name=made.name)
    assert e.value.details == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]
    assert fake.requests[-1].injected and fake.requests[-1].status == 429
