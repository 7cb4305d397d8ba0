"""Transient Google errors (issue 22) on the fake Vertex REST service: the real SDK over REST, 503 UNAVAILABLE and 429
RESOURCE_EXHAUSTED (with a RetryInfo delay) injected on the job create, the model upload, the endpoint create and the
deploy, each refused before it was applied or applied with its answer lost. Each command succeeds with exactly one
resource on the fake and the attempts in its log; a 503 past the deadline is one line and exit 1; a job that ends
FAILED is one line with its error message. The fake's list filters refuse what Vertex cannot parse."""
import re

import pytest

from fmnist_gcp.config import DEFAULT_MODEL, Settings
from vertex_fake import LOC

MODEL = f"{LOC}/models/456"
IMAGE = "europe-docker.pkg.dev/acme-ml/fmnist/train:1"
DELAY_S = 0.3  # the RetryInfo delay a 429 carries: longer than any backoff the fast policy below would wait
FAULTS = [(503, False), (503, True), (429, False), (429, True)]
IDS = ["503-not-made", "503-made", "429-not-made", "429-made"]


@pytest.fixture
def fake(vertex_rest, monkeypatch):
    "The fake Vertex service holding MODEL (made elsewhere), and a fast retry policy (backoff 10-20 ms)."
    monkeypatch.setenv("FMNIST_RETRY_INITIAL_S", "0.01")
    monkeypatch.setenv("FMNIST_RETRY_MAX_S", "0.02")
    vertex_rest.seed_model(MODEL, DEFAULT_MODEL)
    return vertex_rest


def inject(fake, method, glob, status, made):
    fake.inject(method, glob, status, retry_delay_s=DELAY_S if status == 429 else None, after_apply=made)


def check_attempts(fake, err, what, method, glob, status, made):
    "The log names attempt 2 and why; a made create is adopted, not sent again; a 429's delay was waited."
    sent = fake.calls(method, glob)
    assert [(r.status, r.injected) for r in sent] == [(status, True)] + ([] if made else [(200, False)])
    reason = {503: "503 UNAVAILABLE", 429: f"429 RESOURCE_EXHAUSTED, in {DELAY_S:.1f} s"}[status]
    assert f"{what}: attempt 2 of 12 after {reason}" in err, err
    assert (f"{what}: adopted what attempt 1 made" in err) == made and (f"{what}: done on attempt 2" in err) != made, err
    if status == 429:  # the next request (the lookup) waited the service's delay, not the 10-20 ms backoff
        after = next(r for r in fake.requests if r.at > sent[0].at)
        assert after.at - sent[0].at >= DELAY_S * 0.95, after.at - sent[0].at


