"""The preflight asks Google what the caller (and the runner) may do: testIamPermissions on the project, the buckets,
the image repository and the runner account, through the real clients with their `test_iam_permissions` patched by a
fake that answers as Google does (the held subset; a 400 for a permission the resource type does not have)."""
from unittest import mock

import pytest

from conftest import VERTEX_ENV
from iam_fake import CALLER, FakeIam
from test_preflight import NO_METADATA, REPO, SA, Cloud

PROJECT = "projects/acme-ml"
BUCKETS = {r: f"acme-ml-fmnist-{r}" for r in ("dev", "datasets", "models")}
ACCOUNT = f"projects/acme-ml/serviceAccounts/{SA}"
BUILDER_ACCOUNT = "projects/acme-ml/serviceAccounts/fmnist-builder@acme-ml.iam.gserviceaccount.com"
NAMES = {"project": PROJECT, "repository": REPO, "service_account:runner": ACCOUNT, "service_account:builder": BUILDER_ACCOUNT,
         **{f"bucket:{r}": b for r, b in BUCKETS.items()}}


@pytest.fixture(autouse=True)
def vertex_env(monkeypatch):
    for k, v in {**NO_METADATA, **VERTEX_ENV}.items(): monkeypatch.setenv(k, v)
    monkeypatch.setattr("fmnist_gcp.cloud.preflight.check_bucket", lambda c, u: f"{u} exists and is writable")  # no emulator needed


def holding(needs, but=()) -> dict:
    "resource name -> permissions: each of `needs` except those in `but`."
    out: dict = {}
    for resource, permission in needs:
        if (resource, permission) not in but: out.setdefault(NAMES[resource], set()).add(permission)
    return out


def gcp_check(capsys, iam) -> tuple[int, list[str], list[str]]:
    from fmnist_gcp.cli import main
    with Cloud(iam=iam): rc = main(["gcp", "check"])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def test_gcp_check_prints_one_line_per_missing_permission_with_its_role(anonymous, capsys):
    from fmnist_gcp.cloud.permissions import IMPERSONATE, needs
    lack = {("project", "cloudbuild.builds.create"), ("bucket:dev", "storage.objects.create"),
            ("service_account:runner", "iam.serviceAccounts.actAs")}
    caller = holding(needs(None) | {IMPERSONATE}, but=lack)  # may impersonate the runner
    runner = holding(needs(None, "runner"), but={("project", "bigquery.jobs.create")})
    iam = FakeIam({CALLER: caller, SA: runner})
    rc, out, err = gcp_check(capsys, iam)
    assert rc == 2 and out == []
    you = "(`fmnist gcp apply --submitter YOU` grants it)"
    assert err == ["fmnist gcp: error: missing cloudbuild.builds.create on project acme-ml: granted by roles/cloudbuild.builds.editor " + you,
                   f"missing storage.objects.create on gs://acme-ml-fmnist-dev: granted by roles/storage.objectUser {you}",
                   f"missing iam.serviceAccounts.actAs on service account {SA}: granted by roles/iam.serviceAccountUser {you}",
                   f"runner {SA}: missing bigquery.jobs.create on project acme-ml: granted by roles/bigquery.jobUser "
                   "(`fmnist gcp apply` grants it to the runner)"]
    asked_as_runner = {r for who, r, _ in iam.asked if who == SA}
    assert asked_as_runner == {PROJECT, ACCOUNT, *BUCKETS.values()}  # with impersonated credentials, on what the runner uses


def test_a_caller_with_everything_gets_no_missing_lines(anonymous, capsys):
    from fmnist_gcp.cloud.permissions import needs
    rc, out, err = gcp_check(capsys, FakeIam({CALLER: holding(needs(None))}))
    assert rc == 0 and err == []
    assert not [l for l in out if "missing" in l]
    (line,) = [l for l in out if "permissions" in l]
    assert line == (f"ok  these credentials hold the {len(needs(None))} permissions the fmnist commands needs; the runner's own "
                    f"permissions not checked (impersonating {SA} needs iam.serviceAccounts.getAccessToken, granted by "
                    "roles/iam.serviceAccountTokenCreator)")


