"""A fake Vertex AI REST service on loopback, for the real SDK on its REST transport.

An HTTPS server on 127.0.0.1 (a self-signed certificate made here, trusted through REQUESTS_CA_BUNDLE), an OAuth
token endpoint that checks the JWT a service-account key made here signs, and the v1 REST methods this package calls:
customJobs (create, get, list, cancel) and batchPredictionJobs (create, get, cancel), models (upload, get, list, listVersions,
mergeVersionAliases), endpoints (create, get, list, deployModel, undeployModel, delete), predict (forwarded to the
deployed model's serving container, started as Vertex starts it: `fmnist serve` with the AIP_* variables), operations get,
the metadata calls Vertex Experiments makes, and (a section of their own at the end of the class) AutoML datasets
(create, import), AutoML image classification trainingPipelines, model evaluations in the shape Vertex returns
(`automl_image_evaluation`), hyperparameterTuningJobs, and Feature Store V2 (online stores, feature views, syncs
not done on their first get and listed by create_time, fetchFeatureValues and searchNearestEntities on the store's
serving endpoint, which is the fake itself), and pipelineJobs (create, get, list). It refuses what Vertex refuses (required fields of the v1 protos, aliases, deploy resources,
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
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

PROJECT, REGION, PROJECT_NUMBER = "acme-ml", "europe-west4", "123456789012"
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


FILTER_TERM = re.compile(r'(display_name|labels\.[\w-]+)\s*=\s*"([^"]*)"')


def filtered(items: list[dict], flt: str) -> list[dict]:
    """The items matching a list filter of `display_name="..."` and `labels.KEY="..."` terms joined by AND (what this
    package sends); INVALID_ARGUMENT for any other filter, as Vertex answers one it cannot parse."""
    terms = [t.strip() for t in re.split(r"\bAND\b", flt)] if flt.strip() else []
    parsed = [FILTER_TERM.fullmatch(t) for t in terms]
    if not all(parsed): raise invalid(f"Unsupported filter: {flt!r}.")
    def value(m, k): return m.get("displayName") if k == "display_name" else m.get("labels", {}).get(k[7:])
    return [m for m in items if all(value(m, p[1]) == p[2] for p in parsed)]


SYNC_FILTER = re.compile(r'create_time\s*(=|!=|<=|>=|<|>)\s*"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d))"')
SYNC_OPS = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


def rfc3339(t: str) -> datetime.datetime:
    "An RFC 3339 time (Z or an offset, up to nanoseconds: those past the microsecond dropped) as an aware datetime."
    t = re.sub(r"(\.\d{6})\d+", r"\1", t).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(t)


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
    at: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)

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


class ServingContainer:
    """A deployed model's serving container, started as Vertex starts it: the serve image's entry point (`fmnist serve`,
    the venv's script beside sys.executable) in a subprocess whose environment holds the AIP_* variables Vertex sets
    (https://cloud.google.com/vertex-ai/docs/predictions/custom-container-requirements) and containerSpec.env. Two
    differences, both for tests: it binds 127.0.0.1 (the image: 0.0.0.0), and on a free port given as AIP_HTTP_PORT
    (Vertex: containerSpec.ports[0], 8080); AIP_STORAGE_URI is the model's artifactUri itself (Vertex: a copy of it)."""
    def __init__(self, endpoint: str, deployed: dict, model: dict, folder: Path):
        from fmnist_gcp.serving import free_port
        c = model.get("containerSpec") or {}
        if c.get("command") or c.get("args"):
            raise ApiError(501, "containerSpec.command/args are not modelled by the Vertex fake: it runs the serve image's "
                                "entry point only.", "UNIMPLEMENTED")
        ep_id, dm_id = endpoint.rsplit("/", 1)[-1], deployed["id"]
        route = f"/v1/endpoints/{ep_id}/deployedModels/{dm_id}"  # Vertex's default routes
        self.port = free_port()
        self.health_route, self.predict_route = c.get("healthRoute") or route, c.get("predictRoute") or f"{route}:predict"
        self.env = {"AIP_HTTP_PORT": str(self.port), "AIP_HEALTH_ROUTE": self.health_route,
                    "AIP_PREDICT_ROUTE": self.predict_route, "AIP_STORAGE_URI": model.get("artifactUri", ""),
                    "AIP_DEPLOYED_MODEL_ID": dm_id, "AIP_ENDPOINT_ID": ep_id, "AIP_MODE": "PREDICTION",
                    "AIP_MODE_VERSION": "1.0.0", "AIP_FRAMEWORK": "CUSTOM_CONTAINER", "AIP_PROJECT_NUMBER": PROJECT_NUMBER,
                    "AIP_MODEL_NAME": ep_id, "AIP_VERSION_NAME": dm_id,  # as Vertex sets them: the endpoint's and deployed model's ids
                    "AIP_MACHINE_TYPE": get_path(deployed, "dedicatedResources.machineSpec.machineType") or "n1-standard-2"}
        self.env |= {e["name"]: e.get("value", "") for e in c.get("env", [])}
        self.url, self.log_path, self.health = f"http://127.0.0.1:{self.port}", folder / f"container-{dm_id}.log", None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ServingContainer":
        "Start the entry point and wait until the health route answers 200 (Vertex waits so before a deploy is done)."
        import httpx
        import fmnist_gcp
        script = Path(sys.executable).parent / "fmnist"
        pkg_root = str(Path(fmnist_gcp.__file__).resolve().parents[1])  # the package under test, wherever it came from
        path = os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(script), "serve", "--host", "127.0.0.1"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": path, **self.env})
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None: raise self._failed(f"exited with status {self.proc.returncode}")
            try: r = httpx.get(self.url + self.health_route, timeout=5)
            except httpx.TransportError: r = None
            if r is not None and r.status_code == 200: self.health = r.json(); return self
            if r is not None and r.headers.get("content-type", "").startswith("application/json") and r.json().get("status") == "failed":
                raise self._failed(f"reported {r.json()}")
            time.sleep(0.1)
        raise self._failed(f"did not answer 200 on {self.health_route} within {timeout:.0f} s")

    def _failed(self, what: str) -> ApiError:
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        return precondition(f"The model's serving container {what}; its log ends:\n{tail}")

    def predict(self, body: dict) -> dict:
        import httpx
        r = httpx.post(self.url + self.predict_route, json=body, timeout=120)
        if r.status_code != 200: raise invalid(f"The model's container answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        if getattr(self, "log", None): self.log.close()


# ----------------------------------------------------------------------------------------------------------------
# AutoML: schemas, and an image classification evaluation in the shape Vertex returns
# ----------------------------------------------------------------------------------------------------------------
SCHEMA = "gs://google-cloud-aiplatform/schema/"
IMAGE_DATASET = SCHEMA + "dataset/metadata/image_1.0.0.yaml"
IMPORT_SCHEMAS = {IMAGE_DATASET: {SCHEMA + f"dataset/ioformat/image_{k}_io_format_1.0.0.yaml" for k in (
    "classification_single_label", "classification_multi_label", "bounding_box", "segmentation")}}
AUTOML_IMAGE_CLASSIFICATION = SCHEMA + "trainingjob/definition/automl_image_classification_1.0.0.yaml"
IMAGE_MODEL_TYPES = {"CLOUD", "CLOUD_1", "MOBILE_TF_LOW_LATENCY_1", "MOBILE_TF_VERSATILE_1", "MOBILE_TF_HIGH_ACCURACY_1",
                     "EFFICIENTNET", "MAXVIT", "VIT", "COCA"}
CLASSIFICATION_METRICS = SCHEMA + "modelevaluation/classification_metrics_1.0.0.yaml"
PIPELINE_STATES = ["PIPELINE_STATE_QUEUED", "PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"]
THRESHOLDS = [round(0.05 * i, 2) for i in range(19)] + [0.95, 0.96, 0.97, 0.98, 0.99]  # Vertex's confidence thresholds


def _f32(x) -> float: return float(np.float32(x))  # Vertex reports floats (0.9946683), not doubles


def automl_image_evaluation(y, proba, labels, seed: int = 0) -> dict:
    """The `metrics` of a Vertex AutoML image classification ModelEvaluation for true classes `y` and confidences `proba`,
    in the shape Vertex returns (its documented ListModelEvaluations answer for an image classification model): auPrc
    and logLoss, no auRoc; confidenceMetrics with recall and precision (micro-averaged over image x class) at each
    threshold, fields that are zero left out (confidenceThreshold 0 included); confusionMatrix with annotationSpecs
    (long numeric ids) in Vertex's own order, not the labels', and rows of counts."""
    from sklearn.metrics import average_precision_score
    y, proba = np.asarray(y), np.asarray(proba, float)
    truth = np.eye(proba.shape[1], dtype=bool)[y]
    entries = []
    for th in THRESHOLDS:
        pos = proba >= th
        tp, fp, fn = int((pos & truth).sum()), int((pos & ~truth).sum()), int((~pos & truth).sum())
        e = {"confidenceThreshold": _f32(th), "recall": _f32(tp / max(tp + fn, 1)), "precision": _f32(tp / (tp + fp) if tp + fp else 0)}
        entries.append({k: v for k, v in e.items() if v})
    order = np.random.default_rng(seed).permutation(len(labels))
    pred, k = proba.argmax(1), len(labels)
    counts = np.zeros((k, k), int)
    np.add.at(counts, (y, pred), 1)
    ids = np.random.default_rng(seed + 1).integers(10**17, 9 * 10**18, k)
    return {"auPrc": _f32(average_precision_score(truth.ravel(), proba.ravel())),
            "logLoss": _f32(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1)))),
            "confidenceMetrics": entries,
            "confusionMatrix": {"annotationSpecs": [{"id": str(ids[i]), "displayName": labels[i]} for i in order],
                                "rows": [[int(counts[i, j]) for j in order] for i in order]}}


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
        self.containers: dict[str, ServingContainer] = {}  # deployed model id -> its running serving container
        self.job_end, self.on_job_end = "JOB_STATE_SUCCEEDED", lambda job: None
        self.still: set[str] = set()  # jobs that stay in their state
        # AutoML and tuning (the section at the end of the class)
        self.datasets: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}  # trainingPipelines by name
        self.evaluations: dict[str, list[dict]] = {}  # model name -> its ModelEvaluations
        self.pipeline_end = "PIPELINE_STATE_SUCCEEDED"
        self.automl_metrics: dict | None = None  # the `metrics` of the evaluation an AutoML pipeline's model gets
        # Feature Store V2 (the same section)
        self.online_stores: dict[str, dict] = {}
        self.feature_views: dict[str, dict] = {}
        self.syncs: dict[str, dict] = {}  # featureViewSync name -> {"gets": n, ...}
        self.sync_gets: list[str] = []  # every get of a sync, in order
        self.sync_polls, self.sync_code = 3, 0  # a sync ends on its third get, with this status code
        self.feature_rows: dict[str, dict[str, dict]] = {}  # view id -> entity id -> row: what its BigQuery table holds
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
        for c in self.containers.values(): c.stop()

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

    def list_custom_jobs(self, parent, query, **_):
        "The custom jobs the filter's terms match (ListCustomJobsRequest.filter), oldest first."
        jobs = [dict(j) for n, j in self.jobs.items() if n.startswith(f"{parent}/customJobs/")]
        return {"customJobs": filtered(jobs, query.get("filter", ""))}

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
        found = filtered([self._resolve(n) for n in self.models if n.startswith(parent + "/")], query.get("filter", ""))
        if query.get("orderBy", "create_time") in ("create_time", "createTime"): found.sort(key=lambda m: m["createTime"])
        return {"models": found}

    def list_versions(self, name, query, **_):
        "The model's versions, oldest first, those the filter's terms match (ListModelVersionsRequest.filter)."
        if name not in self.models: raise not_found(name)
        return {"models": filtered(list(self.models[name]), query.get("filter", ""))}

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

    def list_endpoints(self, parent, query, **_):
        "The endpoints the filter's terms match (ListEndpointsRequest.filter)."
        return {"endpoints": filtered([e for n, e in self.endpoints.items() if n.startswith(parent + "/")], query.get("filter", ""))}

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
        if dm_id in self.containers: self.containers.pop(dm_id).stop()
        return self._operation(endpoint, "UndeployModelOperationMetadata", {"@type": T + "UndeployModelResponse"})

    def delete_endpoint(self, name, **_):
        ep = self._endpoint(name)
        if ep.get("deployedModels"):
            raise precondition(f"Endpoint {name} has deployed models: undeploy them before deleting it.")
        del self.endpoints[name]
        return self._operation(name, "DeleteOperationMetadata", None)

    def predict(self, endpoint, body, **_):
        "The deployed model with the most traffic answers, through its serving container (started on the first predict)."
        ep = self._endpoint(endpoint)
        require(body, "predict_request", "instances")
        if not ep.get("trafficSplit"):
            raise precondition(f"Endpoint {endpoint} has no deployed model with traffic to serve the request.")
        dm_id = max(ep["trafficSplit"], key=ep["trafficSplit"].get)
        dm = next(d for d in ep["deployedModels"] if d["id"] == dm_id)
        m = self._resolve(f"{dm['model']}@{dm['modelVersionId']}")
        if dm_id not in self.containers: self.containers[dm_id] = ServingContainer(endpoint, dm, m, self.folder).start()
        out = self.containers[dm_id].predict({"instances": body["instances"], "parameters": body.get("parameters", {})})
        return {"predictions": out["predictions"], "deployedModelId": dm_id, "model": m["name"],
                "modelDisplayName": m["displayName"], "modelVersionId": m["versionId"]}

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
        ("GET", rf"/v1/{P}/customJobs", list_custom_jobs),
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

    # ================================================================================================================
    # AutoML (datasets, training pipelines, model evaluations) and hyperparameter tuning jobs: their own section at the
    # end of the class and of ROUTES, apart from the jobs/models/endpoints part above
    # ================================================================================================================
    def create_dataset(self, parent, body, **_):
        require(body, "dataset", "displayName", "metadataSchemaUri")
        if body["metadataSchemaUri"] not in IMPORT_SCHEMAS:
            raise invalid(f"dataset.metadata_schema_uri {body['metadataSchemaUri']!r} is not a dataset metadata schema "
                          f"the fake models (it models {IMAGE_DATASET}).")
        name = f"{parent}/datasets/{next(self._ids)}"
        self.datasets[name] = ds = {**body, "name": name, "createTime": now(), "updateTime": now(), "etag": "d1"}
        return self._operation(name, "CreateDatasetOperationMetadata", {"@type": T + "Dataset", **ds})

    def get_dataset(self, name, **_):
        if name not in self.datasets: raise not_found(name)
        return self.datasets[name]

    def import_data(self, name, body, **_):
        "ImportDataRequest: import_configs required; each with a gcs_source of gs:// uris and an import schema of the dataset's type."
        ds = self.get_dataset(name)
        require(body, "import_data_request", "importConfigs")
        for i, cfg in enumerate(body["importConfigs"]):
            what = f"import_data_request.import_configs[{i}]"
            require(cfg, what, "importSchemaUri")
            if "gcsSource" not in cfg: raise invalid(f"{what}: a source is required (gcs_source).")
            require(cfg, what, "gcsSource.uris")
            bad = [u for u in cfg["gcsSource"]["uris"] if not u.startswith("gs://")]
            if bad: raise invalid(f"{what}.gcs_source.uris must be gs:// URIs, not {bad}.")
            if cfg["importSchemaUri"] not in IMPORT_SCHEMAS[ds["metadataSchemaUri"]]:
                raise invalid(f"{what}.import_schema_uri {cfg['importSchemaUri']!r} does not fit a dataset of "
                              f"{ds['metadataSchemaUri']}.")
        ds.setdefault("imports", []).extend(body["importConfigs"])
        return self._operation(name, "ImportDataOperationMetadata", {"@type": T + "ImportDataResponse"})

    def create_training_pipeline(self, parent, body, **_):
        require(body, "training_pipeline", "displayName", "trainingTaskDefinition", "trainingTaskInputs")
        if body["trainingTaskDefinition"] != AUTOML_IMAGE_CLASSIFICATION:
            raise ApiError(501, f"trainingTaskDefinition {body['trainingTaskDefinition']} is not modelled by the Vertex fake.",
                           "UNIMPLEMENTED")
        require(body, "training_pipeline", "inputDataConfig.datasetId", "modelToUpload.displayName")
        self.get_dataset(f"{parent}/datasets/{body['inputDataConfig']['datasetId']}")
        inputs = body["trainingTaskInputs"]
        budget = inputs.get("budgetMilliNodeHours")
        if budget is None or not 8_000 <= float(budget) <= 800_000:
            raise invalid(f"training_task_inputs.budget_milli_node_hours must be between 8000 and 800000 for image "
                          f"classification, not {budget}.")
        if inputs.get("modelType", "CLOUD") not in IMAGE_MODEL_TYPES:
            raise invalid(f"training_task_inputs.model_type {inputs['modelType']!r} is not an image classification model type.")
        name = f"{parent}/trainingPipelines/{next(self._ids)}"
        self.pipelines[name] = {**body, "name": name, "state": PIPELINE_STATES[0], "createTime": now(), "updateTime": now()}
        return dict(self.pipelines[name])

    def get_training_pipeline(self, name, **_):
        "Each get moves the pipeline one state on: QUEUED, PENDING, RUNNING, then `pipeline_end` (success: its model, evaluated)."
        if name not in self.pipelines: raise not_found(name)
        tp = self.pipelines[name]
        if tp["state"] in PIPELINE_STATES:
            i = PIPELINE_STATES.index(tp["state"])
            if i + 1 < len(PIPELINE_STATES): tp["state"] = PIPELINE_STATES[i + 1]
            else:
                tp["state"], tp["endTime"] = self.pipeline_end, now()
                if self.pipeline_end == "PIPELINE_STATE_SUCCEEDED": self._automl_model(tp)
                else: tp["error"] = {"code": 13, "message": "Internal error occurred. Please retry in a few minutes."}
            tp["updateTime"] = now()
        return dict(tp)

    def _automl_model(self, tp: dict) -> None:
        "The model a succeeded AutoML pipeline uploads (no container: Google serves it), and its evaluation."
        parent = tp["name"].split("/trainingPipelines/")[0]
        name = f"{parent}/models/{next(self._ids)}"
        v = self._version(name, {**tp["modelToUpload"], "trainingPipeline": tp["name"]}, "1", ["default"])
        v["supportedDeploymentResourcesTypes"] = ["AUTOMATIC_RESOURCES"]
        self.models[name] = [v]
        tp["modelToUpload"] = {**tp["modelToUpload"], "name": name, "versionId": "1"}
        tp["modelId"] = name.rsplit("/", 1)[-1]
        if self.automl_metrics is not None:
            self.evaluations[name] = [{"name": f"{name}/evaluations/{next(self._ids)}", "metricsSchemaUri": CLASSIFICATION_METRICS,
                                       "metrics": self.automl_metrics, "createTime": now(), "sliceDimensions": ["annotationSpec"]}]

    def list_model_evaluations(self, model, **_):
        base = model.partition("@")[0]
        if base not in self.models: raise not_found(model)
        return {"modelEvaluations": self.evaluations.get(base, [])}

    def get_model_evaluation(self, name, **_):
        found = [e for evs in self.evaluations.values() for e in evs if e["name"] == name]
        if not found: raise not_found(name)
        return found[0]

    def create_hyperparameter_tuning_job(self, parent, body, **_):
        "HyperparameterTuningJob: the required fields of the v1 proto, each metric and parameter complete; trials as custom job pools."
        what = "hyperparameter_tuning_job"
        require(body, what, "displayName", "studySpec.metrics", "studySpec.parameters", "maxTrialCount",
                "parallelTrialCount", "trialJobSpec")
        require(body, what, "trialJobSpec.workerPoolSpecs")
        for i, m in enumerate(body["studySpec"]["metrics"]): require(m, f"{what}.study_spec.metrics[{i}]", "metricId", "goal")
        kinds = ("doubleValueSpec", "integerValueSpec", "categoricalValueSpec", "discreteValueSpec")
        for i, p in enumerate(body["studySpec"]["parameters"]):
            require(p, f"{what}.study_spec.parameters[{i}]", "parameterId")
            if sum(k in p for k in kinds) != 1:
                raise invalid(f"{what}.study_spec.parameters[{i}] ({p['parameterId']}): exactly one parameter value spec is required.")
            spec = next(p[k] for k in kinds if k in p)
            if "minValue" in spec and float(spec["minValue"]) >= float(spec.get("maxValue", spec["minValue"])):
                raise invalid(f"{what}.study_spec.parameters[{i}] ({p['parameterId']}): min_value must be less than max_value.")
        if int(body["parallelTrialCount"]) > int(body["maxTrialCount"]):
            raise invalid(f"{what}.parallel_trial_count ({body['parallelTrialCount']}) must not exceed max_trial_count "
                          f"({body['maxTrialCount']}).")
        for i, pool in enumerate(body["trialJobSpec"]["workerPoolSpecs"]):
            require(pool, f"{what}.trial_job_spec.worker_pool_specs[{i}]", "machineSpec.machineType", "replicaCount",
                    "containerSpec.imageUri")
        return self._new_job(f"{parent}/hyperparameterTuningJobs", body)


    # -- Feature Store V2: online stores, feature views, syncs (admin, on the region's endpoint); fetch and search (on
    # -- the store's own serving endpoint, which the fake reports as itself) ----------------------------------------
    def create_online_store(self, parent, body, query, **_):
        sid = query.get("featureOnlineStoreId", "")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,59}", sid):
            raise invalid(f"feature_online_store_id {sid!r} must match [a-z_][a-z0-9_]{{0,59}}.")
        if sum(k in body for k in ("bigtable", "optimized")) != 1:
            raise invalid("feature_online_store: exactly one storage type (bigtable or optimized) is required.")
        name = f"{parent}/featureOnlineStores/{sid}"
        if name in self.online_stores: raise ApiError(409, f"FeatureOnlineStore {name} already exists.")
        store = {**body, "name": name, "createTime": now(), "updateTime": now(), "etag": "s1", "state": "STABLE"}
        if "optimized" in body:  # its own serving domain: here, the fake itself
            store["dedicatedServingEndpoint"] = {"publicEndpointDomainName": self.host}
        self.online_stores[name] = store
        return self._operation(name, "CreateFeatureOnlineStoreOperationMetadata", {"@type": T + "FeatureOnlineStore", **store})

    def get_online_store(self, name, **_):
        if name not in self.online_stores: raise not_found(name)
        return self.online_stores[name]

    def delete_online_store(self, name, query, **_):
        "Refused while it holds feature views, unless force."
        self.get_online_store(name)
        views = [v for v in self.feature_views if v.startswith(name + "/featureViews/")]
        if views and query.get("force") != "true":
            raise precondition(f"FeatureOnlineStore {name} has feature views {views}: delete them first or set force.")
        for v in views: del self.feature_views[v]
        del self.online_stores[name]
        return self._operation(name, "DeleteOperationMetadata", None)

    def create_feature_view(self, store, body, query, **_):
        self.get_online_store(store)
        vid = query.get("featureViewId", "")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,59}", vid): raise invalid(f"feature_view_id {vid!r} must match [a-z_][a-z0-9_]{{0,59}}.")
        if "bigQuerySource" in body:
            require(body, "feature_view.big_query_source", "bigQuerySource.uri", "bigQuerySource.entityIdColumns")
        elif "featureRegistrySource" not in body:
            raise invalid("feature_view: a source is required (big_query_source or feature_registry_source).")
        if "indexConfig" in body:
            require(body, "feature_view.index_config", "indexConfig.embeddingColumn", "indexConfig.embeddingDimension")
        name = f"{store}/featureViews/{vid}"
        if name in self.feature_views: raise ApiError(409, f"FeatureView {name} already exists.")
        self.feature_views[name] = view = {**body, "name": name, "createTime": now(), "updateTime": now(), "etag": "v1"}
        return self._operation(name, "CreateFeatureViewOperationMetadata", {"@type": T + "FeatureView", **view})

    def _feature_view(self, name):
        if name not in self.feature_views: raise not_found(name)
        return self.feature_views[name]

    def get_feature_view(self, name, **_): return self._feature_view(name)

    def sync_feature_view(self, view, **_):
        self._feature_view(view)
        name = f"{view}/featureViewSyncs/{next(self._ids)}"
        self.syncs[name] = {"gets": 0, "createTime": now()}
        return {"featureViewSync": name}

    def _sync(self, name) -> dict:
        "A FeatureViewSync as Vertex shows it: running (run_time without end_time, no final_status) until its `sync_polls`-th get."
        sync = self.syncs[name]
        out = {"name": name, "createTime": sync["createTime"], "runTime": {"startTime": sync["createTime"]}}
        if sync["gets"] >= self.sync_polls:
            out["runTime"]["endTime"] = sync.setdefault("endTime", now())
            out["finalStatus"] = {"code": self.sync_code, "message": "BigQuery table has duplicate entity ids"} if self.sync_code else {}
        return out

    def get_feature_view_sync(self, name, **_):
        "Running until its `sync_polls`-th get, then ended with `sync_code`."
        if name not in self.syncs: raise not_found(name)
        self.syncs[name]["gets"] += 1; self.sync_gets.append(name)
        return self._sync(name)

    def list_feature_view_syncs(self, view, query, **_):
        """The view's syncs (ListFeatureViewSyncsRequest): `filter` only `create_time OP "RFC 3339"` (OP one of = != < > <= >=),
        `orderBy` only `create_time` [desc|asc] (the fields the v1 proto documents), anything else INVALID_ARGUMENT;
        `pageSize` (at most 1000) and the `pageToken` of an earlier answer. Listing does not move a sync on."""
        self._feature_view(view)
        flt, order = query.get("filter", "").strip(), query.get("orderBy", "").strip()
        m = SYNC_FILTER.fullmatch(flt) if flt else None
        if flt and not m: raise invalid(f"Unsupported filter: {flt!r}. FeatureViewSyncs filter on create_time only, "
                                        'e.g. create_time > "2020-01-31T15:30:00.000000Z".')
        if order and not re.fullmatch(r"create_time(\s+(desc|asc))?", order):
            raise invalid(f"Unsupported order_by: {order!r}. FeatureViewSyncs order by create_time [desc] only.")
        found = [n for n in self.syncs if n.startswith(view + "/featureViewSyncs/")]
        if m: found = [n for n in found if SYNC_OPS[m[1]](rfc3339(self.syncs[n]["createTime"]), rfc3339(m[2]))]
        found.sort(key=lambda n: rfc3339(self.syncs[n]["createTime"]), reverse=order.endswith("desc"))
        size = min(int(query.get("pageSize") or 1000), 1000)
        if size < 0: raise invalid(f"page_size must not be negative, not {size}.")
        token = query.get("pageToken", "")
        if token and not (token.isdigit() and int(token) <= len(found)): raise invalid(f"Invalid page token {token!r}.")
        start = int(token or 0)
        out = {"featureViewSyncs": [self._sync(n) for n in found[start:start + size]]}
        if start + size < len(found): out["nextPageToken"] = str(start + size)
        return out

    @staticmethod
    def _feature_value(v) -> dict:
        if isinstance(v, list): return {"doubleArrayValue": {"values": [float(x) for x in v]}}
        if isinstance(v, str): return {"stringValue": v}
        if isinstance(v, (bool, np.bool_)): return {"boolValue": bool(v)}
        return {"int64Value": str(int(v))} if isinstance(v, (int, np.integer)) else {"doubleValue": float(v)}

    def _key_values(self, view_id, key):
        return {"features": [{"name": k, "value": self._feature_value(v)} for k, v in self.feature_rows[view_id][key].items()]}

    def _synced_rows(self, view):
        self._feature_view(view)
        view_id = view.rsplit("/", 1)[1]
        if not any(n.startswith(view + "/") and s["gets"] >= self.sync_polls for n, s in self.syncs.items()):
            raise precondition(f"FeatureView {view} has no completed sync: its online data is empty.")
        return view_id, self.feature_rows.get(view_id, {})

    def fetch_feature_values(self, view, body, **_):
        key = get_path(body, "dataKey.key")
        if not key: raise invalid("fetch_feature_values: data_key.key is required.")
        if body.get("dataFormat") not in ("KEY_VALUE", 1): raise invalid("data_format must be KEY_VALUE or PROTO_STRUCT; the fake models KEY_VALUE.")
        view_id, rows = self._synced_rows(view)
        if key not in rows: raise ApiError(404, f"Entity {key} is not found in feature view {view}.", "NOT_FOUND")
        return {"keyValues": self._key_values(view_id, key)}

    def search_nearest_entities(self, view, body, **_):
        "Exact cosine-distance neighbours of `query.entityId` among the view's synced rows (the view needs an index config)."
        fv = self._feature_view(view)
        if "indexConfig" not in fv: raise precondition(f"FeatureView {view} has no index_config: it cannot be searched.")
        q = body.get("query") or {}
        if not q.get("entityId") and not q.get("embedding"): raise invalid("query: an entity_id or an embedding is required.")
        view_id, rows = self._synced_rows(view)
        col = fv["indexConfig"]["embeddingColumn"]
        if q.get("entityId") and q["entityId"] not in rows: raise ApiError(404, f"Entity {q['entityId']} is not found.", "NOT_FOUND")
        vec = np.array(rows[q["entityId"]][col] if q.get("entityId") else q["embedding"]["value"], float)
        dist = {i: 1 - float(vec @ np.array(r[col]) / np.linalg.norm(vec) / np.linalg.norm(r[col])) for i, r in rows.items()}
        near = sorted(dist, key=dist.get)[:int(q.get("neighborCount") or 10)]
        return {"nearestNeighbors": {"neighbors": [
            {"entityId": i, "distance": dist[i], **({"entityKeyValues": {"keyValues": self._key_values(view_id, i)}} if body.get("returnFullEntity") else {})}
            for i in near]}}

    ROUTES = ROUTES + [
        ("POST", rf"/v1/{P}/datasets", create_dataset),
        ("GET", rf"/v1/{N.format('datasets')}", get_dataset),
        ("POST", rf"/v1/{N.format('datasets')}:import", import_data),
        ("POST", rf"/v1/{P}/trainingPipelines", create_training_pipeline),
        ("GET", rf"/v1/{N.format('trainingPipelines')}", get_training_pipeline),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/models/[^/:]+)/evaluations", list_model_evaluations),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/models/[^/:]+/evaluations/[^/:]+)", get_model_evaluation),
        ("POST", rf"/v1/{P}/hyperparameterTuningJobs", create_hyperparameter_tuning_job),
        ("GET", rf"/v1/{N.format('hyperparameterTuningJobs')}", get_job),
        ("POST", rf"/v1/{N.format('hyperparameterTuningJobs')}:cancel", cancel_job),
        ("GET", r"/(?:v1|ui)/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+/operations/[^/:]+)", get_operation),  # a view's own operations
        ("POST", rf"/v1/{P}/featureOnlineStores", create_online_store),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+)", get_online_store),
        ("DELETE", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+)", delete_online_store),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+)/featureViews", create_feature_view),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+)", get_feature_view),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+):sync", sync_feature_view),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+/featureViewSyncs/[^/:]+)", get_feature_view_sync),
        ("GET", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+)/featureViewSyncs", list_feature_view_syncs),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+):fetchFeatureValues", fetch_feature_values),
        ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/featureOnlineStores/[^/:]+/featureViews/[^/:]+):searchNearestEntities", search_nearest_entities),
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
