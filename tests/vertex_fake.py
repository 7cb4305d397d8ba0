"""A fake Vertex AI REST service on loopback, for the real SDK on its REST transport.

An HTTPS server on 127.0.0.1 (a self-signed certificate made here, trusted through REQUESTS_CA_BUNDLE), an OAuth
token endpoint that checks the JWT a service-account key made here signs, and the v1 REST methods this package calls:
customJobs and batchPredictionJobs (create, get, cancel), models (upload, get, list, listVersions,
mergeVersionAliases), endpoints (create, get, list, deployModel, undeployModel, delete), predict (forwarded to the
deployed model's own serving app, as Vertex runs the container), operations get, the metadata calls Vertex
Experiments makes, and pipelineJobs (create, get, list). It refuses what Vertex refuses (required fields of the v1 protos, aliases, deploy resources,
traffic), answers in Google's JSON error shape so the SDK raises the real api-core exception, keeps jobs and
long-running operations unfinished for several polls, records every request, answers 501 UNIMPLEMENTED for a method
it does not model, and can inject faults (`inject`).
"""
from __future__ import annotations

import base64
import datetime
import fnmatch
import itertools
import json
import re
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROJECT, REGION = "acme-ml", "europe-west4"
LOC = f"projects/{PROJECT}/locations/{REGION}"
T = "type.googleapis.com/google.cloud.aiplatform.v1."
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
          503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
ALIAS_RE = re.compile(r"[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]")  # ModelService: version_aliases
PREDICT_LIMIT = 1_572_864  # 1.5 MB: the request payload limit of a shared (public) endpoint
JOB_STATES = ["JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING"]
REGIONS = {"us-central1", "us-east1", "us-west1", "europe-west1", "europe-west2", "europe-west4", "asia-east1",
           "asia-northeast1", "australia-southeast1", "southamerica-east1"}  # some of the regions Vertex AI serves
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    "An error Vertex answers: HTTP status, canonical status name, message."
    def __init__(self, code: int, message: str, status: str | None = None, details: list | None = None):
        super().__init__(message)
        self.code, self.status, self.message, self.details = code, status or STATUS.get(code, "UNKNOWN"), message, details

    def body(self) -> dict:
        e = {"code": self.code, "message": self.message, "status": self.status}
        if self.details: e["details"] = self.details
        return {"error": e}


def invalid(msg): return ApiError(400, msg, "INVALID_ARGUMENT")
def precondition(msg): return ApiError(400, msg, "FAILED_PRECONDITION")
def not_found(name): return ApiError(404, f'The resource "{name}" was not found.' if "/" in name else name, "NOT_FOUND")


def get_path(obj: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(obj, dict) or k not in obj: return None
        obj = obj[k]
    return obj


def require(obj: dict, what: str, *fields: str) -> None:
    "INVALID_ARGUMENT naming every required field that is unset (empty strings and lists count as unset)."
    missing = [f for f in fields if get_path(obj, f) in (None, "", [], {})]
    if missing:
        snake = lambda s: re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), s)
        found = "".join(f"\t{i}.Field: {what}.{snake(f)}; Message: Required field is not set." for i, f in enumerate(missing, 1))
        raise invalid(f"List of found errors:{found}\t")


@dataclass
class Recorded:
    "One HTTP request the fake answered."
    method: str
    path: str  # without the query string
    query: dict
    body: dict | None
    status: int = 0  # the HTTP status answered
    injected: bool = False

    def __repr__(self): return f"{self.method} {self.path} -> {self.status}"


@dataclass
class Fault:
    method: str
    path_glob: str
    status: int
    times: int
    retry_delay_s: float | None
    after_apply: bool
    message: str


@dataclass
class Operation:
    name: str
    metadata_type: str
    response: dict | None = None  # with its @type
    error: dict | None = None
    polls_left: int = 2
    created: str = field(default_factory=now)

    def json(self, poll: bool) -> dict:
        if poll and self.polls_left > 0: self.polls_left -= 1
        out = {"name": self.name, "metadata": {"@type": T + self.metadata_type,
                                               "genericMetadata": {"createTime": self.created, "updateTime": now()}}}
        if self.polls_left <= 0:
            out["done"] = True
            if self.error: out["error"] = self.error
            else: out["response"] = self.response or {"@type": "type.googleapis.com/google.protobuf.Empty"}
        return out


