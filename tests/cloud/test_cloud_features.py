"""BigQuery load and Vertex AI Feature Store V2 (online store, feature views, sync, read, search) on fakes.

The gapic clients' methods are patched with stateful fakes that check each request proto; BigQuery's HTTP
connection is answered in process. Credentials are anonymous; nothing reaches Google."""

import io

import numpy as np
import pandas as pd
import pytest

from conftest import VERTEX_ENV
from fakes import lro
from fmnist_gcp import features as F
from fmnist_gcp.cloud import features as V
from fmnist_gcp.config import Settings
from fmnist_gcp.data import CLASS_NAMES

LOC = "projects/acme-ml/locations/europe-west4"
STORE = f"{LOC}/featureOnlineStores/fmnist_features"
DOMAIN = "12345.europe-west4-67890.featurestore.vertexai.goog"


@pytest.fixture
def settings(monkeypatch, anonymous):
    monkeypatch.setenv("NO_GCE_CHECK", "True"); monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    for k, v in VERTEX_ENV.items(): monkeypatch.setenv(k, v)
    monkeypatch.setattr(V, "_ENDPOINTS", {})
    return Settings.from_env()


class FakeBigQuery:
    "Answers the BigQuery REST calls of `load_table`: dataset insert, job insert, job get."
    def __init__(self): self.calls = []

    def patch(self, monkeypatch):
        from google.cloud.bigquery import _http
        monkeypatch.setattr(_http.Connection, "api_request", lambda conn, method, path, **kw: self.request(method, path, **kw))
        return self

    def request(self, method, path, data=None, query_params=None, **kw):
        self.calls.append((method, path, data))
        if method == "POST" and path.endswith("/datasets"): return {**data, "id": "acme-ml:fmnist_features"}
        if method == "POST" and path.endswith("/jobs"):
            return {**data, "id": "acme-ml:job", "status": {"state": "DONE"}}
        if method == "GET" and "/jobs/" in path:
            post = next(d for m, p, d in self.calls if m == "POST" and p.endswith("/jobs"))
            return {**post, "status": {"state": "DONE"}}
        raise AssertionError(f"unexpected BigQuery call {method} {path}")


def table_rows():
    "image_embedding rows as the online store would serve them: 12 images in 3 label clusters."
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 3
    emb = (np.eye(8)[labels] + 0.05 * rng.normal(size=(12, 8))).astype(np.float32)
    return {f"test-{i}": {"model_name": "fmnist-cnn", "model_version": 2, "embedding": emb[i].tolist(), "predicted_label": int(labels[i]),
                          "confidence": 0.9, "label": int(labels[i])} for i in range(12)}


