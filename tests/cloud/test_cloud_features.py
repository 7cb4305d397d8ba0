"""BigQuery load and Vertex AI Feature Store V2 (online store, feature views, sync, read, search).

Feature Store V2 is the fake Vertex REST service (tests/vertex_fake.py), reached by the real clients over REST: the
admin calls on the region's endpoint, reads and searches on the serving endpoint the online store reports (the fake
itself). BigQuery's HTTP connection is answered in process. Nothing reaches Google."""

import io
import re

import numpy as np
import pandas as pd
import pytest

from fmnist_gcp import features as F
from fmnist_gcp.cloud import features as V
from fmnist_gcp.config import Settings
from fmnist_gcp.data import CLASS_NAMES
from vertex_fake import LOC

STORE = f"{LOC}/featureOnlineStores/fmnist_features"


@pytest.fixture
def settings(monkeypatch, vertex_rest):
    for k, v in vertex_rest.env.items(): monkeypatch.setenv(k, v)
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


def sent(fs, start=0):
    "The requests that change something (not GETs) from `start` on: (method, path after the location)."
    return [(r.method, r.path.split(LOC, 1)[-1]) for r in fs.requests[start:] if r.method != "GET"]


def nearest(rows, image_id, k):
    "The k ids nearest to `image_id` by cosine distance, and each distance."
    q = np.array(rows[image_id]["embedding"])
    dist = {i: 1 - float(q @ np.array(r["embedding"]) / np.linalg.norm(q) / np.linalg.norm(r["embedding"])) for i, r in rows.items()}
    return [(i, dist[i]) for i in sorted(dist, key=dist.get)[:k]]


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(V, "SYNC_POLL_S", 0.001, raising=False)


@pytest.fixture
def bq(monkeypatch, settings):
    return FakeBigQuery().patch(monkeypatch)


@pytest.fixture
def fs(vertex_rest, settings):
    "The fake Vertex service, its feature views' BigQuery tables holding these rows (what a sync serves)."
    emb = table_rows()
    stats = {i: {"split": "test", "label": r["label"], "class_name": "x", "mean_intensity": 0.25, "std_intensity": 0.1, "ink_fraction": 0.5,
                 "bbox_top": 1, "bbox_bottom": 26, "bbox_left": 3, "bbox_right": 24, "lr_symmetry": 0.9} for i, r in emb.items()}
    vertex_rest.feature_rows = {"image_embedding": emb, "image_stats": stats}
    return vertex_rest


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
    assert fs.sync_gets == [out["sync"]] * fs.sync_polls  # polled until the sync had an end_time, then no more
    V.publish_view(settings, "image_embedding", dims=8)
    V.publish_view(settings, "image_embedding", dims=8)  # again: nothing new is created, the view is synced again
    views = f"/featureOnlineStores/fmnist_features/featureViews"
    assert sent(fs) == [("POST", "/featureOnlineStores"), ("POST", views), ("POST", f"{views}/image_stats:sync"),
                        ("POST", views), ("POST", f"{views}/image_embedding:sync"), ("POST", f"{views}/image_embedding:sync")]
    store_req, stats_req, emb_req = [r for r in fs.requests if r.method == "POST" and not r.path.endswith(":sync")]
    assert store_req.path == f"/v1/{LOC}/featureOnlineStores" and store_req.query["featureOnlineStoreId"] == "fmnist_features"
    assert "optimized" in store_req.body and store_req.body["labels"]["app"] == "fmnist-gcp"
    assert stats_req.body["bigQuerySource"]["uri"] == "bq://acme-ml.fmnist_features.image_stats"
    assert "indexConfig" not in stats_req.body
    ic = emb_req.body["indexConfig"]
    assert (emb_req.path, emb_req.query["featureViewId"], emb_req.body["bigQuerySource"]["entityIdColumns"]) == (
        f"/v1/{STORE}/featureViews", "image_embedding", ["image_id"])
    from google.cloud.aiplatform_v1.types import FeatureView
    cosine = FeatureView.IndexConfig.DistanceMeasureType.COSINE_DISTANCE.value  # enums travel as numbers over REST
    assert (ic["embeddingColumn"], ic["embeddingDimension"], ic["distanceMeasureType"]) == ("embedding", 8, cosine)
    assert sum(1 for m, p, _ in bq.calls if m == "POST" and p.endswith("/jobs")) == 3  # one load per publish


