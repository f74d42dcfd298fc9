"""Bundle downloads against a real HTTP server on loopback: a dropped
connection resumes with Range, a server that ignores Range still yields the
right file, and nothing unverified ever appears at the destination."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from edge_agent.comms.download import download, part_path
from edge_agent.errors import DownloadError
from mqtt_helpers import make_certs

CONTENT = os.urandom(300_000)
SHA = hashlib.sha256(CONTENT).hexdigest()
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout": 5.0}


class FileServer(ThreadingHTTPServer):
    """Serves ``content`` at any path, with knobs for misbehaving."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.content = CONTENT
        self.requests: list[dict[str, str]] = []
        self.drop_after: list[int] = []  # per request, in order: bytes sent before hanging up
        self.statuses: list[int] = []  # per request, in order: an error status to answer
        self.ignore_range = False
        self.send_length = True
        self.redirect_to: str | None = None
        self.sent = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/bundle.tar.gz"


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        with srv.lock:
            srv.requests.append(dict(self.headers))
            status = srv.statuses.pop(0) if srv.statuses else None
            drop = srv.drop_after.pop(0) if srv.drop_after else None
        if status is not None:
            self.send_error(status)
            return
        if srv.redirect_to:
            self.send_response(302)
            self.send_header("Location", srv.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.content
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        if srv.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            with srv.lock:
                srv.sent += drop
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)
        with srv.lock:
            srv.sent += len(body)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_plain_download(server: FileServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "b.tar.gz"
    out = download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, progress=lambda d, t: seen.append((d, t)), **FAST)
    assert out == dest and dest.read_bytes() == CONTENT
    assert not part_path(dest).exists()
    assert seen[-1] == (len(CONTENT), len(CONTENT))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert "Range" not in server.requests[0]


def test_dropped_connection_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    """The expensive part of a deploy over a flaky uplink is not sent twice."""
    server.drop_after = [100_000]
    dest = tmp_path / "b.tar.gz"
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT
    assert len(server.requests) == 2
    assert server.requests[1]["Range"] == "bytes=100000-"
    assert server.sent == len(CONTENT), "no byte was sent twice"


