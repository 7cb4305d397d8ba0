"""A `gs://` store write that meets 503s (issue 22): a proxy in front of gcp-storage-emulator answers 503 to upload
requests; the write is sent again as a whole object and a reader sees the whole object or none, never a part."""
import http.client
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from fmnist_gcp.serving import free_port  # noqa: E402


class FlakyProxy:
    "Forwards to the emulator; answers 503 to the first `fail` upload requests (after forwarding them when `after`)."
    def __init__(self, upstream: str, fail: int, after: bool = False):
        self.upstream, self.fail, self.after, self.uploads = upstream.removeprefix("http://"), fail, after, 0
        proxy = self
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upload = self.path.startswith("/upload/")
                if upload: proxy.uploads += 1
                failing = upload and proxy.uploads <= proxy.fail
                if failing and not proxy.after: return self._answer(503, {}, b'{"error": {"code": 503, "message": "Backend Error"}}')
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
                r = conn.getresponse(); data = r.read(); conn.close()
                if failing: return self._answer(503, {}, b'{"error": {"code": 503, "message": "Backend Error"}}')
                self._answer(r.status, {k: v for k, v in r.getheaders() if k.lower() not in ("transfer-encoding", "content-length", "connection")}, data)
            def _answer(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items(): self.send_header(k, v)
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self): self.server.shutdown(); self.server.server_close()


@pytest.fixture
def flaky(gcs_emulator, monkeypatch):
    "Make a FlakyProxy and point gcsfs at it; gcsfs's own per-request retries do not sleep; a fast policy."
    import gcsfs
    import gcsfs.retry
    async def no_wait(s): return None
    monkeypatch.setattr(gcsfs.retry, "asyncio", SimpleNamespace(sleep=no_wait))
    monkeypatch.setenv("FMNIST_RETRY_INITIAL_S", "0.01"); monkeypatch.setenv("FMNIST_RETRY_MAX_S", "0.02")
    proxies = []
    def make(fail, after=False):
        p = FlakyProxy(gcs_emulator, fail, after); proxies.append(p)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.url)
        gcsfs.GCSFileSystem.clear_instance_cache()
        return p
    yield make
    for p in proxies: p.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()


DATA = bytes(range(256)) * 4096  # 1 MiB


def _read(gcs_emulator, uri):
    "The object as a reader straight at the emulator sees it (None when there is none)."
    from fmnist_gcp.config import filesystem
    import gcsfs
    os.environ["STORAGE_EMULATOR_HOST"] = gcs_emulator; gcsfs.GCSFileSystem.clear_instance_cache()
    fs, path = filesystem(uri)
    return fs.cat_file(path) if fs.exists(path) else None


@pytest.mark.parametrize("after", [False, True], ids=["refused", "stored-then-503"])
def test_a_write_past_gcsfs_retries_is_sent_again_whole(flaky, gcs_emulator, capsys, after):
    from fmnist_gcp.config import write_bytes_atomic
    proxy = flaky(fail=7, after=after)  # gcsfs tries a request 6 times; the 7th 503 reaches the policy
    uri = f"gs://fmnist-test/{uuid.uuid4().hex[:8]}/x.bin"
    write_bytes_atomic(uri, DATA)
    assert proxy.uploads == 8
    assert "attempt 2 of 12 after 503 UNAVAILABLE" in capsys.readouterr().err
    assert _read(gcs_emulator, uri) == DATA


def test_a_write_that_meets_503_past_the_deadline_is_one_line_and_leaves_no_object(flaky, gcs_emulator, monkeypatch):
    from fmnist_gcp.config import GoogleUnavailable, write_bytes_atomic
    monkeypatch.setenv("FMNIST_RETRY_DEADLINE_S", "0.05")
    flaky(fail=10_000)
    uri = f"gs://fmnist-test/{uuid.uuid4().hex[:8]}/x.bin"
    with pytest.raises(GoogleUnavailable) as e: write_bytes_atomic(uri, DATA)
    assert str(e.value).startswith(f"Cloud Storage: write {uri} still failing after ") and "\n" not in str(e.value)
    assert _read(gcs_emulator, uri) is None