# ----------------------------------------------------------------------------------------------------------------
# credentials: a TLS certificate for 127.0.0.1 and a service-account key whose token_uri is the fake's
# ----------------------------------------------------------------------------------------------------------------
def make_tls(folder: Path) -> tuple[Path, Path]:
    "A self-signed certificate (and its key) for 127.0.0.1 and localhost, written to `folder`."
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vertex-fake")])
    t = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(t - datetime.timedelta(minutes=5))
            .not_valid_after(t + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    crt, pem = folder / "vertex-fake.crt", folder / "vertex-fake.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def make_service_account_key(path: Path, token_uri: str, email: str = f"tester@{PROJECT}.iam.gserviceaccount.com"):
    "A service-account key file (a fresh RSA key) whose token_uri is `token_uri`; returns the public key."
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_text(json.dumps({"type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
                                "private_key": pem.decode(), "client_email": email, "client_id": "1",
                                "token_uri": token_uri, "universe_domain": "googleapis.com"}))
    return key.public_key()


def _b64(s: str) -> bytes: return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(token: str, public_key) -> dict | None:
    "The claims of an RS256 JWT signed by `public_key`, or None."
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    try:
        head, claims, sig = token.split(".")
        public_key.verify(_b64(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return json.loads(_b64(claims))
    except (ValueError, InvalidSignature):
        return None


# ----------------------------------------------------------------------------------------------------------------
# the service
# ----------------------------------------------------------------------------------------------------------------
class VertexFake:
    """The fake service's state and handlers. `requests` records every request (token requests excluded) in order;
    `job_end`/`on_job_end` decide how a custom job ends; `lro_polls` how many operation GETs a long-running operation
    takes (not done on the first)."""
    def __init__(self, folder: Path, lro_polls: int = 2):
        self.folder, self.lro_polls = Path(folder), lro_polls
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.tokens: set[str] = set()
        self.jobs: dict[str, dict] = {}  # customJobs and batchPredictionJobs by name
        self.pipeline_jobs: dict[str, dict] = {}  # pipelineJobs by name
        self.models: dict[str, list[dict]] = {}  # model name -> versions, oldest first
        self.endpoints: dict[str, dict] = {}
        self.operations: dict[str, Operation] = {}
        self.metadata: dict[str, dict] = {}  # metadataStores, contexts, executions, artifacts by name
        self.children: dict[str, list[str]] = {}
        self.servers: dict[str, tuple] = {}  # deployed model id -> (BackgroundServer, predict route)
        self.job_end, self.on_job_end = "JOB_STATE_SUCCEEDED", lambda job: None
        self.still: set[str] = set()  # jobs that stay in their state
        self._ids = itertools.count(1001)
        self._lock = threading.RLock()
        self._routes = [(m, re.compile(p), h) for m, p, h in self.ROUTES]

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> "VertexFake":
        self.cert, key = make_tls(self.folder)
        fake = self
        class Handler(_Handler): owner = fake
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(self.cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.token_uri = f"https://{self.host}/token"
        self.key_file = self.folder / "service-account.json"
        self.email = f"tester@{PROJECT}.iam.gserviceaccount.com"
        self.public_key = make_service_account_key(self.key_file, self.token_uri, self.email)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="vertex-fake")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown(); self.httpd.server_close()
        for srv, _ in self.servers.values(): srv.stop()

    # -- what tests use -------------------------------------------------------------------------------------------
    def inject(self, method: str, path_glob: str, status: int, times: int = 1, retry_delay_s: float | None = None,
               after_apply: bool = False, message: str | None = None) -> None:
        """The next `times` requests matching `method` and `path_glob` (fnmatch on the path, e.g. "*/customJobs")
        answer `status` in Google's error shape; a 429 with `retry_delay_s` carries a RetryInfo detail; with
        `after_apply` the request is applied first (a create that happened on the server but answered an error)."""
        self.faults.append(Fault(method.upper(), path_glob, status, times, retry_delay_s, after_apply,
                                 message or f"The service is currently unavailable (injected {status})."))

    def unmodelled(self) -> list[Recorded]:
        "Requests answered 501 because the fake does not model their method (injected 501s excluded)."
        return [r for r in self.requests if r.status == 501 and not r.injected]

    def calls(self, method: str | None = None, path_glob: str = "*") -> list[Recorded]:
        "Recorded requests, in order, matching `method` and `path_glob`."
        return [r for r in self.requests if (method is None or r.method == method) and fnmatch.fnmatchcase(r.path, path_glob)]

    def seed_model(self, name: str, display_name: str, labels: dict | None = None,
                   resources: str = "DEDICATED_RESOURCES", artifact_uri: str = "") -> dict:
        "A model made elsewhere (version 1, alias default)."
        v = self._version(name, {"displayName": display_name, "labels": labels or {}, "artifactUri": artifact_uri,
                                 "containerSpec": {"imageUri": "elsewhere:1"}}, "1", ["default"])
        v["supportedDeploymentResourcesTypes"] = [resources]
        self.models[name] = [v]
        return v

    def seed_job(self, job: dict, state: str) -> str:
        "A custom job made elsewhere, in `state` (where it stays: later gets do not move it on)."
        name = f"{LOC}/customJobs/{next(self._ids)}"
        self.jobs[name] = {**job, "name": name, "state": state, "createTime": now()}
        self.still.add(name)
        return name

    # -- dispatch -------------------------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict]:
        url = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(url.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        if path == "/token" and method == "POST": return self._token(body)
        try: data = json.loads(body) if body else None
        except ValueError: data = None
        rec = Recorded(method, path, query, data)
        with self._lock:
            self.requests.append(rec)
            status, out = self._answer(rec, headers, body)
            rec.status = status
        return status, out

    def _answer(self, rec: Recorded, headers, body: bytes) -> tuple[int, dict]:
        fault = next((f for f in self.faults if f.times > 0 and f.method == rec.method
                      and fnmatch.fnmatchcase(rec.path, f.path_glob)), None)
        try:
            self._authorise(headers.get("Authorization", ""))
            if fault and not fault.after_apply: raise self._fault(fault, rec)
            if rec.path.endswith(":predict") and len(body) > PREDICT_LIMIT:
                raise invalid(f"Request payload size exceeds the limit: {PREDICT_LIMIT} bytes.")
            for m, rx, h in self._routes:
                match = rx.fullmatch(rec.path)
                if m == rec.method and match:
                    out = h(self, *match.groups(), body=rec.body or {}, query=rec.query)
                    if fault: raise self._fault(fault, rec)
                    return 200, out
            raise ApiError(501, f"Method {rec.method} {rec.path} is not modelled by the Vertex fake.", "UNIMPLEMENTED")
        except ApiError as e:
            return e.code, e.body()

    def _fault(self, fault: Fault, rec: Recorded) -> ApiError:
        fault.times -= 1; rec.injected = True
        details = None
        if fault.retry_delay_s is not None:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{fault.retry_delay_s:g}s"}]
        return ApiError(fault.status, fault.message, details=details)

    def _token(self, body: bytes) -> tuple[int, dict]:
        form = urllib.parse.parse_qs(body.decode())
        claims = verify_jwt(form.get("assertion", [""])[0], self.public_key)
        # google-auth signs for Google's token audience whatever the key's token_uri; the issuer must be the key's account
        ok_aud = (self.token_uri, "https://oauth2.googleapis.com/token")
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or not claims or \
                claims.get("aud") not in ok_aud or claims.get("iss") != self.email:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        token = f"ya29.fake-{len(self.tokens) + 1}"
        self.tokens.add(token)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    def _authorise(self, header: str) -> None:
        "An access token this fake issued, or a self-signed JWT of the key (google-auth's JWT access)."
        token = header.removeprefix("Bearer ")
        if token in self.tokens or (token and (verify_jwt(token, self.public_key) or {}).get("iss") == self.email): return
        raise ApiError(401, "Request is missing required authentication credential. Expected OAuth 2 access token, "
                            "login cookie or other valid authentication credential.", "UNAUTHENTICATED")

    def _operation(self, parent: str, metadata_type: str, response: dict | None, error: dict | None = None) -> dict:
        op = Operation(f"{parent}/operations/{next(self._ids)}", metadata_type, response, error, self.lro_polls)
        self.operations[op.name] = op
        return op.json(poll=False)

    def get_operation(self, name, **_):
        if name not in self.operations: raise not_found(name)
        return self.operations[name].json(poll=True)

    def get_location(self, name, **_):
        region = name.rsplit("/", 1)[-1]
        if region not in REGIONS: raise invalid(f"Location {region} is not supported by Vertex AI.")
        return {"name": name, "locationId": region}

    # -- custom jobs and batch prediction jobs --------------------------------------------------------------------
    def create_custom_job(self, parent, body, **_):
        require(body, "custom_job", "displayName", "jobSpec.workerPoolSpecs")
        for i, pool in enumerate(body["jobSpec"]["workerPoolSpecs"]):
            what = f"custom_job.job_spec.worker_pool_specs[{i}]"
            require(pool, what, "machineSpec.machineType", "replicaCount")
            if not (get_path(pool, "containerSpec.imageUri") or get_path(pool, "pythonPackageSpec.executorImageUri")):
                require(pool, what, "containerSpec.imageUri")
            if i == 0 and int(pool["replicaCount"]) != 1:
                raise invalid(f"{what}.replica_count must be 1 for the primary (chief) worker pool, not {pool['replicaCount']}.")
        out = get_path(body, "jobSpec.baseOutputDirectory.outputUriPrefix")
        if out is not None and not out.startswith("gs://"):
            raise invalid(f"custom_job.job_spec.base_output_directory.output_uri_prefix must be a gs:// URI, not {out!r}.")
        for key in ("experiment", "experimentRun"):
            ref = body["jobSpec"].get(key)
            if ref and ref not in self.metadata: raise not_found(ref)
        return self._new_job(f"{parent}/customJobs", body)

    def create_batch_prediction_job(self, parent, body, **_):
        require(body, "batch_prediction_job", "displayName", "model", "inputConfig.instancesFormat",
                "outputConfig.predictionsFormat")
        m = self._resolve(body["model"])
        if "DEDICATED_RESOURCES" in m["supportedDeploymentResourcesTypes"]:
            require(body, "batch_prediction_job", "dedicatedResources.machineSpec.machineType")
        return self._new_job(f"{parent}/batchPredictionJobs", body)

    def _new_job(self, collection, body):
        name = f"{collection}/{next(self._ids)}"
        self.jobs[name] = {**body, "name": name, "state": JOB_STATES[0], "createTime": now(), "updateTime": now()}
        return dict(self.jobs[name])

    def get_job(self, name, **_):
        "Each get moves the job one state on: QUEUED, PENDING, RUNNING, then `job_end` (after `on_job_end(job)`)."
        job = self._job(name)
        if name in self.still: return dict(job)
        if job["state"] in JOB_STATES or job["state"] == "JOB_STATE_CANCELLING":
            i = JOB_STATES.index(job["state"]) if job["state"] in JOB_STATES else -1
            if job["state"] == "JOB_STATE_CANCELLING": job["state"] = "JOB_STATE_CANCELLED"
            elif i + 1 < len(JOB_STATES): job["state"] = JOB_STATES[i + 1]
            else:
                self.on_job_end(job)
                job["state"] = self.job_end
                if job["state"] == "JOB_STATE_FAILED":
                    job["error"] = {"code": 3, "message": "The replica workerpool0-0 exited with a non-zero status of 1."}
            job["updateTime"] = now()
            if job["state"] in TERMINAL: job["endTime"] = now()
        return dict(job)

    def cancel_job(self, name, **_):
        job = self._job(name)
        if job["state"] in TERMINAL or job["state"] == "JOB_STATE_CANCELLING":
            raise precondition(f"Cannot cancel job {name} in state {job['state']}.")
        job["state"] = "JOB_STATE_CANCELLING"
        return {}

    def _job(self, name):
        if name not in self.jobs: raise not_found(name)
        return self.jobs[name]

    # -- models -----------------------------------------------------------------------------------------------------
    def _version(self, name, model, version_id, aliases):
        t = now()
        return {**model, "name": name, "versionId": version_id, "versionAliases": aliases, "createTime": t,
                "updateTime": t, "versionCreateTime": t, "versionUpdateTime": t,
                "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"]}

    @staticmethod
    def _check_aliases(aliases, what):
        for a in aliases:
            if not ALIAS_RE.fullmatch(a):
                raise invalid(f"{what}: alias {a!r} does not match [a-z][a-zA-Z0-9-]{{0,126}}[a-z0-9].")
        if len(set(aliases)) != len(aliases): raise invalid(f"{what}: duplicate aliases {aliases}.")

    def upload_model(self, parent, body, **_):
        require(body, "model", "model.displayName", "model.containerSpec.imageUri")
        model = dict(body["model"])
        aliases = list(model.pop("versionAliases", []))
        self._check_aliases(aliases, "model.version_aliases")
        parent_model = body.get("parentModel")
        if parent_model:
            if parent_model not in self.models: raise not_found(parent_model)
            name, versions = parent_model, self.models[parent_model]
            for old in versions: old["versionAliases"] = [a for a in old["versionAliases"] if a not in aliases]
        else:  # version 1 of a new model always carries the default alias
            name, versions = f"{parent}/models/{body.get('modelId') or next(self._ids)}", []
            aliases = ["default", *(a for a in aliases if a != "default")]
        v = self._version(name, model, str(len(versions) + 1), aliases)
        versions.append(v); self.models[name] = versions
        return self._operation(name, "UploadModelOperationMetadata",
                               {"@type": T + "UploadModelResponse", "model": name, "modelVersionId": v["versionId"]})

    def _resolve(self, ref: str) -> dict:
        "The model version `ref` names: NAME (the default version), NAME@VERSION_ID or NAME@ALIAS."
        base, _, tag = ref.partition("@")
        versions = self.models.get(base)
        found = [v for v in versions or [] if v["versionId"] == tag or tag in v["versionAliases"]] if tag else \
                [v for v in versions or [] if "default" in v["versionAliases"]]
        if not found: raise not_found(ref)
        return found[0]

    def get_model(self, name, **_): return self._resolve(name)

    def list_models(self, parent, query, **_):
        "Default versions whose display_name and labels match the filter's `key=\"value\"` terms joined by AND."
        flt = query.get("filter", "")
        terms = [t.strip() for t in re.split(r"\bAND\b", flt)] if flt.strip() else []
        parsed = [re.fullmatch(r'(display_name|labels\.[\w-]+)\s*=\s*"([^"]*)"', t) for t in terms]
        if not all(parsed): raise invalid(f"Unsupported filter: {flt!r}.")
        def value(m, k): return m.get("displayName") if k == "display_name" else m.get("labels", {}).get(k[7:])
        found = [self._resolve(n) for n in self.models if n.startswith(parent + "/")]
        found = [m for m in found if all(value(m, p[1]) == p[2] for p in parsed)]
        if query.get("orderBy", "create_time") in ("create_time", "createTime"): found.sort(key=lambda m: m["createTime"])
        return {"models": found}

    def list_versions(self, name, **_):
        if name not in self.models: raise not_found(name)
        return {"models": list(self.models[name])}

    def merge_version_aliases(self, name, body, **_):
        "`alias` moves the alias to this version; `-alias` removes it; `default` cannot be removed."
        v = self._resolve(name)
        changes = body.get("versionAliases") or []
        if not changes: raise invalid("version_aliases: Required field is not set.")
        self._check_aliases([a.removeprefix("-") for a in changes], "version_aliases")
        for a in changes:
            if a == "-default": raise invalid("The default alias cannot be removed; give it to another version instead.")
            if a.startswith("-"): v["versionAliases"] = [x for x in v["versionAliases"] if x != a[1:]]
            else:
                for old in self.models[v["name"]]: old["versionAliases"] = [x for x in old["versionAliases"] if x != a]
                v["versionAliases"].append(a)
        return v

    # -- endpoints --------------------------------------------------------------------------------------------------
    def create_endpoint(self, parent, body, query, **_):
        require(body, "endpoint", "displayName")
        name = f"{parent}/endpoints/{query.get('endpointId') or next(self._ids)}"
        if name in self.endpoints: raise ApiError(409, f"Endpoint {name} already exists.")
        ep = {**body, "name": name, "createTime": now(), "updateTime": now(), "etag": "e1"}
        self.endpoints[name] = ep
        return self._operation(name, "CreateEndpointOperationMetadata", {"@type": T + "Endpoint", **ep})

    def _endpoint(self, name):
        if name not in self.endpoints: raise not_found(name)
        return self.endpoints[name]

    def get_endpoint(self, name, **_): return self._endpoint(name)

    def list_endpoints(self, parent, **_):
        return {"endpoints": [e for n, e in self.endpoints.items() if n.startswith(parent + "/")]}

    def _check_split(self, split: dict, ids: list[str]) -> None:
        unknown = [k for k in split if k not in ids]
        if unknown: raise invalid(f"traffic_split names deployed models the endpoint does not have: {unknown}.")
        if split and sum(int(v) for v in split.values()) != 100:
            raise invalid(f"traffic_split must sum to 100, not {sum(int(v) for v in split.values())}.")

    def deploy_model(self, endpoint, body, **_):
        ep = self._endpoint(endpoint)
        require(body, "deploy_model_request", "deployedModel", "deployedModel.model")
        dm = dict(body["deployedModel"])
        m = self._resolve(dm["model"])
        kinds = [k for k in ("dedicatedResources", "automaticResources", "sharedResources") if k in dm]
        if len(kinds) != 1:
            raise invalid("deployed_model: exactly one of dedicated_resources or automatic_resources is required "
                          f"(the request has {kinds or 'none'}).")
        kind = re.sub(r"[A-Z]", lambda c: "_" + c[0], kinds[0]).upper()
        if kind not in m["supportedDeploymentResourcesTypes"]:
            raise invalid(f"Model {m['name']} does not support {kind}; it supports "
                          f"{', '.join(m['supportedDeploymentResourcesTypes'])}.")
        if kind == "DEDICATED_RESOURCES":
            require(dm, "deployed_model.dedicated_resources", "dedicatedResources.machineSpec.machineType",
                    "dedicatedResources.minReplicaCount")
        ids = [d["id"] for d in ep.get("deployedModels", [])]
        split = {k: int(v) for k, v in (body.get("trafficSplit") or {}).items()}
        self._check_split(split, ids + ["0"])
        dm |= {"id": str(next(self._ids)), "model": m["name"], "modelVersionId": m["versionId"], "createTime": now()}
        dm.setdefault("displayName", m["displayName"])
        ep.setdefault("deployedModels", []).append(dm)
        if split: ep["trafficSplit"] = {(dm["id"] if k == "0" else k): v for k, v in split.items() if v}
        elif not ids: ep["trafficSplit"] = {dm["id"]: 100}
        return self._operation(endpoint, "DeployModelOperationMetadata",
                               {"@type": T + "DeployModelResponse", "deployedModel": dm})

    def undeploy_model(self, endpoint, body, **_):
        "Refused while the model still holds traffic (unless it is the last one, or the request's split takes it away)."
        ep = self._endpoint(endpoint)
        require(body, "undeploy_model_request", "deployedModelId")
        dm_id, ids = body["deployedModelId"], [d["id"] for d in ep.get("deployedModels", [])]
        if dm_id not in ids: raise not_found(f"Deployed model {dm_id} not found in endpoint {endpoint}.")
        split = {k: int(v) for k, v in (body.get("trafficSplit") or ep.get("trafficSplit") or {}).items()}
        if "trafficSplit" in body: self._check_split(split, ids)
        if split.get(dm_id, 0) > 0 and len(ids) > 1:
            raise precondition(f"Deployed model {dm_id} still has {split[dm_id]}% of the endpoint's traffic: "
                               "move its traffic to other deployed models first (traffic_split).")
        ep["deployedModels"] = [d for d in ep["deployedModels"] if d["id"] != dm_id]
        ep["trafficSplit"] = {k: v for k, v in split.items() if k != dm_id and v}
        if dm_id in self.servers: self.servers.pop(dm_id)[0].stop()
        return self._operation(endpoint, "UndeployModelOperationMetadata", {"@type": T + "UndeployModelResponse"})

    def delete_endpoint(self, name, **_):
        ep = self._endpoint(name)
        if ep.get("deployedModels"):
            raise precondition(f"Endpoint {name} has deployed models: undeploy them before deleting it.")
        del self.endpoints[name]
        return self._operation(name, "DeleteOperationMetadata", None)

    def predict(self, endpoint, body, **_):
        "The deployed model with the most traffic answers, through its own serving app on loopback."
        import httpx
        ep = self._endpoint(endpoint)
        require(body, "predict_request", "instances")
        if not ep.get("trafficSplit"):
            raise precondition(f"Endpoint {endpoint} has no deployed model with traffic to serve the request.")
        dm_id = max(ep["trafficSplit"], key=ep["trafficSplit"].get)
        dm = next(d for d in ep["deployedModels"] if d["id"] == dm_id)
        m = self._resolve(f"{dm['model']}@{dm['modelVersionId']}")
        srv, route = self._server(dm, m)
        r = httpx.post(srv.url + route, json={"instances": body["instances"], "parameters": body.get("parameters", {})},
                       timeout=60)
        if r.status_code != 200: raise invalid(f"The model's container answered {r.status_code}: {r.text[:300]}")
        return {"predictions": r.json()["predictions"], "deployedModelId": dm_id, "model": m["name"],
                "modelDisplayName": m["displayName"], "modelVersionId": m["versionId"]}

    def _server(self, dm, model):
        from fmnist_gcp.serving import BackgroundServer, Predictor, create_app
        if dm["id"] not in self.servers:
            c = model["containerSpec"]
            uri = model["artifactUri"].rstrip("/") + "/model.keras"
            app = create_app(lambda: Predictor(uri, model["displayName"], model["versionId"]),
                             health_route=c.get("healthRoute"), predict_route=c.get("predictRoute"),
                             deployed_model_id=dm["id"])
            srv = BackgroundServer(app).start(); srv.wait_ready(c.get("healthRoute"))
            self.servers[dm["id"]] = (srv, c.get("predictRoute"))
        return self.servers[dm["id"]]

    # -- metadata (Vertex AI Experiments) ------------------------------------------------------------------------
    def _meta(self, name):
        if name not in self.metadata: raise not_found(name)
        return self.metadata[name]

    def get_metadata(self, name, **_): return self._meta(name)

    def create_metadata_store(self, parent, body, query, **_):
        name = f"{parent}/metadataStores/{query.get('metadataStoreId') or next(self._ids)}"
        if name in self.metadata: raise ApiError(409, f"MetadataStore {name} already exists.")
        self.metadata[name] = {**body, "name": name, "createTime": now()}
        return self._operation(name, "CreateMetadataStoreOperationMetadata", {"@type": T + "MetadataStore", **self.metadata[name]})

    def create_context(self, store, body, query, **_):
        self._meta(store)
        cid = query.get("contextId") or str(next(self._ids))
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,127}", cid):
            raise invalid(f"context_id {cid!r} must match [a-z0-9][a-z0-9-]{{0,127}}.")
        name = f"{store}/contexts/{cid}"
        if name in self.metadata: raise ApiError(409, f"Context {name} already exists.")
        self.metadata[name] = {**body, "name": name, "createTime": now(), "updateTime": now(), "etag": "1"}
        return self.metadata[name]

    def update_context(self, name, body, **_):
        ctx = self._meta(name)
        if "metadata" in body: ctx["metadata"] = {**ctx.get("metadata", {}), **body["metadata"]}
        ctx.update({k: v for k, v in body.items() if k not in ("name", "metadata")}, updateTime=now())
        return ctx

    def add_context_children(self, context, body, **_):
        self._meta(context)
        for child in body.get("childContexts", []): self._meta(child)
        self.children.setdefault(context, []).extend(body.get("childContexts", []))
        return {}

    # -- pipeline jobs (Vertex AI Pipelines) ----------------------------------------------------------------------
    PIPELINE_STATES = ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING")
    PIPELINE_ID_RE = re.compile(r"[a-z][-a-z0-9]{0,127}")  # CreatePipelineJobRequest.pipeline_job_id

    def create_pipeline_job(self, parent, body, query, **_):
        """PipelineService.CreatePipelineJob: a spec (or a template URI) whose root has tasks, a gs:// output
        directory (RuntimeConfig.gcs_output_directory is Required), a display name of at most 128 characters,
        an id of lowercase letters, digits and hyphens that no pipeline job of the location has taken."""
        if not (body.get("pipelineSpec") or body.get("templateUri")):
            require(body, "pipeline_job", "pipelineSpec")
        if body.get("pipelineSpec"):
            require(body, "pipeline_job", "pipelineSpec.root.dag.tasks", "pipelineSpec.deploymentSpec.executors")
        require(body, "pipeline_job", "runtimeConfig.gcsOutputDirectory")
        root = body["runtimeConfig"]["gcsOutputDirectory"]
        if not root.startswith("gs://"):
            raise invalid(f"pipeline_job.runtime_config.gcs_output_directory must be a Cloud Storage path (gs://...), not {root!r}.")
        if len(body.get("displayName", "")) > 128:
            raise invalid("pipeline_job.display_name must be at most 128 characters long.")
        jid = query.get("pipelineJobId") or f"pipeline-{next(self._ids)}"
        if not self.PIPELINE_ID_RE.fullmatch(jid):
            raise invalid(f"pipeline_job_id {jid!r} must match [a-z][-a-z0-9]{{0,127}}.")
        name = f"{parent}/pipelineJobs/{jid}"
        if name in self.pipeline_jobs: raise ApiError(409, f"PipelineJob {name} already exists.")
        self.pipeline_jobs[name] = {**body, "name": name, "state": self.PIPELINE_STATES[0], "createTime": now(), "updateTime": now()}
        return dict(self.pipeline_jobs[name])

    def get_pipeline_job(self, name, **_):
        "Each get moves the pipeline one state on: PENDING, RUNNING, then SUCCEEDED."
        if name not in self.pipeline_jobs: raise not_found(name)
        job = self.pipeline_jobs[name]
        if job["state"] in self.PIPELINE_STATES:
            i = self.PIPELINE_STATES.index(job["state"])
            job["state"] = self.PIPELINE_STATES[i + 1] if i + 1 < len(self.PIPELINE_STATES) else "PIPELINE_STATE_SUCCEEDED"
            job["updateTime"] = now()
            if job["state"] == "PIPELINE_STATE_SUCCEEDED": job["endTime"] = now()
        return dict(job)

    def list_pipeline_jobs(self, parent, query, **_):
        "Pipeline jobs whose labels match the filter's `labels.KEY=\"value\"` terms joined by AND."
        flt = query.get("filter", "")
        terms = [t.strip() for t in re.split(r"\bAND\b", flt)] if flt.strip() else []
        parsed = [re.fullmatch(r'labels\.([\w-]+)\s*=\s*"([^"]*)"', t) for t in terms]
        if not all(parsed): raise invalid(f"Unsupported filter: {flt!r}.")
        return {"pipelineJobs": [j for n, j in self.pipeline_jobs.items() if n.startswith(parent + "/")
                                 and all(j.get("labels", {}).get(p[1]) == p[2] for p in parsed)]}

    P = r"(projects/[^/]+/locations/[^/]+)"
    N = r"(projects/[^/]+/locations/[^/]+/{}/[^/:]+)"
    ROUTES = [
        ("GET", r"/(?:v1|ui)/(projects/[^/]+/locations/[^/]+(?:/[a-zA-Z]+/[^/:]+)?/operations/[^/:]+)", get_operation),
        ("GET", rf"/(?:v1|ui)/{P}", get_location),  # the v1 transports' mixins (locations, operations) use /ui/ first
        ("POST", rf"/v1/{P}/customJobs", create_custom_job),
        ("GET", rf"/v1/{N.format('customJobs')}", get_job),
        ("POST", rf"/v1/{N.format('customJobs')}:cancel", cancel_job),
        ("POST", rf"/v1/{P}/batchPredictionJobs", create_batch_prediction_job),
        ("GET", rf"/v1/{N.format('batchPredictionJobs')}", get_job),
        ("POST", rf"/v1/{N.format('batchPredictionJobs')}:cancel", cancel_job),
        ("POST", rf"/v1/{P}/models:upload", upload_model),
        ("GET", rf"/v1/{P}/models", list_models),
        ("GET", rf"/v1/{N.format('models')}", get_model),
        ("GET", rf"/v1/{N.format('models')}:listVersions", list_versions),
        ("POST", rf"/v1/{N.format('models')}:mergeVersionAliases", merge_version_aliases),
        ("POST", rf"/v1/{P}/endpoints", create_endpoint),
        ("GET", rf"/v1/{P}/endpoints", list_endpoints),
        ("GET", rf"/v1/{N.format('endpoints')}", get_endpoint),
        ("DELETE", rf"/v1/{N.format('endpoints')}", delete_endpoint),
        ("POST", rf"/v1/{N.format('endpoints')}:deployModel", deploy_model),
        ("POST", rf"/v1/{N.format('endpoints')}:undeployModel", undeploy_model),
        ("POST", rf"/v1/{N.format('endpoints')}:predict", predict),
        ("GET", rf"/v1/{N.format('metadataStores')}", get_metadata),
        ("POST", rf"/v1/{P}/metadataStores", create_metadata_store),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/metadataStores/[^/]+/(?:contexts|executions|artifacts)/[^/:]+)", get_metadata),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/metadataStores/[^/:]+)/contexts", create_context),
        ("PATCH", r"/v1/(projects/[^/]+/locations/[^/]+/metadataStores/[^/]+/contexts/[^/:]+)", update_context),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/metadataStores/[^/]+/contexts/[^/:]+):addContextChildren", add_context_children),
        # pipeline jobs
        ("POST", rf"/v1/{P}/pipelineJobs", create_pipeline_job),
        ("GET", rf"/v1/{P}/pipelineJobs", list_pipeline_jobs),
        ("GET", rf"/v1/{N.format('pipelineJobs')}", get_pipeline_job),
    ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: VertexFake

    def _serve(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        status, out = self.owner.handle(self.command, self.path, self.headers, body)
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, *a): pass
