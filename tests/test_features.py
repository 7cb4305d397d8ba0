"""The feature store locally (Feast: Parquet offline, SQLite online) on generated images and synthetic embeddings:
online equals offline, point-in-time joins across model versions, idempotent re-runs, unknown ids, similar items."""
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from fmnist_gcp import features as F
from fmnist_gcp.config import Settings
from fmnist_gcp.embeddings import embedding_table

T1 = datetime(2026, 1, 1, tzinfo=timezone.utc)
T2 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8) * (rng.random((n, 28, 28)) < 0.4), rng.integers(0, 10, n)


def embeddings(labels: np.ndarray, version: int, dims: int = 16):
    "Synthetic embeddings clustered by label (each version a different rotation) and one-hot probabilities."
    rng = np.random.default_rng(version)
    centres = rng.normal(size=(10, dims))
    emb = centres[labels] + 0.3 * rng.normal(size=(len(labels), dims))
    return emb.astype(np.float32), np.eye(10)[labels] * 0.9 + 0.01


@pytest.fixture
def settings(fmnist_env):
    return Settings.from_env()


@pytest.fixture
def stats(settings):
    x, y = images(40)
    table = F.stats_table(x, y, "test")
    F.publish(settings, "image_stats", table)
    return table


def publish_embeddings(settings, labels, version, when, n=None):
    ids = [f"test-{i}" for i in range(n or len(labels))]
    emb, probs = embeddings(labels[:len(ids)], version)
    rows = embedding_table(ids, labels[:len(ids)], emb, probs, "m", version, when)
    F.publish(settings, "image_embedding", rows)
    return rows


def test_online_values_equal_offline_values(settings, stats):
    y = stats.label.to_numpy()
    rows = publish_embeddings(settings, y, 1, T1)
    ids = ["test-3", "test-0", "test-39"]
    got = F.lookup(settings, ids)
    off = stats.set_index("image_id")
    for g in got:
        want = off.loc[g["image_id"], list(F.SCHEMA["image_stats"])].to_dict()
        assert g["image_stats"] == {k: (v.item() if hasattr(v, "item") else v) for k, v in want.items()}
        e = rows.set_index("image_id").loc[g["image_id"]]
        assert g["image_embedding"]["embedding"] == e.embedding.tolist()  # float32 values, exactly
        assert (g["image_embedding"]["model_version"], g["image_embedding"]["label"]) == (1, e.label)
    assert [g["image_id"] for g in got] == ids
    only = F.lookup(settings, ["test-3"], view="image_embedding")
    assert set(only[0]) == {"image_id", "image_embedding"}


def test_point_in_time_join_returns_the_model_current_at_each_time(settings, stats):
    y = stats.label.to_numpy()
    publish_embeddings(settings, y, 1, T1)
    publish_embeddings(settings, y, 2, T2)
    table = F.read_offline(settings, "image_embedding")
    assert len(table) == 2 * len(y) and sorted(table.model_version.unique()) == [1, 2]  # v1's rows kept
    ask = pd.DataFrame({"image_id": ["test-5"] * 4 + ["test-6"],
                        "event_timestamp": [T1 - timedelta(hours=1), T1 + timedelta(hours=1), T2 - timedelta(seconds=1),
                                            T2 + timedelta(days=30), T1 + timedelta(days=1)]})
    got = F.historical(settings, ask, "image_embedding", ["model_version"])
    versions = {(r.image_id, pd.Timestamp(r.event_timestamp)): r.model_version for r in got.itertuples()}
    early = versions.get(("test-5", pd.Timestamp(T1 - timedelta(hours=1))))
    assert early is None or pd.isna(early)  # before any model: no embedding (Feast's file store drops the row)
    assert versions[("test-5", pd.Timestamp(T1 + timedelta(hours=1)))] == 1
    assert versions[("test-5", pd.Timestamp(T2 - timedelta(seconds=1)))] == 1  # a second before v2 existed
    assert versions[("test-5", pd.Timestamp(T2 + timedelta(days=30)))] == 2
    assert versions[("test-6", pd.Timestamp(T1 + timedelta(days=1)))] == 1
    assert F.lookup(settings, ["test-5"], "image_embedding")[0]["image_embedding"]["model_version"] == 2  # online: the latest


def test_publishing_again_is_idempotent(settings, stats):
    y = stats.label.to_numpy()
    rows = publish_embeddings(settings, y, 1, T1)
    state = F.read_state(settings)
    before = (F.read_offline(settings, "image_stats"), F.read_offline(settings, "image_embedding"),
              F.lookup(settings, [f"test-{i}" for i in range(40)]))
    F.publish(settings, "image_stats", stats)
    F.publish(settings, "image_embedding", rows)
    after = (F.read_offline(settings, "image_stats"), F.read_offline(settings, "image_embedding"),
             F.lookup(settings, [f"test-{i}" for i in range(40)]))
    assert before[0].equals(after[0]) and len(before[1]) == len(after[1]) == 40
    assert before[1].drop(columns="embedding").equals(after[1].drop(columns="embedding"))
    assert before[2] == after[2]
    assert {v: s["sha256"] for v, s in F.read_state(settings).items()} == {v: s["sha256"] for v, s in state.items()}