def test_lookup_and_similar_on_the_vertex_backend(settings, bq, fs):
    V.publish_view(settings, "image_stats"); V.publish_view(settings, "image_embedding", dims=8)
    got = V.lookup(settings, ["test-4", "test-1"])
    assert [g["image_id"] for g in got] == ["test-4", "test-1"]
    assert got[0]["image_stats"]["label"] == 1 and got[0]["image_embedding"]["model_version"] == 2
    np.testing.assert_allclose(got[1]["image_embedding"]["embedding"], fs.feature_rows["image_embedding"]["test-1"]["embedding"])
    fetch = fs.calls("POST", "*:fetchFeatureValues")
    assert fetch[0].path == f"/v1/{STORE}/featureViews/image_stats:fetchFeatureValues" and fetch[0].body["dataKey"] == {"key": "test-4"}
    from google.cloud.aiplatform_v1.types import FeatureViewDataFormat
    assert fetch[0].body["dataFormat"] == FeatureViewDataFormat.KEY_VALUE.value
    assert V._ENDPOINTS == {STORE: fs.host}  # read on the serving domain the online store reported, not the regional one
    with pytest.raises(F.FeatureError, match="image_stats view: test-40"):
        V.lookup(settings, ["test-1", "test-40"])
    ans = V.similar(settings, "test-4", k=3)
    search = fs.calls("POST", "*:searchNearestEntities")[-1]
    assert search.path == f"/v1/{STORE}/featureViews/image_embedding:searchNearestEntities" and search.body["returnFullEntity"]
    assert search.body["query"] == {"entityId": "test-4", "neighborCount": 4}
    assert ans["image_id"] == "test-4" and (ans["model"], ans["version"]) == ("fmnist-cnn", 2)
    # what our code made of the answer: the query dropped, k kept, cosine distance turned into similarity, the label
    # and class name read from each neighbour's features
    answer = nearest(fs.feature_rows["image_embedding"], "test-4", 4)
    assert answer[0][0] == "test-4"
    expect = [(i, round(1 - d, 6)) for i, d in answer if i != "test-4"][:3]
    assert [(n["image_id"], n["similarity"]) for n in ans["neighbours"]] == expect
    assert [(n["label"], n["class_name"]) for n in ans["neighbours"]] == [
        (r, CLASS_NAMES[r]) for r in (fs.feature_rows["image_embedding"][i]["label"] for i, _ in expect)]
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
    rows = fs.feature_rows["image_embedding"]
    ids = list(rows)
    table = embedding_table(ids, np.array([rows[i]["label"] for i in ids]), np.array([rows[i]["embedding"] for i in ids]),
                            np.eye(10)[[rows[i]["label"] for i in ids]], "fmnist-cnn", 2, F.STATS_EVENT_TIME)
    out = V.publish(s, "image_embedding", table)
    assert (out["rows"], out["model_version"]) == (12, 2)
    assert fs.sync_gets == [out["sync"]] * fs.sync_polls and F.read_state(s)["image_embedding"]["sync"] == out["sync"]
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
    (sync,) = fs.syncs
    assert V.wait_sync(admin, sync, timeout=5, poll=0.001) == "ok"
    assert fs.sync_gets == [sync] * fs.sync_polls
    with pytest.raises(F.FeatureError, match="did not end in"):  # a sync that never ends within the timeout
        fs.syncs[sync]["gets"] = -10**9; V.wait_sync(admin, sync, timeout=0.05, poll=0.001)
    from google.api_core import exceptions
    with pytest.raises(exceptions.NotFound):  # the fake refuses a sync it never started, as Vertex does
        admin.get_feature_view_sync(name=f"{STORE}/featureViews/image_stats/featureViewSyncs/9")


def test_a_failed_sync_is_an_error_naming_its_status(settings, bq, fs):
    fs.sync_code = 9  # FAILED_PRECONDITION, set only once the sync has ended
    with pytest.raises(F.FeatureError, match="failed: BigQuery table has duplicate entity ids .code 9."):
        V.publish_view(settings, "image_stats")
    assert len(fs.sync_gets) == fs.sync_polls


