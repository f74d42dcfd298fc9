"""Serving a bundle archive to the devices over HTTP during a ``--via url
--serve`` deploy: :class:`ArchiveServer` (one file at ``/<name>``, with
``Range`` so a device resumes an interrupted download) and
:func:`parse_host_port` for ``--serve``.

Threading: the server runs on its own thread (``fleet-http``) and answers
each connection on another; the byte count is locked.
"""

from __future__ import annotations

import http.server
import logging
import re
import socketserver
import threading
from pathlib import Path
from typing import Any

from edge_agent.errors import UsageError
from edge_agent.fleet.errors import FleetError

log = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _ArchiveHandler(http.server.BaseHTTPRequestHandler):
    server: "_ArchiveHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("archive server: %s " + fmt, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        if self.path.split("?", 1)[0] != f"/{owner.path.name}":
            self.send_error(404, "not found")
            return
        size = owner.size
        start, end, status = 0, size - 1, 200
        header = self.headers.get("Range")
        if header:
            match = _RANGE_RE.match(header.strip())
            if not match or (not match.group(1) and not match.group(2)):
                self.send_error(416, "bad range")
                return
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(owner.path, "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                block = fh.read(min(256 * 1024, left))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                owner.add_sent(len(block))
                left -= len(block)


class _ArchiveHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "ArchiveServer"


class ArchiveServer:
    """Serves one file over HTTP at ``/<file name>`` for the duration of a
    deploy, with ``Range`` support (a device resumes a broken download).

    ``host``/``port`` are bound (port 0: any free port); ``url`` uses
    ``advertise`` as the host devices connect to (default: ``host``, or this
    machine's name when ``host`` is a wildcard address).
    """

    def __init__(self, path: Path, host: str, port: int, *, advertise: str | None = None) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.bytes_sent = 0
        self._lock = threading.Lock()
        try:
            self._server = _ArchiveHTTPServer((host, port), _ArchiveHandler)
        except OSError as exc:
            raise FleetError(f"cannot serve on {host}:{port}: {exc.strerror or exc}", code="serve_failed") from None
        self._server.owner = self
        bound_port = self._server.server_address[1]
        shown = advertise or (host if host not in ("", "0.0.0.0", "::") else _this_host())
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{bound_port}/{self.path.name}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fleet-http", daemon=True)

    def add_sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def start(self) -> "ArchiveServer":
        self._thread.start()
        log.info("fleet: serving %s at %s", self.path, self.url)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ArchiveServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _this_host() -> str:
    import socket

    return socket.getfqdn() or socket.gethostname()


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; ``:PORT`` binds every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{value!r}: expected HOST:PORT, e.g. 0.0.0.0:8600")
    return host.strip("[]") or "0.0.0.0", int(port)