def test_each_command_is_checked_for_its_own_permissions(anonymous):
    "A submitter without Cloud Build may still `run --on vertex`; `gcp check` asks about every command."
    from fmnist_gcp.cloud import preflight as pf
    from fmnist_gcp.cloud.permissions import needs
    from fmnist_gcp.config import Settings
    iam = FakeIam({CALLER: holding(needs("run --on vertex"))})
    with Cloud(iam=iam):
        passed = pf.preflight(Settings.from_env(), command="run --on vertex")
        with pytest.raises(pf.PreflightError) as e: pf.preflight(Settings.from_env())
    assert [p for p in passed if "permissions" in p][0].startswith(f"these credentials hold the {len(needs('run --on vertex'))} permissions `fmnist run --on vertex` needs")
    others = needs(None) - needs("run --on vertex")  # what the other commands need besides (Cloud Build, the experiment)
    assert ("project", "cloudbuild.builds.create") in others and len(e.value.problems) == len(others)
    assert "missing cloudbuild.builds.create on project acme-ml: granted by roles/cloudbuild.builds.editor " \
           "(`fmnist gcp apply --submitter YOU` grants it)" in e.value.problems
    assert {l.split()[1] for l in e.value.problems} == {p for _, p in others}


def test_user_credentials_also_need_to_bill_the_project(monkeypatch):
    import google.auth
    import google.oauth2.credentials
    from fmnist_gcp.cloud import preflight as pf
    from fmnist_gcp.config import Settings
    from fmnist_gcp.cloud.permissions import needs
    user = google.oauth2.credentials.Credentials(token="t")
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (user, None))
    with Cloud(iam=FakeIam({CALLER: holding(needs("gcp check"))})):
        with pytest.raises(pf.PreflightError) as e: pf.preflight(Settings.from_env(), command="gcp check")
    assert e.value.problems == ["missing serviceusage.services.use on project acme-ml: granted by roles/serviceusage.serviceUsageConsumer "
                                "(`fmnist gcp apply --submitter YOU` grants it)"]


def test_the_iam_fake_refuses_what_google_refuses(anonymous):
    "A made-up permission is a 400 on any resource; a Vertex permission is a 400 on a bucket; a held subset otherwise."
    from google.api_core import exceptions as gexc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import iam_admin_v1, resourcemanager_v3, storage
    iam = FakeIam({CALLER: {PROJECT: {"aiplatform.customJobs.create"}}})
    creds = AnonymousCredentials()
    with Cloud(iam=iam):
        projects = resourcemanager_v3.ProjectsClient(credentials=creds)
        with pytest.raises(gexc.InvalidArgument): projects.test_iam_permissions(resource=PROJECT, permissions=["foo.bar.baz"])
        with pytest.raises(gexc.BadRequest):
            storage.Client(project="acme-ml", credentials=creds).bucket("b").test_iam_permissions(["aiplatform.customJobs.create"])
        with pytest.raises(gexc.InvalidArgument):
            iam_admin_v1.IAMClient(credentials=creds).test_iam_permissions(request={"resource": ACCOUNT, "permissions": ["storage.objects.get"]})
        got = projects.test_iam_permissions(resource=PROJECT, permissions=["aiplatform.customJobs.create", "storage.objects.create"])
    assert list(got.permissions) == ["aiplatform.customJobs.create"]


def test_a_permission_google_refuses_is_a_problem_line_not_a_traceback(anonymous, monkeypatch):
    from fmnist_gcp.cloud import permissions as perms, preflight as pf
    from fmnist_gcp.config import Settings
    monkeypatch.setitem(perms.PERMISSIONS, "gcp check", {perms.SUBMITTER: perms.PROBES | {("project", "foo.bar.baz")}})
    with Cloud(), pytest.raises(pf.PreflightError) as e: pf.preflight(Settings.from_env(), command="gcp check")
    assert e.value.problems == ["permissions on project acme-ml: InvalidArgument: Permission foo.bar.baz is not valid for this "
                                "resource (projects/acme-ml)."]


def test_the_roles_table_grants_every_permission_each_command_needs(monkeypatch):
    "Each need of each command is granted by a role `cloud.provision`'s table gives its holder; a role left out is caught."
    from fmnist_gcp.cloud import permissions as perms, provision
    assert perms.ungranted() == []
    assert {r.name for r in provision.IAM_ROLES} <= set(perms.ROLE_PERMISSIONS)
    without = tuple(r for r in provision.IAM_ROLES if not (r.holder == perms.SUBMITTER and r.name == "roles/storage.legacyBucketReader"))
    monkeypatch.setattr(perms, "IAM_ROLES", without)
    assert {(h, n) for _, h, n in perms.ungranted()} == {(perms.SUBMITTER, (f"bucket:{s}", "storage.buckets.get")) for s in perms.STORES}


def test_the_runner_is_checked_only_as_itself(anonymous):
    "Impersonation yields credentials whose principal is the runner; the caller's own need list is never asked as the runner."
    from google.auth.credentials import AnonymousCredentials
    from fmnist_gcp.cloud.preflight import impersonated
    from iam_fake import principal
    assert principal(impersonated(AnonymousCredentials(), SA)) == SA and principal(AnonymousCredentials()) == CALLER
