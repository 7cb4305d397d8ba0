"""Transient Google errors (issue 22) on the paths `fmnist run --on vertex` takes: a job create that meets 503 or 429
(made on the server or not) ends with exactly one job; a 503 past the deadline is one line and exit 1; a job that
ends FAILED is one line with its error message; Ctrl-C while following marks the local run interrupted and prints the
cancel command. The Job service is tests/fakes.py's, with the list call and injected faults added here."""
import json
import os
import re
import uuid
from pathlib import Path

import pytest

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # see test_cloud_runs.py

from fakes import FakeJobService  # noqa: E402
from fmnist_gcp.config import Settings  # noqa: E402

VERTEX = {"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
          "FMNIST_SERVICE_ACCOUNT": "sa@acme-ml.iam.gserviceaccount.com"}
IMAGE = "europe-west4-docker.pkg.dev/acme-ml/fmnist/train:t1"
_CLAUSE = re.compile(r'labels\.([a-z][a-z0-9_-]*)="([a-z0-9_-]*)"')


class FlakyJobService(FakeJobService):
    """FakeJobService with ListCustomJobs (a `labels.k="v" AND ...` filter; anything else is INVALID_ARGUMENT, as
    Vertex answers a filter it cannot parse) and `faults`: errors the next creates raise, before the job is made or,
    with `made`, after (the answer lost on the way back)."""
    def __init__(self, faults=(), made=False, **kw):
        super().__init__(**kw)
        self.faults, self.made, self.lists, self.sent = list(faults), made, [], 0

    def create_custom_job(self, client, parent, custom_job, timeout=None, **kw):
        self.sent += 1
        if self.faults and not self.made: raise self.faults.pop(0)
        out = super().create_custom_job(client, parent, custom_job, timeout, **kw)
        if self.faults: raise self.faults.pop(0)
        return out

    def list_custom_jobs(self, client, request=None, **kw):
        from google.api_core.exceptions import InvalidArgument
        request = request or kw
        flt = request.get("filter", "") if isinstance(request, dict) else request.filter
        clauses = flt.split(" AND ") if flt else []
        pairs = [_CLAUSE.fullmatch(c) for c in clauses]
        if not all(pairs): raise InvalidArgument(f"Unsupported filter: {flt!r}")
        self.lists.append(flt)
        return [self._types.CustomJob(j) for j in self.jobs.values() if all(j.labels.get(m[1]) == m[2] for m in pairs)]

    def patch(self):
        from unittest import mock
        from google.cloud.aiplatform.compat.services import job_service_client
        c = job_service_client.JobServiceClient
        return mock.patch.multiple(c, create_custom_job=mock.create_autospec(c.create_custom_job, side_effect=self.create_custom_job),
                                   get_custom_job=mock.create_autospec(c.get_custom_job, side_effect=self.get_custom_job),
                                   list_custom_jobs=mock.create_autospec(c.list_custom_jobs, side_effect=self.list_custom_jobs))


@pytest.fixture
def vertex(monkeypatch, gcs_emulator, tmp_path):
    "Anonymous credentials, no metadata server, stores in the GCS emulator, a fast retry policy."
    import google.auth
    from google.auth import credentials as auth_credentials
    for k, v in {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1", "STORAGE_EMULATOR_HOST": gcs_emulator,
                 "FMNIST_RETRY_INITIAL_S": "0.01", "FMNIST_RETRY_MAX_S": "0.02"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (auth_credentials.AnonymousCredentials(), "acme-ml"))
    prefix = f"gs://fmnist-test/{uuid.uuid4().hex[:8]}"
    env = {**VERTEX, **{f"FMNIST_{r.upper()}_BUCKET": f"{prefix}/{r}" for r in ("dev", "datasets", "models")},
           "FMNIST_RUNS_DIR": str(tmp_path / "runs")}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    return Settings.from_env(env)


def _unavailable(): from google.api_core.exceptions import ServiceUnavailable; return ServiceUnavailable("The service is currently unavailable.")

def _quota(delay="0.05s"):
    from google.api_core.exceptions import TooManyRequests
    return TooManyRequests("Quota exceeded", details=[{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}])


def test_the_fake_refuses_a_filter_vertex_cannot_parse():
    from google.api_core.exceptions import InvalidArgument
    from google.cloud.aiplatform_v1.types import ListCustomJobsRequest
    with pytest.raises(InvalidArgument, match="Unsupported filter"):
        FlakyJobService().list_custom_jobs(None, ListCustomJobsRequest(filter="labels.app = fmnist OR true"))


@pytest.mark.parametrize("fault,made", [(_unavailable, True), (_unavailable, False), (_quota, True), (_quota, False)],
                         ids=["503-made", "503-not-made", "429-made", "429-not-made"])