class FakeFeatureStore:
    "The admin and serving services of Feature Store V2: stores, views, syncs, fetch and search."
    SYNC_POLLS = 3  # a sync's end_time is set on its third get, as a real sync takes minutes

    def __init__(self, rows, sync_code=0):
        self.stores, self.views, self.requests, self.rows = {}, {}, [], rows
        self.syncs, self.sync_gets, self.sync_code = {}, [], sync_code  # sync name -> gets so far; every get; its final code

    def patch(self, monkeypatch):
        from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient as Admin, FeatureOnlineStoreServiceClient as Serving
        for n in ("get_feature_online_store", "create_feature_online_store", "get_feature_view", "create_feature_view",
                  "sync_feature_view", "get_feature_view_sync", "delete_feature_online_store"):
            monkeypatch.setattr(Admin, n, lambda client, request=None, _n=n, **kw: getattr(self, _n)(request, **kw))
        for n in ("fetch_feature_values", "search_nearest_entities"):
            monkeypatch.setattr(Serving, n, lambda client, request=None, _n=n, **kw: getattr(self, _n)(client, request, **kw))
        return self

    def _get(self, table, name):
        from google.api_core import exceptions
        if name not in table: raise exceptions.NotFound(f"{name} not found")
        return table[name]

    def get_feature_online_store(self, request=None, *, name=None, **kw): return self._get(self.stores, name)
    def get_feature_view(self, request=None, *, name=None, **kw): return self._get(self.views, name)

    def create_feature_online_store(self, request, **kw):
        from google.cloud.aiplatform_v1.types import FeatureOnlineStore
        self.requests.append(request)
        name = f"{request.parent}/featureOnlineStores/{request.feature_online_store_id}"
        store = FeatureOnlineStore(request.feature_online_store, name=name, dedicated_serving_endpoint={"public_endpoint_domain_name": DOMAIN})
        self.stores[name] = store
        return lro(store)

    def create_feature_view(self, request, **kw):
        from google.cloud.aiplatform_v1.types import FeatureView
        self.requests.append(request)
        self._get(self.stores, request.parent)
        name = f"{request.parent}/featureViews/{request.feature_view_id}"
        self.views[name] = FeatureView(request.feature_view, name=name)
        return lro(self.views[name])

    def sync_feature_view(self, request=None, *, feature_view=None, **kw):
        from google.cloud.aiplatform_v1.types import feature_online_store_admin_service as admin
        self._get(self.views, feature_view)
        self.requests.append(admin.SyncFeatureViewRequest(feature_view=feature_view))
        name = f"{feature_view}/featureViewSyncs/{1000 + len(self.syncs)}"
        self.syncs[name] = 0
        return admin.SyncFeatureViewResponse(feature_view_sync=name)

    def get_feature_view_sync(self, request=None, *, name=None, **kw):
        "Running (no end_time, no final_status) until its SYNC_POLLS-th get, then ended with `sync_code`."
        from google.cloud.aiplatform_v1.types import FeatureViewSync
        self._get(self.syncs, name)
        self.syncs[name] += 1; self.sync_gets.append(name)
        if self.syncs[name] < self.SYNC_POLLS: return FeatureViewSync(name=name, run_time={"start_time": {"seconds": 1}})
        status = {"code": self.sync_code, "message": "BigQuery table has duplicate entity ids" if self.sync_code else ""}
        return FeatureViewSync(name=name, run_time={"start_time": {"seconds": 1}, "end_time": {"seconds": 2}}, final_status=status)

    def delete_feature_online_store(self, request=None, *, name=None, force=False, **kw):
        "NotFound for an unknown store; FailedPrecondition while it holds feature views and `force` is off (as Vertex)."
        from google.api_core import exceptions
        from google.cloud.aiplatform_v1.types import feature_online_store_admin_service as admin
        self.requests.append(admin.DeleteFeatureOnlineStoreRequest(name=name, force=force))
        self._get(self.stores, name)
        views = [v for v in self.views if v.startswith(name + "/featureViews/")]
        if views and not force: raise exceptions.FailedPrecondition(f"{name} has feature views: {views}; set force to delete them")
        for v in views: del self.views[v]
        del self.stores[name]
        return lro(None)

    def _response(self, image_id, view):
        from google.cloud.aiplatform_v1.types import feature_online_store_service as sv, featurestore_online_service as fo, types
        Pair = sv.FetchFeatureValuesResponse.FeatureNameValuePairList.FeatureNameValuePair
        def value(v):
            if isinstance(v, list): return fo.FeatureValue(double_array_value=types.DoubleArray(values=v))
            if isinstance(v, str): return fo.FeatureValue(string_value=v)
            return fo.FeatureValue(int64_value=v) if isinstance(v, int) else fo.FeatureValue(double_value=v)
        row = self.rows[view][image_id]
        return sv.FetchFeatureValuesResponse(key_values={"features": [Pair(name=k, value=value(v)) for k, v in row.items()]})

    def fetch_feature_values(self, client, request, **kw):
        from google.api_core import exceptions
        assert client.api_endpoint == DOMAIN  # the store's dedicated endpoint, not the regional one
        self.requests.append(request)
        view = request.feature_view.rsplit("/", 1)[1]
        self._get(self.views, request.feature_view)
        if request.data_key.key not in self.rows[view]: raise exceptions.NotFound(f"{request.data_key.key} not found")
        return self._response(request.data_key.key, view)

    def search_nearest_entities(self, client, request, **kw):
        from google.cloud.aiplatform_v1.types import feature_online_store_service as sv
        assert client.api_endpoint == DOMAIN
        self.requests.append(request)
        rows = self.rows["image_embedding"]
        q = np.array(rows[request.query.entity_id]["embedding"])
        dist = {i: 1 - float(np.dot(q, r["embedding"]) / np.linalg.norm(q) / np.linalg.norm(r["embedding"])) for i, r in rows.items()}
        near = sorted(dist, key=dist.get)[:request.query.neighbor_count]
        self.last_search = sv.SearchNearestEntitiesResponse(nearest_neighbors={"neighbors": [
            {"entity_id": i, "distance": dist[i], "entity_key_values": self._response(i, "image_embedding")} for i in near]})
        return self.last_search


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(V, "SYNC_POLL_S", 0.001, raising=False)


