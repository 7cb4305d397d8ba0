"""The prediction server on 127.0.0.1 with a small model trained on real data, and batch prediction through the CLI.

The registry's rules and the server's pieces (parsing, answers, health while loading) are tested in the notebooks
beside their code; here is what needs a trained model, a running server, a subprocess or a storage emulator.
"""
import ast
import base64
import json
import os
import subprocess
import threading
from http import HTTPStatus

import httpx
import nbformat
import numpy as np
import pytest

from conftest import BIN, NBS
from fmnist_gcp.config import DEFAULT_MODEL
from fmnist_gcp.serving import MAX_BODY_BYTES, MAX_INSTANCES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A small model trained on 3,000 real training images, exported and registered in a scratch models store."
    from fmnist_gcp.config import Settings, Store
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.registry import Registry
    from fmnist_gcp.training import TrainConfig, export_model, fit
    home = tmp_path_factory.mktemp("serve-home")
    s = Settings.from_env({"FMNIST_HOME": str(home)})
    x, y = load_split("train", limit=3000)
    cfg = TrainConfig(widths=(8, 16), convs=1, epochs=2, lr=0.01, seed=0, augment=Augment(True, 1, 0.0))
    model, _ = fit(cfg, x, y, x[:200], y[:200], 0.286, 0.353, log=lambda *_: None)
    export_model(model, cfg, {"run_id": "test", "name": DEFAULT_MODEL, "version": 1}, Store("models", s.models.uri(DEFAULT_MODEL, "1")))
    Registry(s, DEFAULT_MODEL).register(1)
    return s, str(home)


@pytest.fixture(scope="module")
def server(trained):
    from fmnist_gcp.serving import BackgroundServer, Predictor, create_app, model_source
    s, _ = trained
    uri, name, version = model_source(f"{DEFAULT_MODEL}@default", s)
    gate = threading.Event()
    def load():
        gate.wait(30)  # hold the load until the test has seen the 'loading' answer
        return Predictor(uri, name, version)
    srv = BackgroundServer(create_app(load, health_route="/v1/health", predict_route="/v1/models/fmnist:predict",
                                      deployed_model_id="123")).start()
    before = httpx.get(srv.url + "/v1/health")
    gate.set()
    ready = srv.wait_ready("/v1/health")
    yield srv, before, ready, uri
    srv.stop()


def post(srv, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + "/v1/models/fmnist:predict" + kw.pop("query", ""), content=data,
                      headers={"content-type": "application/json"}, timeout=30)


def test_health_is_503_until_the_model_is_loaded(server):
    _, before, ready, _ = server
    assert before.status_code == HTTPStatus.SERVICE_UNAVAILABLE and before.json()["status"] == "loading"
    assert ready == {"status": "ok", "model": DEFAULT_MODEL, "version": "1"}


def test_both_instance_formats_agree_with_the_model(server, trained):
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import AUTOML_LABELS, png_bytes
    from fmnist_gcp.serving import ALL_CLASSES
    from fmnist_gcp.training import load_model, predict
    srv, _, _, uri = server
    x, y = load_split("test", limit=20)
    want = predict(load_model(uri), x)
    body = {"instances": [im.tolist() for im in x[:10]] + [{"content": base64.b64encode(png_bytes(im)).decode()} for im in x[10:]],
            "parameters": ALL_CLASSES}
    r = post(srv, body, query="?$alt=json;enum-encoding=int")  # the Vertex SDK's REST transport adds this
    assert r.status_code == HTTPStatus.OK, r.text
    out = r.json()
    assert out["deployedModelId"] == "123" and len(out["predictions"]) == 20
    for p, w in zip(out["predictions"], want):
        assert p["ids"][0] == str(int(w.argmax())) and p["displayNames"][0] == AUTOML_LABELS[w.argmax()]
        assert np.allclose(sorted(p["confidences"], reverse=True), np.sort(w)[::-1], atol=1e-5)
        assert np.allclose([w[int(i)] for i in p["ids"]], p["confidences"], atol=1e-5)
    # AutoML's defaults: threshold 0.5 keeps at most one class of a softmax
    r = post(srv, {"instances": [x[0].tolist()]})
    assert len(r.json()["predictions"][0]["ids"]) <= 1


