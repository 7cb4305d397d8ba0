"""`fmnist gcp build` on Cloud Build: the build context uploaded into the dev bucket (a GCS emulator) and the request
sent to a patched `CloudBuildClient` (anonymous credentials; nothing reaches Google)."""
import io
import re
import tarfile

import pytest

from conftest import ROOT, VERTEX_ENV
from fmnist_gcp.cloud.build import DOCKERFILE, build_images, git_tag
from fmnist_gcp.config import Settings


@pytest.fixture
def recorded_builds(monkeypatch, anonymous):
    "CloudBuildClient.create_build records its requests and returns an operation that has finished."
    from google.cloud.devtools import cloudbuild_v1
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    class Sent(list): waits: list = []
    sent = Sent()

    class Done:
        def __init__(self, build): self.build, self.waits = build, []
        def result(self, timeout=None, **k):  # api-core's Operation.result: timeout is the polling deadline (900 s if None)
            self.waits.append(timeout); sent.waits = self.waits
            return cloudbuild_v1.Build(id="b-1", status="SUCCESS", images=self.build.images)

    def create_build(self, request=None, **kw):
        sent.append(cloudbuild_v1.CreateBuildRequest(request))
        return Done(sent[-1].build)
    monkeypatch.setattr(cloudbuild_v1.CloudBuildClient, "create_build", create_build)
    return sent


def test_build_uploads_the_context_to_the_dev_bucket_and_builds_each_target(gcs_emulator, monkeypatch, recorded_builds):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = Settings.from_env({**VERTEX_ENV, "FMNIST_DEV_BUCKET": "gs://fmnist-test/build-dev"})
    uris = build_images(s, ["train", "train-gpu", "serve"], log=lambda *a: None)
    tag = git_tag(ROOT)
    assert uris == {t: f"europe-west4-docker.pkg.dev/acme-ml/fmnist/{t}:{tag}" for t in ("train", "train-gpu", "serve")}

    (req,) = recorded_builds
    assert req.parent == "projects/acme-ml/locations/global" and req.project_id == "acme-ml"  # FMNIST_BUILD_REGION's default
    b = req.build
    assert (b.source.storage_source.bucket, b.source.storage_source.object_) == ("fmnist-test", f"build-dev/cloudbuild/source/{tag}.tgz")
    assert [(st.id, st.name, list(st.args)) for st in b.steps] == [
        (t, "gcr.io/cloud-builders/docker", ["build", "-f", DOCKERFILE, "--target", t, "-t", uris[t], "."]) for t in uris]
    assert list(b.images) == list(uris.values()) and list(b.tags)[:-1] == ["fmnist-gcp", "train", "train-gpu", "serve"]
    assert re.fullmatch(r"fmnist-once-[0-9a-f]{12}", b.tags[-1])  # this create's own tag: a retry's lookup finds it by that
    assert b.options.logging.name == "CLOUD_LOGGING_ONLY" and b.timeout.total_seconds() == 3600
    # the builder account `fmnist gcp apply` creates, not the Compute Engine default (CLOUD_LOGGING_ONLY is required with it)
    assert b.service_account == "projects/acme-ml/serviceAccounts/fmnist-builder@acme-ml.iam.gserviceaccount.com"

    # the uploaded context is the checkout minus .dockerignore: what the Dockerfile copies, no venv, runs or git
    with tarfile.open(fileobj=io.BytesIO(s.dev.read_bytes(f"cloudbuild/source/{tag}.tgz"))) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "README.md", DOCKERFILE, "fmnist_gcp/__init__.py", "fmnist_gcp/serving.py"} <= names
    assert not [n for n in names if n.split("/")[0] in (".venv", ".git", "runs") or "__pycache__" in n]