def test_publish_says_the_online_store_bills_before_creating_it(settings, bq, fs, capsys):
    V.publish_view(settings, "image_stats")
    said = capsys.readouterr().out
    assert "node-hour" in said and "fmnist gcp destroy" in said and STORE in said
    V.publish_view(settings, "image_embedding", dims=8)  # the store exists: said once, when it was made
    assert "node-hour" not in capsys.readouterr().out
    assert sent(fs)[0] == ("POST", "/featureOnlineStores")  # said, then made: the first change sent


def test_delete_online_store_deletes_it_with_its_views(settings, bq, fs):
    from google.api_core import exceptions
    V.publish_view(settings, "image_stats"); V.publish_view(settings, "image_embedding", dims=8)
    admin = V.admin_client(settings)
    with pytest.raises(exceptions.NotFound):  # a bad name: the real NotFound
        admin.delete_feature_online_store(name=f"{LOC}/featureOnlineStores/no_such_store", force=True)
    # views left and no force: refused, as Vertex refuses it (FAILED_PRECONDITION in a 400, BadRequest over REST)
    with pytest.raises(exceptions.BadRequest, match="has feature views"):
        admin.delete_feature_online_store(name=STORE)
    V.delete_online_store(settings)
    delete = fs.calls("DELETE", f"/v1/{STORE}")[-1]
    assert delete.query["force"] == "true" and delete.status == 200  # what our code sent: the store, with its views
    assert not fs.online_stores and not fs.feature_views
    V.delete_online_store(settings)  # gone already: nothing to do, no error


def test_feature_store_requests_vertex_refuses_are_refused(settings, fs):
    "Known-bad requests: a store without a storage type, a view without a source, reads before a sync ended, a search with no index."
    from google.api_core import exceptions
    from google.cloud.aiplatform_v1 import FeatureOnlineStoreServiceClient
    admin = V.admin_client(settings)
    with pytest.raises(exceptions.BadRequest, match="exactly one storage type"):
        admin.create_feature_online_store(parent=LOC, feature_online_store={"labels": {"app": "fmnist-gcp"}}, feature_online_store_id="s")
    with pytest.raises(exceptions.BadRequest, match="feature_online_store_id 'Bad-Name' must match"):
        admin.create_feature_online_store(parent=LOC, feature_online_store={"optimized": {}}, feature_online_store_id="Bad-Name")
    with pytest.raises(exceptions.NotFound):  # a view in a store that does not exist
        admin.create_feature_view(request=V.feature_view_request(settings, "image_stats"))
    admin.create_feature_online_store(request=V.online_store_request(settings)).result()
    with pytest.raises(exceptions.BadRequest, match="a source is required"):
        admin.create_feature_view(parent=STORE, feature_view={"labels": {"app": "x"}}, feature_view_id="image_stats")
    with pytest.raises(exceptions.BadRequest, match="big_query_source.entity_id_columns; Message: Required field is not set"):
        admin.create_feature_view(parent=STORE, feature_view={"big_query_source": {"uri": "bq://p.d.t"}}, feature_view_id="image_stats")
    admin.create_feature_view(request=V.feature_view_request(settings, "image_stats")).result()
    serving = FeatureOnlineStoreServiceClient(client_options={"api_endpoint": fs.host}, transport="rest")
    with pytest.raises(exceptions.BadRequest, match="no completed sync"):  # nothing served before a sync has ended
        serving.fetch_feature_values(request=V.fetch_request(settings, "image_stats", "test-1"))
    sync = admin.sync_feature_view(feature_view=f"{STORE}/featureViews/image_stats").feature_view_sync
    assert not admin.get_feature_view_sync(name=sync).run_time.HasField("end_time")  # not done on the first get
    V.wait_sync(admin, sync, poll=0.001)
    assert V.feature_values(serving.fetch_feature_values(request=V.fetch_request(settings, "image_stats", "test-1")))["label"] == 1
    with pytest.raises(exceptions.BadRequest, match="no index_config"):
        serving.search_nearest_entities(request=V.search_request(settings, "test-1", 3).__class__(
            feature_view=f"{STORE}/featureViews/image_stats", query={"entity_id": "test-1", "neighbor_count": 3}))


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made"])
def test_a_sync_meeting_a_503_starts_one_sync(settings, bq, fs, capsys, monkeypatch, made):
    "A 503 on the sync request, before the sync started or after (its answer lost): the view is synced once, the retry in the log."
    monkeypatch.setenv("FMNIST_RETRY_INITIAL_S", "0.01"); monkeypatch.setenv("FMNIST_RETRY_MAX_S", "0.02")
    fs.inject(method="POST", path_glob="*:sync", status=503, times=1, after_apply=made)
    out = V.publish_view(settings, "image_stats")
    (sync,) = fs.syncs  # exactly one sync of the view on the service
    assert out["sync"] == sync and out["sync_status"] == "ok" and fs.sync_gets == [sync] * fs.sync_polls
    sent_syncs = fs.calls("POST", "*:sync")  # made: found by its create time, not sent again
    assert [(r.path, r.status, r.injected) for r in sent_syncs] == [(f"/v1/{STORE}/featureViews/image_stats:sync", 503, True)] + (
        [] if made else [(f"/v1/{STORE}/featureViews/image_stats:sync", 200, False)])
    (listed,) = fs.calls("GET", "*/featureViewSyncs")  # the lookup before the retry: syncs made since the request
    assert listed.path == f"/v1/{STORE}/featureViews/image_stats/featureViewSyncs" and listed.status == 200
    assert re.fullmatch(r'create_time > "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', listed.query["filter"])
    assert listed.query["orderBy"] == "create_time desc"
    assert listed.at > sent_syncs[0].at and (made or listed.at < sent_syncs[1].at)  # looked up between the two attempts
    err = capsys.readouterr().err
    assert "sync: attempt 2 of 12 after 503 UNAVAILABLE" in err, err
    assert ("sync: adopted what attempt 1 made" in err) == made and ("sync: done on attempt 2" in err) != made, err