def test_a_restart_continues_the_part_file(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "b.tar.gz"
    part_path(dest).write_bytes(CONTENT[:123_456])  # what the previous run left
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT
    assert server.requests[0]["Range"] == "bytes=123456-"
    assert server.sent == len(CONTENT) - 123_456


def test_a_server_that_ignores_range_gives_a_full_download(server: FileServer, tmp_path: Path) -> None:
    server.ignore_range = True
    server.drop_after = [50_000]
    dest = tmp_path / "b.tar.gz"
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT
    assert server.requests[1]["Range"] == "bytes=50000-", "the client asked to resume"
    assert server.sent == 50_000 + len(CONTENT), "the server answered 200 with everything, and that was used"


def test_a_stale_part_from_another_file_is_replaced(server: FileServer, tmp_path: Path) -> None:
    """A part left by an earlier bundle at the same URL fails the checksum
    once; one clean download then succeeds."""
    dest = tmp_path / "b.tar.gz"
    part_path(dest).write_bytes(b"\0" * 1000)
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT
    assert "Range" in server.requests[0] and "Range" not in server.requests[1]


def test_wrong_sha256(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "b.tar.gz"
    with pytest.raises(DownloadError) as err:
        download(server.url, dest, sha256="0" * 64, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert err.value.code == "checksum_mismatch"
    assert SHA in err.value.message
    assert not dest.exists() and not part_path(dest).exists()


def test_declared_size_over_the_cap_is_refused_before_any_request(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        download(server.url, tmp_path / "b", sha256=SHA, size=len(CONTENT), max_bytes=1000, **FAST)
    assert err.value.code == "too_large"
    assert server.requests == []


def test_content_length_over_the_cap(server: FileServer, tmp_path: Path) -> None:
    """The command lied about the size: the server's Content-Length stops it."""
    with pytest.raises(DownloadError) as err:
        download(server.url, tmp_path / "b", sha256=SHA, size=1000, max_bytes=2000, **FAST)
    assert err.value.code == "too_large"


def test_a_body_longer_than_announced_is_cut_off(server: FileServer, tmp_path: Path) -> None:
    """No Content-Length (a close-delimited body): the cap is enforced while reading."""
    server.send_length = False
    dest = tmp_path / "b"
    with pytest.raises(DownloadError) as err:
        download(server.url, dest, sha256=SHA, size=200_000, max_bytes=250_000, **FAST)
    assert err.value.code == "size_mismatch"
    assert not part_path(dest).exists() and not dest.exists()


def test_content_length_differs_from_the_size(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        download(server.url, tmp_path / "b", sha256=SHA, size=len(CONTENT) + 1, max_bytes=10**6, **FAST)
    assert err.value.code == "size_mismatch"


def test_server_errors_are_retried(server: FileServer, tmp_path: Path) -> None:
    server.statuses = [503, 500]
    dest = tmp_path / "b"
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT and len(server.requests) == 3


def test_not_found_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    server.statuses = [404]
    with pytest.raises(DownloadError) as err:
        download(server.url, tmp_path / "b", sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert err.value.code == "download_failed" and "404" in err.value.message
    assert len(server.requests) == 1


def test_retries_run_out(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{port}/b", tmp_path / "b", sha256=SHA, size=10, max_bytes=100, retries=2, **FAST)
    assert err.value.code == "download_failed"
    assert "3 attempt(s)" in err.value.message


def test_a_redirect_away_from_http_is_refused(server: FileServer, tmp_path: Path) -> None:
    server.redirect_to = "ftp://127.0.0.1/b.tar.gz"
    with pytest.raises(DownloadError) as err:
        download(server.url, tmp_path / "b", sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert err.value.code == "download_failed" and "not http(s)" in err.value.message
    assert len(server.requests) == 1


def test_a_verified_file_is_not_fetched_again(server: FileServer, tmp_path: Path) -> None:
    """A deploy repeated after a restart finds the archive already there."""
    dest = tmp_path / "b"
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert len(server.requests) == 1


def test_cancel_keeps_the_part_for_later(server: FileServer, tmp_path: Path) -> None:
    """SIGTERM during a deploy: stop within a chunk, resume on the next start."""
    cancel = threading.Event()

    def stop_halfway(done: int, total: int) -> None:
        if done >= total // 2:
            cancel.set()

    dest = tmp_path / "b"
    with pytest.raises(DownloadError) as err:
        download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, progress=stop_halfway, cancel=cancel, **FAST)
    assert err.value.code == "cancelled"
    kept = part_path(dest).stat().st_size
    assert len(CONTENT) // 2 <= kept < len(CONTENT)
    download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert dest.read_bytes() == CONTENT
    assert server.requests[-1]["Range"] == f"bytes={kept}-"


def test_cancel_interrupts_the_back_off(tmp_path: Path) -> None:
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{port}/b", tmp_path / "b", sha256=SHA, size=10, max_bytes=100, backoff_s=30, cancel=cancel)
    assert err.value.code == "cancelled"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("url", ["ftp://host/b.tar", "s3://bucket/b", "/plain/path", "file://remote-host/b.tar"])
def test_unsupported_url(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "b", sha256=SHA, size=1, max_bytes=10)
    assert err.value.code == "unsupported_url"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk(server: FileServer, tmp_path: Path) -> None:
    """Writes into /dev/full fail with ENOSPC exactly as a full SD card does."""
    dest = tmp_path / "b"
    part_path(dest).symlink_to("/dev/full")
    with pytest.raises(DownloadError) as err:
        download(server.url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, **FAST)
    assert err.value.code == "disk_full"
    assert not dest.exists()
    assert len(server.requests) == 1, "a full disk is not retried"


# -- https -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test CA and a server certificate for 127.0.0.1 signed by it
    (``ca``, ``cert``, ``key``), as the broker tests use them."""
    pytest.importorskip("cryptography.x509")  # a test-time tool here; the agent itself only uses the ssl module
    return make_certs(tmp_path_factory.mktemp("tls"))["broker"]


@pytest.fixture
def tls_server(tls_cert: dict[str, Path]) -> Iterator[FileServer]:
    import ssl

    srv = FileServer()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_cert["cert"], tls_cert["key"])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_https_with_a_trusted_certificate_resumes_too(tls_server: FileServer, tls_cert: dict[str, Path], tmp_path: Path) -> None:
    import ssl

    tls_server.drop_after = [70_000]
    url = tls_server.url.replace("http://", "https://")
    dest = tmp_path / "b"
    context = ssl.create_default_context(cafile=str(tls_cert["ca"]))
    download(url, dest, sha256=SHA, size=len(CONTENT), max_bytes=10**6, ssl_context=context, **FAST)
    assert dest.read_bytes() == CONTENT
    assert tls_server.requests[1]["Range"] == "bytes=70000-"


def test_https_with_an_untrusted_certificate_fails_at_once(tls_server: FileServer, tmp_path: Path) -> None:
    """A certificate problem is not transient: no retries, a clear message."""
    import time

    url = tls_server.url.replace("http://", "https://")
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "b", sha256=SHA, size=len(CONTENT), max_bytes=10**6, timeout=5, backoff_s=5)
    assert err.value.code == "download_failed"
    assert "not trusted" in err.value.message
    assert time.monotonic() - started < 4, "it was retried"
