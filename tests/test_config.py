"""Settings and the store layer where a notebook cell is not enough: a GCS emulator, a killed writer process, a
fresh interpreter importing TensorFlow, and the `fmnist config` command. The cheap checks live in nbs/00_config."""
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import BIN
from fmnist_gcp.config import Settings, Store, record, recorded


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
    from fmnist_gcp.preprocessing import TFRECORD_DIR, TFRECORD_MANIFEST, export_tfrecords, load_tfrecords
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = Settings.from_env({"FMNIST_BACKEND": "vertex", "FMNIST_PROJECT": "acme-ml", "FMNIST_REGION": "us-central1",
                           "FMNIST_DATASETS_BUCKET": "gs://fmnist-test/tfr"})
    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 10
    s.datasets.write_json(TFRECORD_MANIFEST,
                          {"splits": {"val": export_tfrecords(s, "val", x, y, np.arange(40) * 3, shards=3)}})
    xb, yb, ib = load_tfrecords("val", s)
    assert (xb == x).all() and (yb == y).all() and (ib == np.arange(40) * 3).all()
    # a shard changed behind the manifest's back is refused
    s.datasets.write_bytes(f"{TFRECORD_DIR}/val-00001-of-00003.tfrecord", b"garbage")
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        load_tfrecords("val", s)


def test_killed_writer_leaves_the_old_file_whole(tmp_path):
    "A process killed while writing a large file (new bytes on disk, not yet renamed): readers see the old file."
    st = Store("datasets", str(tmp_path))
    old = b"old" * 1000
    st.write_bytes("a/big.bin", old)
    size = 16 << 20
    writer = textwrap.dedent(f"""
        import os, time
        from fmnist_gcp.config import Store
        def stall(fd):  # the new bytes are in the temporary file; stop here and wait to be killed
            print(os.fstat(fd).st_size, flush=True); time.sleep(120)
        os.fsync = stall
        Store("datasets", {str(tmp_path)!r}).write_bytes("a/big.bin", b"n" * {size})
        """)
    p = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert int(p.stdout.readline()) == size  # the writer is mid-write
    finally:
        p.kill(); p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert st.read_bytes("a/big.bin") == old
    leftovers = [n for n in os.listdir(tmp_path / "a") if n != "big.bin"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".big.bin.tmp-")  # no finally clause runs after SIGKILL...
    assert st.ls("a") == ["big.bin"]  # ...but listings do not show it
    st.write_bytes("a/big.bin", b"new")
    assert st.read_bytes("a/big.bin") == b"new"


def test_tensorflow_import_leaves_no_log_lines_on_stderr():
    "import_tensorflow, then what usually logs: tf.function retracing, absl and tf warnings, a tf.data C++ op."
    script = textwrap.dedent("""
        import os, tempfile
        from fmnist_gcp.config import import_tensorflow
        tf = import_tensorflow()
        f = tf.function(lambda a: a * 2)
        for i in range(8): f(i)  # retracing: WARNING:tensorflow:5 out of the last 7 calls ...
        tf.get_logger().warning("tf warning")
        import absl.logging; absl.logging.warning("absl warning")
        path = os.path.join(tempfile.mkdtemp(), "a.tfrecord")
        with tf.io.TFRecordWriter(path) as w: w.write(b"x")
        assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b"x"]  # C++ INFO line about buffer_size
        print("ok")
        """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert r.stderr == "", r.stderr


def test_fmnist_config_names_the_account_and_never_the_key(fmnist_env, tmp_path):
    "A generated service-account key file: `fmnist config` names its account, not its key, key id or path."
    key = {"type": "service_account", "project_id": "acme-ml", "private_key_id": secrets.token_hex(20),
           "private_key": f"-----BEGIN PRIVATE KEY-----\n{secrets.token_urlsafe(600)}\n-----END PRIVATE KEY-----\n",
           "client_email": "fmnist-runner@acme-ml.iam.gserviceaccount.com", "client_id": "104211112222333344445",
           "token_uri": "https://oauth2.googleapis.com/token"}
    path = tmp_path / "private" / "fmnist-runner-key.json"
    path.parent.mkdir(); path.write_text(json.dumps(key))
    env = {**fmnist_env, "GOOGLE_APPLICATION_CREDENTIALS": str(path),
           "NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1"}
    r = subprocess.run([str(BIN / "fmnist"), "config"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("credentials")]
    assert line and "service_account, fmnist-runner@acme-ml.iam.gserviceaccount.com, project acme-ml" in line[0]
    out = r.stdout + r.stderr
    assert [s for s in (key["private_key"], key["private_key_id"], str(path), path.name, "PRIVATE KEY") if s in out] == []