def test_unknown_ids_fail_cleanly_naming_them(settings, stats):
    with pytest.raises(F.FeatureError, match="not image ids: shoe, test-10000"):
        F.lookup(settings, ["test-1", "shoe", "test-10000"])
    with pytest.raises(F.FeatureError, match="image_stats view: train-5, test-40"):
        F.lookup(settings, ["test-1", "train-5", "test-40"])
    with pytest.raises(F.FeatureError, match="image_embedding view: test-1"):
        F.lookup(settings, ["test-1"], view="image_embedding")
    with pytest.raises(F.FeatureError, match="unknown feature view"):
        F.lookup(settings, ["test-1"], view="pixels")
    with pytest.raises(F.FeatureError, match="image_embedding view is empty"):
        F.similar(settings, "test-1")


def test_similar_returns_k_neighbours_without_itself_sorted(settings, stats):
    y = stats.label.to_numpy()
    publish_embeddings(settings, y, 1, T1)
    ans = F.similar(settings, "test-7", k=5)
    near = ans["neighbours"]
    assert ans["image_id"] == "test-7" and ans["label"] == y[7] and (ans["model"], ans["version"]) == ("m", 1)
    assert len(near) == 5 and "test-7" not in [n["image_id"] for n in near]
    sims = [n["similarity"] for n in near]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1.000001 for s in sims)
    same = [n["label"] == y[7] for n in near]
    assert sum(same) >= min(5, (y == y[7]).sum() - 1)  # clustered by label: same-class first
    assert json.loads(json.dumps(ans)) == ans
    with pytest.raises(F.FeatureError, match="has no embedding"):
        F.similar(settings, "train-0")
    # a newer version materialised (on fewer images) replaces the index: only its images are the catalogue
    publish_embeddings(settings, y, 2, T2, n=10)
    ans2 = F.similar(settings, "test-7", k=20)
    assert ans2["version"] == 2 and ans2["catalogue"] == 10 and len(ans2["neighbours"]) == 9