def test_a_batch_of_pixel_arrays_agrees_with_the_model(server):
    # pixel arrays only (no PNG among them): the request is read in one vectorised pass
    from fmnist_gcp.data import load_split
    from fmnist_gcp.serving import ALL_CLASSES
    from fmnist_gcp.training import load_model, predict
    srv, _, _, uri = server
    x, _ = load_split("test", limit=128)
    want = predict(load_model(uri), x)
    r = post(srv, {"instances": [im.tolist() for im in x], "parameters": ALL_CLASSES})
    assert r.status_code == HTTPStatus.OK, r.text
    got = np.array([[p["confidences"][p["ids"].index(str(c))] for c in range(10)] for p in r.json()["predictions"]])
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("what,body,status,needle,index", [
    ("invalid JSON", b"{nope", HTTPStatus.BAD_REQUEST, "not valid JSON", None),
    ("missing instances", {"inputs": []}, HTTPStatus.BAD_REQUEST, '"instances"', None),
    ("wrong shape", {"instances": [[[0] * 28] * 28, [[0] * 27] * 28]}, HTTPStatus.BAD_REQUEST, "28 rows of 28", 1),
    ("non-numeric", {"instances": [[["a"] * 28] * 28]}, HTTPStatus.BAD_REQUEST, "not a number", 0),
    ("NaN", b'{"instances": [[' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]]}", HTTPStatus.BAD_REQUEST, "not finite", 0),
    ("out of range", {"instances": [[[0] * 28] * 27 + [[256] * 28]]}, HTTPStatus.BAD_REQUEST, "outside 0-255", 0),
    # a batch of pixel arrays only is read in one numpy pass, which would take "7" as 7.0, true as 1.0 and null as NaN
    ("string pixel", {"instances": [[[0] * 28] * 28, [[0] * 28] * 27 + [[0] * 27 + ["7"]]]}, HTTPStatus.BAD_REQUEST, 'pixel [27][27] is "7", not a number', 1),
    ("boolean pixel", {"instances": [[[0] * 28] * 28, [[0] * 28] * 27 + [[0] * 27 + [True]]]}, HTTPStatus.BAD_REQUEST, "pixel [27][27] is true, not a number", 1),
    ("null pixel", {"instances": [[[0] * 28] * 28, [[None] * 28] * 28]}, HTTPStatus.BAD_REQUEST, "pixel [0][0] is null, not a number", 1),
    ("ragged batch", {"instances": [[[0] * 28] * 28, [[0] * 28] * 27 + [[0] * 29]]}, HTTPStatus.BAD_REQUEST, "28 rows of 28", 1),
    ("bad base64", {"instances": [{"content": "%%%"}]}, HTTPStatus.BAD_REQUEST, "not valid base64", 0),
    ("not an image", {"instances": [{"content": base64.b64encode(b"GIF89a nonsense").decode()}]}, HTTPStatus.BAD_REQUEST, "not a decodable image", 0),
    ("too many", {"instances": [[[0] * 28] * 28] * (MAX_INSTANCES + 1)}, HTTPStatus.BAD_REQUEST, f"at most {MAX_INSTANCES}", None),
    ("body over the limit", b'{"instances": [' + b"0," * (MAX_BODY_BYTES // 2) + b"0]}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"limit is {MAX_BODY_BYTES:,}", None),
    ("bad parameter", {"instances": [[[0] * 28] * 28], "parameters": {"confidenceThreshold": 2}}, HTTPStatus.BAD_REQUEST, "confidenceThreshold", None),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, what, body, status, needle, index):
    srv = server[0]
    r = post(srv, body)
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert needle in err["message"] and err.get("instance") == index, (what, err)
    assert post(srv, {"instances": [[[0] * 28] * 28]}).status_code == HTTPStatus.OK


def test_batch_prediction_round_trip_through_the_cli(trained, tmp_path):
    from fmnist_gcp.data import load_split
    from fmnist_gcp.registry import Registry
    from fmnist_gcp.training import load_model, predict
    s, home = trained
    x, _ = load_split("test", limit=300)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(im.tolist()) + "\n" for im in x) + "[1, 2]\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "FMNIST_HOME": home}
    r = subprocess.run([str(BIN / "fmnist"), "predict", "--input", str(src), "--output", str(out), "--batch-size", "128"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "300 predictions" in r.stdout and "1 lines could not be used" in r.stderr, r.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    reg = Registry(s, DEFAULT_MODEL)  # without --model the CLI serves the registry's default
    want = predict(load_model(reg.version_store(reg.resolve("default")).uri("model.keras")), x)
    assert len(lines) == 300 and lines[0]["instance"] == x[0].tolist()
    assert [int(l["prediction"]["ids"][0]) for l in lines] == list(want.argmax(1))
    assert json.loads((tmp_path / "out.jsonl.errors.jsonl").read_text())["line"] == 301
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.errors.jsonl"]


def test_batch_prediction_writes_to_gcs(gcs_emulator, monkeypatch, tmp_path):
    from fmnist_gcp.config import Store
    from fmnist_gcp.serving import predict_jsonl
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    class OneHot:  # stands in for the model: always class 9
        def __call__(self, x): return np.eye(10)[np.full(len(x), 9)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps([[i] * 28] * 28) + "\n" for i in range(5)))
    res = predict_jsonl(OneHot(), str(src), "gs://fmnist-test/batch/out.jsonl", batch_size=2, progress=False)
    lines = Store("dev", "gs://fmnist-test/batch").read_text("out.jsonl").splitlines()
    assert res == {"predictions": 5, "errors": 0, "output": "gs://fmnist-test/batch/out.jsonl"} and len(lines) == 5
    assert json.loads(lines[3])["prediction"]["displayNames"] == ["Ankle_boot"]
    assert json.loads(lines[3])["instance"][0][0] == 3


@pytest.mark.parametrize("notebook,name", [("08_evaluation", "model_name"), ("09_registry", "model_name"),
                                           ("09a_serving", "model_name"), ("cloud_endpoints", "model_ref")])
def test_stage_parameters_default_to_the_config_model(notebook, name):
    # a papermill parameter must be a literal, so it cannot import config.DEFAULT_MODEL: this keeps them equal
    nb = nbformat.read(NBS / f"{notebook}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
              if isinstance(node, ast.AnnAssign) for t in [node.target]}
    assert params[name].partition("@")[0] == DEFAULT_MODEL, (notebook, params[name])
