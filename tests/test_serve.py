"""The prediction server on 127.0.0.1 with a small model trained on real data, the registry, and batch prediction."""
import base64
import json
import subprocess
import threading

import httpx
import numpy as np
import pytest

from conftest import BIN

PIXELS = 28 * 28


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
    export_model(model, cfg, {"run_id": "test", "name": "fmnist-cnn", "version": 1}, Store("models", s.models.uri("fmnist-cnn", "1")))
    Registry(s, "fmnist-cnn").register(1)
    return s, str(home)


@pytest.fixture(scope="module")
def server(trained):
    from fmnist_gcp.serving import BackgroundServer, Predictor, create_app, model_source
    s, _ = trained
    uri, name, version = model_source("fmnist-cnn@default", s)
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
    assert before.status_code == 503 and before.json()["status"] == "loading"
    assert ready == {"status": "ok", "model": "fmnist-cnn", "version": "1"}


def test_both_instance_formats_agree_with_the_model(server, trained):
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import AUTOML_LABELS, png_bytes
    from fmnist_gcp.training import load_model, predict
    srv, _, _, uri = server
    x, y = load_split("test", limit=20)
    want = predict(load_model(uri), x)
    body = {"instances": [im.tolist() for im in x[:10]] + [{"content": base64.b64encode(png_bytes(im)).decode()} for im in x[10:]],
            "parameters": {"confidenceThreshold": 0.0, "maxPredictions": 10}}
    r = post(srv, body, query="?$alt=json;enum-encoding=int")  # the Vertex SDK's REST transport adds this
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["deployedModelId"] == "123" and len(out["predictions"]) == 20
    for p, w in zip(out["predictions"], want):
        assert p["ids"][0] == str(int(w.argmax())) and p["displayNames"][0] == AUTOML_LABELS[w.argmax()]
        assert np.allclose(sorted(p["confidences"], reverse=True), np.sort(w)[::-1], atol=1e-5)
        assert np.allclose([w[int(i)] for i in p["ids"]], p["confidences"], atol=1e-5)
    # AutoML's defaults: threshold 0.5 keeps at most one class of a softmax
    r = post(srv, {"instances": [x[0].tolist()]})
    assert len(r.json()["predictions"][0]["ids"]) <= 1


@pytest.mark.parametrize("what,body,status,needle,index", [
    ("invalid JSON", b"{nope", 400, "not valid JSON", None),
    ("missing instances", {"inputs": []}, 400, '"instances"', None),
    ("wrong shape", {"instances": [[[0] * 28] * 28, [[0] * 27] * 28]}, 400, "28 rows of 28", 1),
    ("non-numeric", {"instances": [[["a"] * 28] * 28]}, 400, "not a number", 0),
    ("NaN", b'{"instances": [[' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]]}", 400, "not finite", 0),
    ("out of range", {"instances": [[[0] * 28] * 27 + [[256] * 28]]}, 400, "outside 0-255", 0),
    ("bad base64", {"instances": [{"content": "%%%"}]}, 400, "not valid base64", 0),
    ("not an image", {"instances": [{"content": base64.b64encode(b"GIF89a nonsense").decode()}]}, 400, "not a decodable image", 0),
    ("too many", {"instances": [[[0] * 28] * 28] * 513}, 400, "at most 512", None),
    ("body over 1.5 MB", b'{"instances": [' + b"0," * 760_000 + b"0]}", 413, "limit is 1,500,000", None),
    ("bad parameter", {"instances": [[[0] * 28] * 28], "parameters": {"confidenceThreshold": 2}}, 400, "confidenceThreshold", None),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, what, body, status, needle, index):
    srv = server[0]
    r = post(srv, body)
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert needle in err["message"] and err.get("instance") == index, (what, err)
    assert post(srv, {"instances": [[[0] * 28] * 28]}).status_code == 200


def test_registry_versions_aliases_and_promotion(trained):
    from fmnist_gcp.config import Store
    from fmnist_gcp.registry import Registry, RegistryError, promote
    s, _ = trained
    reg = Registry(s, "fmnist-cnn")
    src = reg.version_store(1)
    for v, m in ((2, {"au_prc": 0.90, "accuracy": 0.80}), (3, {"au_prc": 0.95, "accuracy": 0.85}), (4, {"au_prc": 0.97, "accuracy": 0.70})):
        dst = Store("models", s.models.uri("fmnist-cnn", str(v)))
        dst.write_bytes("model.keras", src.read_bytes("model.keras"))
        dst.write_json("evaluation.json", {"metrics": m})
        dst.write_json("metadata.json", {"run_id": f"r{v}"})
        reg.register(v)
    assert sorted(reg.versions) == [1, 2, 3, 4] and reg.resolve("default") == 4
    assert not promote(reg, 1)["promoted"]  # v1 was never evaluated: no test metrics, no promotion
    assert promote(reg, 2)["promoted"] and reg.resolve("champion") == 2
    assert promote(reg, 3)["promoted"] and reg.resolve("champion") == 3
    d = promote(reg, 4)  # better au_prc but lower accuracy
    assert not d["promoted"] and "accuracy" in d["reason"] and reg.resolve("champion") == 3
    assert not promote(reg, 2)["promoted"]  # worse than the champion
    assert promote(reg, 2, force=True)["promoted"] and reg.resolve("champion") == 2
    reg.set_alias("canary", 4)
    assert reg.resolve("canary") == 4 and reg.aliases["default"] == 4
    with pytest.raises(RegistryError, match="Vertex AI's rule"):
        reg.set_alias("Canary_1", 4)
    with pytest.raises(RegistryError, match="no registered version 9"):
        reg.set_alias("canary", 9)


def test_batch_prediction_round_trip_through_the_cli(trained, tmp_path):
    from fmnist_gcp.data import load_split
    from fmnist_gcp.training import load_model, predict
    s, home = trained
    x, _ = load_split("test", limit=300)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(im.tolist()) + "\n" for im in x) + "[1, 2]\n")
    out = tmp_path / "out.jsonl"
    env = {**__import__("os").environ, "FMNIST_HOME": home}
    r = subprocess.run([str(BIN / "fmnist"), "predict", "--input", str(src), "--output", str(out), "--batch-size", "128"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "300 predictions" in r.stdout and "1 lines could not be used" in r.stderr, r.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    want = predict(load_model(s.models.uri("fmnist-cnn", "4", "model.keras")), x)  # default is v4 after the registry test
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