@pytest.fixture
def bq(monkeypatch, settings):
    return FakeBigQuery().patch(monkeypatch)


@pytest.fixture
def fs(monkeypatch, settings):
    emb = table_rows()
    stats = {i: {"split": "test", "label": r["label"], "class_name": "x", "mean_intensity": 0.25, "std_intensity": 0.1, "ink_fraction": 0.5,
                 "bbox_top": 1, "bbox_bottom": 26, "bbox_left": 3, "bbox_right": 24, "lr_symmetry": 0.9} for i, r in emb.items()}
    return FakeFeatureStore({"image_embedding": emb, "image_stats": stats}).patch(monkeypatch)


def test_bigquery_load_request(settings, bq):
    assert V.load_table(settings, "image_embedding") == "acme-ml.fmnist_features.image_embedding"
    (_, ds_path, ds), (_, job_path, job) = [c for c in bq.calls if c[0] == "POST"]
    assert ds_path == "/projects/acme-ml/datasets" and ds["location"] == "europe-west4"
    assert ds["datasetReference"] == {"projectId": "acme-ml", "datasetId": "fmnist_features"}
    load = job["configuration"]["load"]
    assert job_path == "/projects/acme-ml/jobs" and job["jobReference"]["location"] == "europe-west4"
    assert load["sourceUris"] == ["gs://acme-ml-fmnist-datasets/features/online/image_embedding.parquet"]
    assert load["destinationTable"] == {"projectId": "acme-ml", "datasetId": "fmnist_features", "tableId": "image_embedding"}
    assert (load["sourceFormat"], load["writeDisposition"], load["parquetOptions"]["enableListInference"]) == ("PARQUET", "WRITE_TRUNCATE", True)


def test_publish_makes_the_store_and_views_once_and_syncs(settings, bq, fs):
    out = V.publish_view(settings, "image_stats", wait=True)
    assert out["sync"].startswith(f"{STORE}/featureViews/image_stats/featureViewSyncs/")
    assert fs.sync_gets == [out["sync"]] * fs.SYNC_POLLS  # polled until the sync had an end_time, then no more
    V.publish_view(settings, "image_embedding", dims=8)
    V.publish_view(settings, "image_embedding", dims=8)  # again: nothing new is created, the view is synced again
    kinds = [type(r).__name__ for r in fs.requests]
    assert kinds == ["CreateFeatureOnlineStoreRequest", "CreateFeatureViewRequest", "SyncFeatureViewRequest",
                     "CreateFeatureViewRequest", "SyncFeatureViewRequest", "SyncFeatureViewRequest"]
    store_req, stats_req, emb_req = fs.requests[0], fs.requests[1], fs.requests[3]
    assert store_req.parent == LOC and store_req.feature_online_store_id == "fmnist_features"
    assert "optimized" in store_req.feature_online_store and store_req.feature_online_store.labels["app"] == "fmnist-gcp"
    assert stats_req.feature_view.big_query_source.uri == "bq://acme-ml.fmnist_features.image_stats"
    assert "index_config" not in stats_req.feature_view
    ic = emb_req.feature_view.index_config
    assert (emb_req.parent, emb_req.feature_view_id, list(emb_req.feature_view.big_query_source.entity_id_columns)) == (STORE, "image_embedding", ["image_id"])
    assert (ic.embedding_column, ic.embedding_dimension, ic.distance_measure_type.name) == ("embedding", 8, "COSINE_DISTANCE")
    assert fs.requests[-1].feature_view == f"{STORE}/featureViews/image_embedding"
    assert sum(1 for m, p, _ in bq.calls if m == "POST" and p.endswith("/jobs")) == 3  # one load per publish