@pytest.mark.parametrize("status,made", FAULTS, ids=IDS)
def test_submit_training_meeting_a_transient_error_makes_one_job(fake, capsys, status, made):
    from fmnist_gcp import cli
    inject(fake, "POST", f"/v1/{LOC}/customJobs", status, made)
    rc = cli.main(["submit-training", "--no-check", "--image", IMAGE, "--", "--epochs", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (job,) = fake.jobs  # exactly one job on the service
    assert out.strip() == f"submitted {job}"
    (listed,) = fake.calls("GET", f"/v1/{LOC}/customJobs")  # the lookup before the retry, by the create's labels
    labels = fake.jobs[job]["labels"]
    assert listed.query["filter"] == " AND ".join(f'labels.{k}="{labels[k]}"' for k in ("app", "fmnist-stage", "fmnist-run"))
    assert labels["fmnist-stage"] == "train"
    check_attempts(fake, err, "job create", "POST", f"/v1/{LOC}/customJobs", status, made)


@pytest.fixture
def bucketed(fake, gcs_emulator, monkeypatch, tmp_path):
    "Settings whose models store is a fresh folder of the storage emulator's bucket, with version 1 registered."
    from fmnist_gcp.registry import Registry
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = Settings.from_env({**fake.env, "FMNIST_MODELS_BUCKET": f"gs://fmnist-test/models-{tmp_path.name}"})
    reg = Registry(s, DEFAULT_MODEL)
    st = reg.version_store(1)
    st.write_json("metadata.json", {"run_id": "r1"}); st.write_json("evaluation.json", {"metrics": {"au_prc": 0.97}})
    reg.register(1)
    return s


def uploads(fake) -> list[dict]:
    "Every model version on the fake that an upload of version 1 of run r1 made."
    return [v for vs in fake.models.values() for v in vs
            if v.get("labels", {}).get("fmnist-run") == "r1" and v["labels"].get("fmnist-version") == "1"]


@pytest.mark.parametrize("status,made", FAULTS, ids=IDS)
def test_a_model_upload_meeting_a_transient_error_makes_one_model_version(fake, bucketed, capsys, status, made):
    from fmnist_gcp.cloud.models import upload_to_vertex
    inject(fake, "POST", f"/v1/{LOC}/models:upload", status, made)
    m = upload_to_vertex(bucketed, DEFAULT_MODEL, 1, "img:1")  # the first upload: it makes the model
    (v,) = uploads(fake)
    assert (m.resource_name, m.version_id) == (v["name"], v["versionId"]) and len(fake.models) == 2  # MODEL and this one
    lookups = [r.query["filter"] for r in fake.calls("GET", f"/v1/{LOC}/models")]
    assert lookups[-1] == 'labels.app="fmnist-gcp" AND labels.fmnist-stage="upload" AND labels.fmnist-run="r1" AND labels.fmnist-version="1"'
    check_attempts(fake, capsys.readouterr().err, "model upload", "POST", f"/v1/{LOC}/models:upload", status, made)


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made"])
def test_a_version_upload_meeting_a_503_makes_one_version_of_the_model(fake, bucketed, capsys, made):
    "A version of an existing model: the lookup lists the model's versions by the upload's labels."
    from fmnist_gcp.cloud.models import upload_to_vertex
    inject(fake, "POST", f"/v1/{LOC}/models:upload", 503, made)
    m = upload_to_vertex(bucketed, DEFAULT_MODEL, 1, "img:1", parent_model=MODEL)
    assert [v["versionId"] for v in fake.models[MODEL]] == ["1", "2"] and uploads(fake) == fake.models[MODEL][1:]
    assert (m.resource_name, m.version_id) == (MODEL, "2")
    (listed,) = fake.calls("GET", f"/v1/{MODEL}:listVersions")
    assert 'labels.fmnist-version="1"' in listed.query["filter"]
    check_attempts(fake, capsys.readouterr().err, "model upload", "POST", f"/v1/{LOC}/models:upload", 503, made)


@pytest.mark.parametrize("status,made", FAULTS, ids=IDS)
def test_fmnist_deploy_meeting_a_transient_error_on_the_endpoint_create_makes_one_endpoint(fake, capsys, status, made):
    from fmnist_gcp import cli
    inject(fake, "POST", f"/v1/{LOC}/endpoints", status, made)
    rc = cli.main(["deploy", MODEL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (ep,) = fake.endpoints
    assert out.strip() == ep and len(fake.endpoints[ep]["deployedModels"]) == 1
    (listed,) = fake.calls("GET", f"/v1/{LOC}/endpoints")
    labels = fake.endpoints[ep]["labels"]
    assert listed.query["filter"] == " AND ".join(f'labels.{k}="{labels[k]}"' for k in ("app", "fmnist-stage", "fmnist-run"))
    check_attempts(fake, err, "endpoint create", "POST", f"/v1/{LOC}/endpoints", status, made)


@pytest.mark.parametrize("status,made", FAULTS, ids=IDS)
def test_fmnist_deploy_meeting_a_transient_error_on_the_deploy_deploys_one_model(fake, capsys, status, made):
    from fmnist_gcp import cli
    inject(fake, "POST", "*:deployModel", status, made)
    rc = cli.main(["deploy", MODEL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (ep,) = fake.endpoints
    (dm,) = fake.endpoints[ep]["deployedModels"]  # exactly one deployed model
    assert dm["model"] == MODEL and fake.endpoints[ep]["trafficSplit"] == {dm["id"]: 100}
    check_attempts(fake, err, "deploy", "POST", f"/v1/{ep}:deployModel", status, made)


def test_a_503_past_the_deadline_is_one_line_and_exit_1(fake, capsys, monkeypatch):
    from fmnist_gcp import cli
    monkeypatch.setenv("FMNIST_RETRY_DEADLINE_S", "0.3")
    fake.inject("POST", f"/v1/{LOC}/customJobs", 503, times=1000)
    rc = cli.main(["submit-training", "--no-check", "--image", IMAGE, "--", "--epochs", "1"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1 and fake.jobs == {} and out == ""
    assert lines[0] == "skipped the Google Cloud preflight check (--no-check)" and "Traceback" not in err
    assert all(l.startswith("job create: attempt ") for l in lines[1:-1])  # one log line per retry, then the error
    assert re.fullmatch(r"fmnist submit-training: error: Vertex AI: job create still failing after (\d+) attempts in 0 s "
                        r"\(503 UNAVAILABLE: The service is currently unavailable \(injected 503\)\.\): wait a few minutes .*"
                        r"FMNIST_RETRY_DEADLINE_S waits longer", lines[-1]), lines[-1]
    attempts = int(re.search(r"after (\d+) attempts", lines[-1])[1])
    assert attempts == len(fake.calls("POST", f"/v1/{LOC}/customJobs")) > 1  # the line counts what was sent


def test_a_job_that_ends_failed_is_one_line_with_its_error_message(fake, capsys):
    "submit-training --import follows the job; it ends FAILED: one line with the job's own error and its logs, exit 1."
    from fmnist_gcp import cli
    fake.job_end = "JOB_STATE_FAILED"
    rc = cli.main(["submit-training", "--no-check", "--image", IMAGE, "--import", "--poll-seconds", "0", "--", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    (job,) = fake.jobs
    assert rc == 1 and fake.jobs[job]["state"] == "JOB_STATE_FAILED"
    assert err[-1].startswith(f"fmnist submit-training: error: job {fake.jobs[job]['displayName']} ({job}) ended FAILED: "
                              "The replica workerpool0-0 exited with a non-zero status of 1.; logs: https://console.cloud.google.com/logs/query;"), err[-1]
    assert err[-1].endswith("; nothing to import") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("path", [f"/v1/{LOC}/customJobs", f"/v1/{LOC}/endpoints", f"/v1/{LOC}/models", f"/v1/{MODEL}:listVersions"])
def test_the_fakes_lists_refuse_a_filter_vertex_cannot_parse(fake, path):
    "The lists the adopt lookups send: a filter of label and display-name equalities passes, any other is INVALID_ARGUMENT."
    import google.auth
    from google.auth.transport.requests import AuthorizedSession
    session = AuthorizedSession(google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])[0])
    url = f"https://{fake.host}{path}"
    bad = session.get(url, params={"filter": 'labels.app = fmnist-gcp OR true'}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT" and "Unsupported filter" in bad.text
    ok = session.get(url, params={"filter": 'labels.app="fmnist-gcp" AND display_name="x"'}, timeout=10)
    assert ok.status_code == 200 and list(ok.json().values()) == [[]]  # nothing of ours, nothing named x
