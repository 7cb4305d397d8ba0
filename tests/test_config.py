"""Settings from the environment and the store layer, locally and on gs:// against the GCS emulator."""
import pytest

from fmnist_gcp.config import ConfigError, Settings, Store, record, recorded


def test_vertex_needs_project_and_region():
    with pytest.raises(ConfigError, match="FMNIST_PROJECT is not set"):
        Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_REGION": "us-central1"})
    with pytest.raises(ConfigError, match="FMNIST_REGION is not set"):
        Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml"})
    with pytest.raises(ConfigError, match="must be gs:// URIs"):
        Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "us-central1",
                           "FMNIST_MODELS_BUCKET": "/tmp/models"})


def test_vertex_bucket_names_and_report_has_no_credentials():
    s = Settings.from_env({"FMNIST_BACKEND": "vertex", "GOOGLE_CLOUD_PROJECT": "acme-ml", "FMNIST_REGION": "europe-west4",
                           "GOOGLE_APPLICATION_CREDENTIALS": "/secret/key.json"})
    assert [s.store(r).root for r in ("dev", "datasets", "models")] == [
        "gs://acme-ml-fmnist-dev", "gs://acme-ml-fmnist-datasets", "gs://acme-ml-fmnist-models"]
    assert "/secret/key.json" not in str(s.report())


def test_local_atomic_write_replaces_whole_file(tmp_path):
    st = Store("datasets", str(tmp_path))
    st.write_bytes("a/b.bin", b"x" * 10)
    st.write_bytes("a/b.bin", b"y" * 3)
    assert st.read_bytes("a/b.bin") == b"yyy"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no temp file left


def test_gcs_round_trip_through_the_store_layer(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "us-central1",
                           "FMNIST_DEV_BUCKET": "gs://fmnist-test/dev", "FMNIST_DATASETS_BUCKET": "gs://fmnist-test/datasets",
                           "FMNIST_MODELS_BUCKET": "gs://fmnist-test/models"})
    payload = bytes(range(256)) * 1000
    uri = s.datasets.write_bytes("exports/blob.bin", payload)
    assert uri == "gs://fmnist-test/datasets/exports/blob.bin"
    assert s.datasets.exists("exports/blob.bin") and s.datasets.read_bytes("exports/blob.bin") == payload
    assert s.datasets.ls("exports") == ["blob.bin"]
    with s.datasets.open("exports/blob.bin") as f:
        assert f.read(4) == bytes(range(4))
    record("r1", "statistics", {"pixel_mean": 0.286}, s)
    record("r1", "statistics", {"pixel_std": 0.353}, s)
    assert recorded("r1", s) == {"statistics": {"pixel_mean": 0.286, "pixel_std": 0.353}}
    with pytest.raises(FileNotFoundError, match="datasets store"):
        s.datasets.read_bytes("exports/missing.bin")


def test_tfrecord_export_round_trips_through_gcs(gcs_emulator, monkeypatch):
    import numpy as np
    from fmnist_gcp.preprocessing import TFRECORD_DIR, export_tfrecords, load_tfrecords
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "us-central1",
                           "FMNIST_DATASETS_BUCKET": "gs://fmnist-test/tfr"})
    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 10
    s.datasets.write_json(f"{TFRECORD_DIR}/manifest.json",
                          {"splits": {"val": export_tfrecords(s, "val", x, y, np.arange(40) * 3, shards=3)}})
    xb, yb, ib = load_tfrecords("val", s)
    assert (xb == x).all() and (yb == y).all() and (ib == np.arange(40) * 3).all()
    # a shard changed behind the manifest's back is refused
    s.datasets.write_bytes(f"{TFRECORD_DIR}/val-00001-of-00003.tfrecord", b"garbage")
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        load_tfrecords("val", s)
