"""The local control socket: the running agent's commands over a Unix socket
(:class:`LocalSocketServer`; :func:`request` is the client side).

``edge-agent models ...`` on the device talks to the running agent through
this socket instead of writing the store behind its back. The protocol is the
MQTT command protocol (CONTRACT §3) one line at a time: the client writes one
command object as a JSON line, the agent answers with one reply line. Who can
connect is decided by the socket file's permissions (0660: root and the
agent's group), so commands that name local files (``add``) are allowed here
and not over MQTT.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return
        reply = self.server.handle_payload(line)  # type: ignore[attr-defined]
        self.wfile.write(json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class LocalSocketServer:
    """Serves ``handle(payload, origin) -> reply`` on a Unix socket (one
    thread per connection: ``handle`` must be thread-safe)."""

    def __init__(self, path: Path, handle: Callable[[bytes, str], dict[str, Any]]) -> None:
        self.path = Path(path)
        self.handle = handle
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if len(str(self.path).encode()) > 100:
            raise EdgeAgentError(f"control socket path {self.path} is too long for a Unix socket", code="bad_config")
        # Only the process holding the store lock gets here: a socket file
        # left by a killed agent is stale.
        self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        server = _Server(str(self.path), _Handler, bind_and_activate=True)
        os.chmod(self.path, 0o660)
        server.handle_payload = lambda payload: self.handle(payload, f"unix:{self.path}")  # type: ignore[attr-defined]
        self._server = server
        # A long poll interval: an idle agent should not wake twice a second
        # for nothing; stop() wakes the loop itself.
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30.0},
                                        name="control-socket", daemon=True)
        self._thread.start()
        log.info("local control socket at %s", self.path)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for serve_forever to notice; shutting the
            # listening socket down makes its select() return at once (and
            # again until the loop has seen the request to stop).
            stopper = threading.Thread(target=server.shutdown, name="control-socket-stop", daemon=True)
            stopper.start()
            try:
                server.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            stopper.join(10.0)
            server.server_close()
        self.path.unlink(missing_ok=True)


def agent_listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, *, timeout: float = 600.0) -> dict[str, Any]:
    """Send one command to the running agent and return its reply."""
    message = {"id": f"local-{uuid.uuid4().hex[:12]}", "cmd": cmd, "args": args or {}}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(message).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise EdgeAgentError(f"the agent's control socket {path} does not answer: {exc}", code="agent_unreachable") from None
    finally:
        s.close()
    try:
        return json.loads(data)
    except ValueError:
        raise EdgeAgentError(f"the agent's control socket {path} sent no reply", code="agent_unreachable") from None
