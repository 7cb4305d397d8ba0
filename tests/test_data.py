"""The real Fashion-MNIST files where a notebook cell is not enough: corrupt copies of the real files, and downloads
from a loopback web server. The cheap checks (parsing, hashing, loading, the split) live in nbs/01_data."""
import functools
import gzip
import hashlib
import http.server
import shutil
import threading

import pytest

from fmnist_gcp import data
from fmnist_gcp.data import FILES, DataIntegrityError, load_split, locate


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
    assert data.read_verified(got, FILES["test_labels"][1])[1] == FILES["test_labels"][1]


def test_corrupt_download_leaves_nothing_in_the_cache(tmp_path, mirror):
    root, url = mirror
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0" * 100))
    with pytest.raises(DataIntegrityError, match="expected 0402a96d"):
        data.download("test_labels", tmp_path / "cache", url)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DataIntegrityError, match="could not download"):  # 404 for a file the mirror lacks
        data.download("train_labels", tmp_path / "cache", url)
    assert list((tmp_path / "cache").iterdir()) == []
