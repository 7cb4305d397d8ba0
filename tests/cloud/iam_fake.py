"""testIamPermissions as Google answers it, for the preflight's tests: the subset of the asked permissions the
principal holds, and a 400 for a permission that is not valid on that kind of resource (the real API refuses the whole
request: INVALID_ARGUMENT on the gapic services, a JSON-API 400 on Cloud Storage). Asking needs no permission."""
from unittest import mock

CALLER = "caller"  # the principal of credentials that impersonate nobody
SERVICES = {"aiplatform", "artifactregistry", "bigquery", "cloudbuild", "cloudquotas", "iam", "logging", "resourcemanager",
            "serviceusage", "storage"}  # services whose permissions a project accepts (a made-up one is refused)
ON = {"bucket": ("storage.buckets.", "storage.objects.", "storage.managedFolders.", "storage.multipartUploads."),
      "repository": ("artifactregistry.",), "service_account": ("iam.serviceAccounts.",)}  # what narrower resources accept


def principal(credentials) -> str:
    "Who the credentials are: the impersonated account, else the caller."
    return getattr(credentials, "_target_principal", None) or CALLER


def valid(kind: str, permission: str) -> bool:
    parts = permission.split(".")
    if len(parts) != 3 or not all(parts) or parts[0] not in SERVICES: return False
    return kind == "project" or permission.startswith(ON[kind])


class FakeIam:
    "held: principal -> resource name (projects/P, a bucket name, a repository or account name) -> permissions; None: all."
    def __init__(self, held: dict | None = None, projects=("projects/acme-ml",)):
        self.held, self.projects, self.asked = held, set(projects), []

    def answer(self, who: str, kind: str, resource: str, permissions) -> list[str]:
        from google.api_core import exceptions as gexc
        bad = [p for p in permissions if not valid(kind, p)]
        if bad: raise (gexc.BadRequest if kind == "bucket" else gexc.InvalidArgument)(
            f"Permission {bad[0]} is not valid for this resource ({resource}).")
        if kind == "project" and resource not in self.projects:  # Resource Manager hides projects it will not show
            raise gexc.PermissionDenied(f"The caller does not have permission")
        self.asked.append((who, resource, tuple(permissions)))
        if self.held is None: return list(permissions)
        return [p for p in permissions if p in self.held.get(who, {}).get(resource, set())]

    def patches(self):
        from google.cloud import artifactregistry_v1, iam_admin_v1, resourcemanager_v3, storage
        from google.iam.v1 import iam_policy_pb2
        def gapic(kind):
            def test(client, request=None, *, resource=None, permissions=None, **kw):  # the request, or its flattened fields
                if request is None: request = {"resource": resource, "permissions": permissions or []}
                r = iam_policy_pb2.TestIamPermissionsRequest(**request) if isinstance(request, dict) else request
                return iam_policy_pb2.TestIamPermissionsResponse(
                    permissions=self.answer(principal(client._transport._credentials), kind, r.resource, list(r.permissions)))
            return test
        def bucket(b, permissions, client=None, **kw): return self.answer(principal(b.client._credentials), "bucket", b.name, list(permissions))
        p = lambda cls, fn: mock.patch.object(cls, "test_iam_permissions", autospec=True, side_effect=fn)
        return [p(resourcemanager_v3.ProjectsClient, gapic("project")), p(artifactregistry_v1.ArtifactRegistryClient, gapic("repository")),
                p(iam_admin_v1.IAMClient, gapic("service_account")), p(storage.Bucket, bucket)]