def test_lookup_and_similar_on_the_vertex_backend(settings, bq, fs):
    V.publish_view(settings, "image_stats"); V.publish_view(settings, "image_embedding", dims=8)
    got = V.lookup(settings, ["test-4", "test-1"])
    assert [g["image_id"] for g in got] == ["test-4", "test-1"]
    assert got[0]["image_stats"]["label"] == 1 and got[0]["image_embedding"]["model_version"] == 2
    np.testing.assert_allclose(got[1]["image_embedding"]["embedding"], fs.rows["image_embedding"]["test-1"]["embedding"])
    fetch = [r for r in fs.requests if type(r).__name__ == "FetchFeatureValuesRequest"]
    assert fetch[0].feature_view == f"{STORE}/featureViews/image_stats" and fetch[0].data_key.key == "test-4"
    assert fetch[0].data_format.name == "KEY_VALUE"
    with pytest.raises(F.FeatureError, match="image_stats view: test-40"):
        V.lookup(settings, ["test-1", "test-40"])
    ans = V.similar(settings, "test-4", k=3)
    search = fs.requests[-1]
    assert type(search).__name__ == "SearchNearestEntitiesRequest" and search.return_full_entity
    assert (search.query.entity_id, search.query.neighbor_count) == ("test-4", 4)
    assert ans["image_id"] == "test-4" and (ans["model"], ans["version"]) == ("fmnist-cnn", 2)
    # what our code made of the answer: the query dropped, k kept, cosine distance turned into similarity, the label
    # and class name read from each neighbour's features
    answer = fs.last_search.nearest_neighbors.neighbors
    assert "test-4" in [n.entity_id for n in answer] and len(answer) == 4
    expect = [(n.entity_id, round(1 - n.distance, 6)) for n in answer if n.entity_id != "test-4"][:3]
    assert [(n["image_id"], n["similarity"]) for n in ans["neighbours"]] == expect
    assert [(n["label"], n["class_name"]) for n in ans["neighbours"]] == [
        (r, CLASS_NAMES[r]) for r in (fs.rows["image_embedding"][i]["label"] for i, _ in expect)]
    with pytest.raises(F.FeatureError, match="test-50 is not in the Vertex AI Feature Store.s image_embedding view.*embeds other images on the fly"):
        V.similar(settings, "test-50")


def test_the_stage_functions_on_the_vertex_backend(settings, bq, fs, gcs_emulator, monkeypatch, tmp_path):
    "features.publish writes the Parquet file to the datasets bucket (an emulator here), loads and syncs it; reports work."
    from fmnist_gcp.embeddings import embedding_table
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setenv("FMNIST_DATASETS_BUCKET", "gs://fmnist-test/vertex-features")
    monkeypatch.setenv("FMNIST_HOME", str(tmp_path))
    s = Settings.from_env()
    rows = fs.rows["image_embedding"]
    ids = list(rows)
    table = embedding_table(ids, np.array([rows[i]["label"] for i in ids]), np.array([rows[i]["embedding"] for i in ids]),
                            np.eye(10)[[rows[i]["label"] for i in ids]], "fmnist-cnn", 2, F.STATS_EVENT_TIME)
    out = V.publish(s, "image_embedding", table)
    assert (out["rows"], out["model_version"]) == (12, 2)
    assert fs.sync_gets == [out["sync"]] * fs.SYNC_POLLS and F.read_state(s)["image_embedding"]["sync"] == out["sync"]
    # a second model version: the offline table keeps both (24 rows), the feature view's BigQuery source gets only
    # the latest version's rows, one per image id (a view over BigQuery does not take repeated entity ids)
    table3 = table.assign(model_version=3, event_timestamp=table.event_timestamp + pd.Timedelta(days=1))
    out = V.publish(s, "image_embedding", table3)
    assert (out["rows"], out["images"], out["model_version"]) == (24, 12, 3)
    assert len(F.read_offline(s, "image_embedding")) == 24
    job = [d for m, p, d in bq.calls if m == "POST" and p.endswith("/jobs")][-1]
    (uri,) = job["configuration"]["load"]["sourceUris"]
    root = "gs://fmnist-test/vertex-features/"
    assert uri.startswith(root) and uri.endswith(".parquet")
    loaded = pd.read_parquet(io.BytesIO(s.datasets.read_bytes(uri[len(root):])))  # what BigQuery reads
    assert len(loaded) == 12 and loaded.image_id.is_unique and set(loaded.model_version) == {3}
    assert sorted(loaded.image_id) == sorted(ids)
    index = F.build_index(s)  # the reports' copy: the offline rows of the current version
    assert len(index["ids"]) == 12 and index["unit"].shape == (12, 8)
    lat = V.lookup_latency(s, ["test-1", "test-2"], 3, "image_embedding")
    assert lat["ids"] == 2 and lat["p50_ms"] > 0