def test_a_local_dev_store_cannot_feed_cloud_build(fmnist_env, recorded_builds):
    from fmnist_gcp.config import ConfigError
    s = Settings.from_env({**VERTEX_ENV, "FMNIST_DEV_BUCKET": "gs://x"})
    s = Settings(**{**s.__dict__, "buckets": {**s.buckets, "dev": fmnist_env["FMNIST_HOME"]}})
    with pytest.raises(ConfigError, match="or build with --local"):
        build_images(s, ["serve"], tag="t", log=lambda *a: None)
    assert recorded_builds == []


def test_cloud_build_runs_in_the_build_region_and_waits_as_long_as_the_build_may_run(monkeypatch, recorded_builds):
    "Many new projects may build only in six regions or `global`; op.result() alone gives up after 15 minutes."
    from fmnist_gcp.cloud.build import build_config, submit_build
    uris = {"train-gpu": "europe-west4-docker.pkg.dev/acme-ml/fmnist/train-gpu:t"}
    build = build_config(uris, "gs://acme-ml-fmnist-dev/build/t.tgz", timeout_s=5400)
    for env, location in (({}, "global"), ({"FMNIST_BUILD_REGION": "us-central1"}, "us-central1")):
        submit_build(Settings.from_env({**VERTEX_ENV, **env}), build)
        assert recorded_builds[-1].parent == f"projects/acme-ml/locations/{location}"
        assert list(recorded_builds[-1].build.images) == list(uris.values())  # images still go to the region's registry
        (wait,) = recorded_builds.waits
        assert wait is not None and wait >= 5400 + 60  # the build's own timeout and a margin for its queue, not 900 s


def test_a_build_region_cloud_build_may_refuse_is_a_config_error():
    from fmnist_gcp.config import ConfigError
    with pytest.raises(ConfigError, match="FMNIST_BUILD_REGION='europe-west4'.*us-central1.*global"):
        Settings.from_env({**VERTEX_ENV, "FMNIST_BUILD_REGION": "europe-west4"})
    assert Settings.from_env({**VERTEX_ENV, "FMNIST_BUILD_REGION": "Europe-West1"}).build_region == "europe-west1"


def test_a_failed_build_is_one_line_with_its_status_and_logs(monkeypatch, anonymous):
    "A build that fails ends its operation with an error (api-core raises it from result()); its metadata holds the Build."
    from google.api_core import exceptions as gexc
    from google.cloud.devtools import cloudbuild_v1
    from fmnist_gcp.cloud.build import BuildFailed, build_config, submit_build
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    logs = "https://console.cloud.google.com/cloud-build/builds;region=global/b-9?project=123"

    class Failed:  # what api-core's Operation gives for a failed build: result() raises, metadata holds the Build
        metadata = cloudbuild_v1.BuildOperationMetadata(build=cloudbuild_v1.Build(
            id="b-9", status="FAILURE", log_url=logs, status_detail="step serve: exit status 1"))
        def result(self, timeout=None, **k): raise gexc.Unknown("Build failed; check build logs for details")
    monkeypatch.setattr(cloudbuild_v1.CloudBuildClient, "create_build", lambda self, request=None, **kw: Failed())
    build = build_config({"serve": "europe-west4-docker.pkg.dev/acme-ml/fmnist/serve:t"}, "gs://acme-ml-fmnist-dev/b/t.tgz")
    with pytest.raises(BuildFailed) as e:
        submit_build(Settings.from_env(VERTEX_ENV), build)
    msg = str(e.value)
    assert "\n" not in msg and "b-9" in msg and "FAILURE" in msg and "step serve: exit status 1" in msg and logs in msg, msg
    assert isinstance(e.value, ValueError)  # the CLI prints it as one line, no traceback