def test_a_job_create_that_meets_a_transient_error_makes_exactly_one_job(vertex, capsys, fault, made):
    from fmnist_gcp.cloud.runs import run_job_spec, submit_run
    fake = FlakyJobService([fault()], made=made)
    with fake.patch():
        job = submit_run(vertex, run_job_spec(vertex, IMAGE, profile="smoke", run_id="r1"))
    assert len(fake.jobs) == len(fake.created) == 1 and job.resource_name == next(iter(fake.jobs))
    assert fake.sent == (1 if made else 2)  # made: adopted, not sent again
    assert fake.lists == ['labels.app="fmnist-gcp" AND labels.fmnist-stage="run" AND labels.fmnist-run="r1"']
    err = capsys.readouterr().err
    reason = "503 UNAVAILABLE" if fault is _unavailable else "429 RESOURCE_EXHAUSTED, in 0.1 s"  # the RetryInfo delay
    assert f"job create: attempt 2 of 12 after {reason}" in err, err
    assert ("job create: adopted what attempt 1 made" in err) == made and ("job create: done on attempt 2" in err) != made


def test_a_503_past_the_deadline_is_one_line_and_exit_1(vertex, capsys, monkeypatch):
    from fmnist_gcp import cli
    monkeypatch.setenv("FMNIST_RETRY_DEADLINE_S", "0.2")
    fake = FlakyJobService([_unavailable() for _ in range(1000)])
    with fake.patch():
        rc = cli.main(["run", "--on", "vertex", "--no-check", "--image", IMAGE, "--run-id", "r1", "--profile", "smoke"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and fake.jobs == {}
    assert "Traceback" not in "\n".join(err)
    assert re.fullmatch(r"fmnist run: error: Vertex AI: job create still failing after \d+ attempts in 0 s \(503 UNAVAILABLE: "
                        r"The service is currently unavailable\.\): wait a few minutes .*FMNIST_RETRY_DEADLINE_S waits longer", err[-1]), err[-1]


def _failing(job):
    job.error = {"code": 3, "message": "The replica workerpool0-0 exited with a non-zero status of 1."}


def test_a_job_that_ends_failed_is_one_line_with_its_error_message_and_logs(vertex, capsys):
    from fmnist_gcp import cli
    fake = FlakyJobService(end="JOB_STATE_FAILED", on_end=_failing)
    from fmnist_gcp.cloud import runs
    with fake.patch(), pytest.MonkeyPatch.context() as mp:
        follow = runs.wait_for_run
        mp.setattr(runs, "wait_for_run", lambda job, poll_s, log: follow(job, 0, log))  # no 30 s between reads
        rc = cli.main(["run", "--on", "vertex", "--no-check", "--image", IMAGE, "--run-id", "r1", "--profile", "smoke"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1, last
    assert last.startswith("fmnist run: error: job fmnist-run-r1 (projects/acme-ml/locations/europe-west4/customJobs/1) ended FAILED: "
                           "The replica workerpool0-0 exited with a non-zero status of 1.; logs: https://console.cloud.google.com/logs/query;"), last
    assert "resource.labels.job_id%3D%221%22" in last
    run = json.loads((Path(vertex.runs_dir) / "r1" / "run.json").read_text())
    assert run["status"] == "failed" and run["job"].endswith("/customJobs/1")


def test_ctrl_c_while_following_prints_the_cancel_command_and_marks_the_run_interrupted(vertex, capsys):
    from fmnist_gcp import cli
    fake = FlakyJobService()
    reads = []
    def get(client, name, **kw):
        reads.append(name)
        if len(reads) == 2: raise KeyboardInterrupt
        return FakeJobService.get_custom_job(fake, client, name, **kw)
    fake.get_custom_job = get
    from fmnist_gcp.cloud import runs
    with fake.patch(), pytest.MonkeyPatch.context() as mp:
        follow = runs.wait_for_run
        mp.setattr(runs, "wait_for_run", lambda job, poll_s, log: follow(job, 0, log))
        rc = cli.main(["run", "--on", "vertex", "--no-check", "--image", IMAGE, "--run-id", "r1", "--profile", "smoke"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 130
    assert "stopped following projects/acme-ml/locations/europe-west4/customJobs/1; it runs on in Vertex AI: cancel it with " \
           "`gcloud ai custom-jobs cancel 1 --region=europe-west4 --project=acme-ml`" in last, last
    run = json.loads((Path(vertex.runs_dir) / "r1" / "run.json").read_text())
    assert run["status"] == "interrupted" and run["interrupted_by"] == "SIGINT"
    from fmnist_gcp.pipeline.runs import list_runs
    assert [m["status"] for m in list_runs(vertex.runs_dir)] == ["interrupted"]