def test_wait_sync_polls_until_the_sync_has_an_end_time(settings, bq, fs):
    "A sync that is still running (run_time without end_time) is not done: wait_sync polls it again."
    admin = V.admin_client(settings)
    V.publish_view(settings, "image_stats", wait=False)
    sync = next(iter(fs.syncs))
    assert V.wait_sync(admin, sync, timeout=5, poll=0.001) == "ok"
    assert fs.sync_gets == [sync] * fs.SYNC_POLLS
    with pytest.raises(F.FeatureError, match="did not end in"):  # a sync that never ends within the timeout
        fs.syncs[sync] = -10**9; V.wait_sync(admin, sync, timeout=0.05, poll=0.001)
    from google.api_core import exceptions
    with pytest.raises(exceptions.NotFound):  # the fake refuses a sync it never started, as Vertex does
        admin.get_feature_view_sync(name=f"{STORE}/featureViews/image_stats/featureViewSyncs/9")


def test_a_failed_sync_is_an_error_naming_its_status(settings, bq, fs):
    fs.sync_code = 9  # FAILED_PRECONDITION, set only once the sync has ended
    with pytest.raises(F.FeatureError, match="failed: BigQuery table has duplicate entity ids .code 9."):
        V.publish_view(settings, "image_stats")
    assert len(fs.sync_gets) == fs.SYNC_POLLS


def test_publish_says_the_online_store_bills_before_creating_it(settings, bq, fs, capsys):
    V.publish_view(settings, "image_stats")
    said = capsys.readouterr().out
    assert "node-hour" in said and "fmnist gcp destroy" in said and STORE in said
    V.publish_view(settings, "image_embedding", dims=8)  # the store exists: said once, when it was made
    assert "node-hour" not in capsys.readouterr().out
    kinds = [type(r).__name__ for r in fs.requests]
    assert kinds.index("CreateFeatureOnlineStoreRequest") == 0


def test_delete_online_store_deletes_it_with_its_views(settings, bq, fs):
    from google.api_core import exceptions
    V.publish_view(settings, "image_stats"); V.publish_view(settings, "image_embedding", dims=8)
    admin = V.admin_client(settings)
    with pytest.raises(exceptions.NotFound):  # a bad name: the real NotFound
        admin.delete_feature_online_store(name=f"{LOC}/featureOnlineStores/no_such_store", force=True)
    with pytest.raises(exceptions.FailedPrecondition):  # views left and no force: refused, as Vertex refuses it
        admin.delete_feature_online_store(name=STORE)
    V.delete_online_store(settings)
    delete = [r for r in fs.requests if type(r).__name__ == "DeleteFeatureOnlineStoreRequest"][-1]
    assert (delete.name, delete.force) == (STORE, True)  # what our code sent: the store, with its views
    assert not fs.stores and not fs.views
    V.delete_online_store(settings)  # gone already: nothing to do, no error
