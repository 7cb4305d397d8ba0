"""The real Fashion-MNIST files: verification, clear errors on corrupt copies, atomic downloads, the split."""
import functools
import gzip
import hashlib
import http.server
import shutil
import threading

import numpy as np
import pytest

from fmnist_gcp import data
from fmnist_gcp.config import Settings
from fmnist_gcp.data import FILES, DataIntegrityError, load_split, locate, train_val_split


def test_real_files_verify_and_parse(fmnist_env):
    x, y = load_split("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    xt, yt = load_split("train", limit=500)
    assert xt.shape == (500, 28, 28) and set(np.unique(yt)) <= set(range(10))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_copy_gives_a_clear_error_and_writes_nothing(fmnist_env, tmp_path, monkeypatch, damage):
    src = locate("test_labels", fetch=False)[1]
    bad_dir = tmp_path / "bad"; bad_dir.mkdir()
    for key in FILES:  # a full data dir, with one damaged file
        shutil.copy(locate(key, fetch=False)[1], bad_dir)
    raw = gzip.decompress(src.read_bytes())
    raw = raw[:-100] if damage == "truncate" else raw[:-1] + bytes([raw[-1] ^ 1])
    target = bad_dir / src.name
    target.write_bytes(gzip.compress(raw))
    monkeypatch.setenv("FMNIST_DATA_DIR", str(bad_dir))
    before = sorted(p.name for p in bad_dir.iterdir())
    with pytest.raises(DataIntegrityError) as e:
        load_split("test")
    msg = str(e.value)
    assert str(target) in msg and FILES["test_labels"][1] in msg and hashlib.sha256(raw).hexdigest() in msg
    assert "fmnist data" in msg  # the fix
    assert sorted(p.name for p in bad_dir.iterdir()) == before
    assert not (tmp_path / "cache").exists()


def test_truncated_gzip_names_the_file(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(bytes(range(256)) * 50)[:-30])  # cut inside the deflate stream
    with pytest.raises(DataIntegrityError, match="t10k-labels-idx1-ubyte.gz: cannot be decompressed"):
        data.read_verified(p, FILES["test_labels"][1])


@pytest.fixture
def mirror(tmp_path):
    "A loopback HTTP server over a directory; yields (directory, base URL)."
    root = tmp_path / "mirror"; root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_port}/"
    finally:
        srv.shutdown()


def test_download_of_the_real_file_lands_verified(fmnist_env, tmp_path, mirror):
    root, url = mirror
    shutil.copy(locate("test_labels", fetch=False)[1], root)  # serve the real gz
    got = data.download("test_labels", tmp_path / "cache", url)
    assert got.name == "t10k-labels-idx1-ubyte.gz" and sorted(p.name for p in got.parent.iterdir()) == [got.name]
    assert data.read_verified(got, FILES["test_labels"][1])


def test_corrupt_download_leaves_nothing_in_the_cache(tmp_path, mirror):
    root, url = mirror
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0" * 100))
    with pytest.raises(DataIntegrityError, match="expected 0402a96d"):
        data.download("test_labels", tmp_path / "cache", url)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DataIntegrityError, match="could not download"):  # 404 for a file the mirror lacks
        data.download("train_labels", tmp_path / "cache", url)
    assert list((tmp_path / "cache").iterdir()) == []


def test_split_is_stratified_and_deterministic(fmnist_env):
    _, y = load_split("train")
    tr, va = train_val_split(y, 0.1, seed=42)
    assert len(va) == 6000 and np.bincount(y[va]).tolist() == [600] * 10
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 60_000
    assert (train_val_split(y, 0.1, seed=42)[1] == va).all()