def test_embedding_model_is_the_classifier_input():
    from fmnist_gcp.embeddings import embedding_model
    from fmnist_gcp.training import TrainConfig, build_model, serving_model
    model = build_model(TrainConfig(widths=(4, 6), precision="float32"), mean=0.3, std=0.3)
    served = serving_model(model, tta_flip=True, temperature=1.5)
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.float32)
    e = np.asarray(embedding_model(served)(x))
    assert e.shape == (3, 6) and e.dtype == np.float32
    dense = model.get_layer("probs")
    np.testing.assert_allclose(np.asarray(dense(e)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_a_gs_datasets_store_feeds_feast_through_a_local_copy(fmnist_env, gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setenv("FMNIST_DATASETS_BUCKET", "gs://fmnist-test/features-test")
    s = Settings.from_env()
    x, y = images(5)
    F.publish(s, "image_stats", F.stats_table(x, y, "train"))
    assert s.datasets.exists("features/image_stats.parquet")
    assert F.source_path(s, "image_stats").startswith(str(F.feast_dir(s)))
    assert F.read_offline(s, "image_stats").label.tolist() == y.tolist()
    assert [r["image_stats"]["label"] for r in F.lookup(s, ["train-4", "train-0"])] == [y[4], y[0]]


def test_the_cli_prints_one_json_object_per_id_or_only_the_error(settings, stats, fmnist_env):
    import subprocess
    from conftest import BIN
    y = stats.label.to_numpy()
    publish_embeddings(settings, y, 1, T1)
    run = lambda *args: subprocess.run([str(BIN / "fmnist"), *args], env=fmnist_env, capture_output=True, text=True, timeout=300)
    r = run("features", "get", "test-0", "test-17", "--view", "image_stats")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g["image_id"], g["image_stats"]["label"]) for g in rows] == [("test-0", int(y[0])), ("test-17", int(y[17]))]
    r = run("features", "get", "test-0", "test-39999")
    assert (r.returncode, r.stdout) == (2, "") and "test-39999" in r.stderr  # nothing partial printed
    r = run("similar", "test-17", "-k", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image_id"] == "test-17" and len(out["neighbours"]) == 3 and "test-17" not in [n["image_id"] for n in out["neighbours"]]
    assert [n["label"] for n in out["neighbours"]].count(int(y[17])) >= 2  # synthetic embeddings cluster by label


@pytest.mark.parametrize("tta_flip,temperature,tta_shift", [(True, 1.5, 0), (True, 1.0, 0), (False, 2.0, 0), (False, 1.0, 0),
                                                             (True, 1.5, 1), (False, 1.0, 2)])
def test_embedding_and_probs_gives_the_embedding_and_the_served_probabilities(tta_flip, temperature, tta_shift):
    from fmnist_gcp.embeddings import embedding_and_probs, embedding_function, embedding_model
    from fmnist_gcp.training import TrainConfig, build_model, serving_model
    model = build_model(TrainConfig(widths=(4, 6), precision="float32"), mean=0.3, std=0.3)
    served = serving_model(model, tta_flip=tta_flip, temperature=temperature, tta_shift=tta_shift)
    x = np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.float32)
    e, p = (np.asarray(t) for t in embedding_and_probs(served)(x))
    np.testing.assert_allclose(e, np.asarray(embedding_model(served)(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p, np.asarray(served(x)), rtol=1e-5, atol=1e-6)
    e2, p2 = embedding_function(served)(x)  # the traced graph the stage runs
    assert e2.dtype == np.float32 and p2.dtype == np.float64
    np.testing.assert_allclose(p2, p, rtol=1e-5, atol=1e-6)


@pytest.fixture
def catalogue(settings):
    "A small model trained on 300 real training images, registered as champion; the first 200 test images embedded and published."
    from fmnist_gcp.config import DEFAULT_MODEL, Store
    from fmnist_gcp.data import load_split
    from fmnist_gcp.embeddings import embed, embedding_function, embedding_table, version_time
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.registry import Registry
    from fmnist_gcp.training import TrainConfig, export_model, fit, load_model
    x, y = load_split("train", limit=300)
    cfg = TrainConfig(widths=(8, 16), convs=1, epochs=1, lr=0.01, seed=0, augment=Augment(True, 1, 0.0))
    model, _ = fit(cfg, x, y, x[:100], y[:100], 0.286, 0.353, log=lambda *_: None)
    export_model(model, cfg, {"name": DEFAULT_MODEL, "version": 1, "created": "2026-01-01T00:00:00+0000"},
                 Store("models", settings.models.uri(DEFAULT_MODEL, "1")))
    reg = Registry(settings, DEFAULT_MODEL)
    reg.register(1, aliases=("champion",))
    xt, yt = load_split("test", limit=200)
    fn = embedding_function(load_model(reg.version_store(1).uri("model.keras")))
    emb, probs = embed(fn, xt, batch=64, progress=False)
    F.publish(settings, "image_embedding", embedding_table(F.image_ids("test", range(200)), yt, emb, probs, DEFAULT_MODEL, 1,
                                                           version_time(settings, DEFAULT_MODEL, 1)))
    return fn, emb


def test_similar_embeds_an_id_outside_the_catalogue_on_the_fly(settings, catalogue, fmnist_env):
    import subprocess
    from conftest import BIN
    from fmnist_gcp.data import load_split
    from fmnist_gcp.embeddings import embed_images
    fn, emb = catalogue
    x, y = load_split("train", limit=124)
    ans = F.similar(settings, "train-123", k=5, embed=embed_images)
    assert (ans["image_id"], ans["label"], ans["embedded_on_the_fly"], ans["catalogue"]) == ("train-123", int(y[123]), True, 200)
    # the neighbours are the catalogue's nearest to the model's own embedding of the image
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = fn(x[123:124].astype(np.float32))[0][0]
    want = np.argsort(-(unit @ (q / np.linalg.norm(q))), kind="stable")[:5]
    assert [n["image_id"] for n in ans["neighbours"]] == [f"test-{i}" for i in want]
    sims = [n["similarity"] for n in ans["neighbours"]]
    assert sims == sorted(sims, reverse=True) and json.loads(json.dumps(ans)) == ans
    # a catalogue image is answered from its stored row, and embedding it on the fly gives that same vector
    inside = F.similar(settings, "test-5", k=3, embed=embed_images)
    assert inside["embedded_on_the_fly"] is False and "test-5" not in [n["image_id"] for n in inside["neighbours"]]
    xt, _ = load_split("test", limit=6)
    np.testing.assert_allclose(embed_images(settings, "fmnist-cnn", 1, xt[5:6])[0][0], emb[5], rtol=1e-4, atol=1e-5)
    with pytest.raises(F.FeatureError, match="has no embedding .* pass embed="):
        F.similar(settings, "train-123")  # without an embedder only the catalogue answers
    for bad in ("train-60000", "shoe", "test-05", "test--1"):
        with pytest.raises(F.FeatureError, match="is not an image id"):
            F.similar(settings, bad, embed=embed_images)
    run = lambda *args: subprocess.run([str(BIN / "fmnist"), *args], env=fmnist_env, capture_output=True, text=True, timeout=300)
    r = run("similar", "test-5305", "-k", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    _, yt = load_split("test")
    assert (out["image_id"], out["label"], out["embedded_on_the_fly"], len(out["neighbours"])) == ("test-5305", int(yt[5305]), True, 3)
    r = run("similar", "test-10000")
    assert (r.returncode, r.stdout) == (2, "") and "'test-10000' is not an image id" in r.stderr and len(r.stderr.strip().splitlines()) == 1