class FlakyCloudBuild:
    """CloudBuildClient's create_build, list_builds and get_build on one in-memory project: `faults` are errors the next
    creates raise, before the build is made or (made) after, the answer lost; a made build runs for `runs` reads.
    list_builds takes Cloud Build's filter of `tags="..."` terms (AND); anything else is INVALID_ARGUMENT."""
    def __init__(self, faults=(), made=False, runs=2):
        self.faults, self.made, self.runs, self.builds, self.sent, self.lists, self.reads = list(faults), made, runs, {}, 0, [], 0

    def patch(self, monkeypatch):
        from google.cloud.devtools import cloudbuild_v1
        C = cloudbuild_v1.CloudBuildClient
        for n in ("create_build", "list_builds", "get_build"):
            monkeypatch.setattr(C, n, lambda client, request=None, _n=n, **kw: getattr(self, _n)(request))
        return self

    def create_build(self, request):
        from google.cloud.devtools import cloudbuild_v1
        self.sent += 1
        if self.faults and not self.made: raise self.faults.pop(0)
        b = cloudbuild_v1.Build(request["build"], id=f"b-{len(self.builds) + 1}", project_id=request["project_id"], status="QUEUED",
                                log_url="https://console.cloud.google.com/cloud-build/builds/x")
        self.builds[b.id] = b
        if self.faults: raise self.faults.pop(0)
        done = cloudbuild_v1.Build(b, status="SUCCESS")
        return type("Op", (), {"result": lambda op, timeout=None: done, "metadata": None})()

    def list_builds(self, request):
        from google.api_core.exceptions import InvalidArgument
        terms = request["filter"].split(" AND ")
        tags = [re.fullmatch(r'tags="([\w][\w.-]{0,127})"', t) for t in terms]
        if not all(tags): raise InvalidArgument(f"invalid filter: {request['filter']!r}")
        self.lists.append(request["filter"])
        return [b for b in self.builds.values() if all(t[1] in b.tags for t in tags)]

    def get_build(self, request):
        from google.api_core.exceptions import NotFound
        if request["id"] not in self.builds: raise NotFound(f"build {request['id']} not found")
        self.reads += 1
        b = self.builds[request["id"]]
        if self.reads >= self.runs: b.status = "SUCCESS"
        return b


def test_the_build_fake_refuses_a_filter_cloud_build_cannot_parse():
    from google.api_core.exceptions import InvalidArgument
    with pytest.raises(InvalidArgument, match="invalid filter"):
        FlakyCloudBuild().list_builds({"filter": "tags=fmnist-gcp OR true"})


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made"])
def test_a_build_create_meeting_a_503_makes_one_build(monkeypatch, anonymous, capsys, made):
    from google.api_core.exceptions import ServiceUnavailable
    from fmnist_gcp.cloud import build as B
    for k, v in {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1", "FMNIST_RETRY_INITIAL_S": "0.01",
                 "FMNIST_RETRY_MAX_S": "0.02"}.items(): monkeypatch.setenv(k, v)
    monkeypatch.setattr(B, "BUILD_POLL_S", 0.001)
    fake = FlakyCloudBuild([ServiceUnavailable("The service is currently unavailable.")], made=made).patch(monkeypatch)
    build = B.build_config({"serve": "europe-west4-docker.pkg.dev/acme-ml/fmnist/serve:t"}, "gs://acme-ml-fmnist-dev/b/t.tgz")
    out = B.submit_build(Settings.from_env(VERTEX_ENV), build)
    (b,) = fake.builds.values()  # exactly one build
    assert out.id == b.id and out.status.name == "SUCCESS" and fake.sent == (1 if made else 2)
    (tag,) = [t for t in b.tags if t.startswith("fmnist-once-")]
    assert fake.lists == [f'tags="{tag}"']  # the lookup before the retry, by this create's own tag
    assert fake.reads == (fake.runs if made else 0)  # adopted: followed by reads until it ended
    err = capsys.readouterr().err
    assert "build create: attempt 2 of 12 after 503 UNAVAILABLE" in err
    assert (f"build create: adopted what attempt 1 made ({b.id}); not made again" in err) == made and ("build create: done on attempt 2" in err) != made