def test_the_sync_list_refuses_a_filter_vertex_does_not_support(settings, bq, fs):
    "ListFeatureViewSyncs through the real admin client on REST: create_time filters and order work, other filters are a 400."
    from google.api_core import exceptions
    admin, view = V.admin_client(settings), f"{STORE}/featureViews/image_stats"
    first = V.publish_view(settings, "image_stats")["sync"]
    second = V.publish_view(settings, "image_stats")["sync"]
    between = fs.syncs[second]["createTime"]
    names = lambda **kw: [s.name for s in admin.list_feature_view_syncs(request={"parent": view, **kw})]
    assert names(filter='create_time > "2020-01-01T00:00:00Z"', order_by="create_time desc") == [second, first]
    assert names(order_by="create_time") == [first, second]
    assert names(filter=f'create_time >= "{between}"') == [second]
    assert names(filter=f'create_time < "{between}"') == [first]
    assert names(filter='create_time > "2999-01-01T00:00:00+00:00"') == []
    before = len(fs.calls("GET", "*/featureViewSyncs"))
    assert names(filter='create_time > "2020-01-01T00:00:00Z"', order_by="create_time desc", page_size=1) == [second, first]
    pages = fs.calls("GET", "*/featureViewSyncs")[before:]  # one sync a page: the pager followed the next page token
    assert [(r.query["pageSize"], r.query.get("pageToken")) for r in pages] == [("1", None), ("1", "1")]
    assert V.sync_since(admin, view, "2020-01-01T00:00:00Z").feature_view_sync == second  # the newest, as the retry adopts
    for bad in ('name = "x"', "create_time > yesterday", 'create_time > "2020-01-01"', 'update_time > "2020-01-01T00:00:00Z"'):
        with pytest.raises(exceptions.BadRequest, match="Unsupported filter"):  # INVALID_ARGUMENT: a 400, BadRequest over REST
            names(filter=bad)
    for bad in ("update_time", "create_time descending", "name desc"):
        with pytest.raises(exceptions.BadRequest, match="Unsupported order_by"):
            names(order_by=bad)
    with pytest.raises(exceptions.NotFound):  # a view that does not exist
        list(admin.list_feature_view_syncs(parent=f"{STORE}/featureViews/no_such_view"))
