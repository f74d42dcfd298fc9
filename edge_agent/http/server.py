"""The HTTP server of the local API: the standard library's threading HTTP
server on ``[http] host:port``, one thread per connection, so a slow client
never holds up another.

It owns the wire: HTTP/1.1 keep-alive, the idle timeout, the request body
(``Content-Length`` required, at most ``max_body_bytes``; a larger one is
refused with 413 and, up to twice the limit, read and dropped so the client
sees the answer), and closing a connection whose refused body was left
unread. What each request is answered is :meth:`edge_agent.http.api.Api.handle`'s
business, handed in as ``handle``.

Thread-safety: ``handle`` is called from each connection's thread at once;
``start`` and ``stop`` from one thread (the agent's).
"""

from __future__ import annotations

import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from edge_agent import __version__
from edge_agent.errors import EdgeAgentError
from edge_agent.http.api import ApiError, Request, Response

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"edge-agent/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout: float  # an idle or stalled connection is closed (and its thread ends) after this many seconds
    handle_request: Callable[[Request], Response]  # set on the subclass made per server
    max_body: int
    _body_read = False

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's
        # algorithm holds the body back until the client's delayed ACK of the
        # headers: 40 ms added to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("http %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        self._body_read = False
        response = self.handle_request(Request(method, self.path, self.headers, self._body))
        if response.status >= 400 and not self._body_read \
                and self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # an unread body must not be taken for the next request
        self._send(response)

    def _body(self) -> bytes:
        """The request's body, for an endpoint that takes one; ApiError when
        it cannot be read."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if n > self.max_body:
            self._discard(n)
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body is {n} bytes; at most {self.max_body} are accepted")
        self._body_read = True
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        """Read a refused body (up to twice the limit) so that the client,
        still sending it, gets the 413 instead of a reset connection; a
        larger one is cut off. The connection is not reused either way."""
        self.close_connection = True
        left = n if n <= 2 * self.max_body else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class HttpServer:
    """``handle`` served on ``host:port``; ``start`` binds (raising a clear
    error when the port is taken), ``stop`` shuts it down."""

    def __init__(self, handle: Callable[[Request], Response], host: str, port: int, *,
                 max_body_bytes: int = 32 * 1024 * 1024, idle_timeout_s: float = 30.0) -> None:
        self.handle = handle
        self.host, self.port = host, port
        self.max_body = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"handle_request": staticmethod(self.handle),
                                                "max_body": self.max_body, "timeout": self.idle_timeout_s})
        try:
            server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise EdgeAgentError(f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                                 code="http_bind_failed") from None
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http",
                         daemon=True).start()  # ends when stop() shuts the server down
        log.info("HTTP API on http://%s:%d", *self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
