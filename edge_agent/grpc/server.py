"""The gRPC server of TF Serving's API on ``[grpc] host:port`` (default 8500,
TF Serving's gRPC port).

grpcio's server with a pool of ``workers`` threads; requests beyond that
wait for a free worker. Request messages larger than ``max_message_bytes``
are refused by gRPC itself with RESOURCE_EXHAUSTED before they reach the
services, and an input tensor whose typed values expand (TensorFlow's
repeat-the-last-value rule) to an array larger than that is INVALID_ARGUMENT. With ``tls``, the port speaks TLS (and, with ``client_ca_certs``,
requires a client certificate signed by that CA).

This module and :mod:`edge_agent.grpc.service` are the only ones that import
``grpc``; the agent imports them only when ``[grpc] enabled = true``.

Thread-safety: ``start`` and ``stop`` from one thread (the agent's).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)


def _import_grpc() -> Any:
    try:
        import grpc
    except ImportError:
        raise EdgeAgentError(
            "[grpc] enabled = true needs the grpc extra: pip install 'edge-agent[grpc]' (grpcio, protobuf)",
            code="grpc_missing",
        ) from None
    return grpc


class GrpcServer:
    """Cheap to build; :meth:`start` binds and serves, :meth:`stop` ends it."""

    def __init__(self, predictor: Any, host: str, port: int, *, max_message_bytes: int, workers: int = 8,
                 tls: Any = None, observe: Any = None) -> None:
        self.predictor = predictor
        self.observe = observe  # counts each call in the agent's metrics (edge_agent.grpc.service.Observe)
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.workers = workers
        self.tls = tls
        self.address: tuple[str, int] | None = None
        self._server: Any = None

    def start(self) -> None:
        """Bind and serve. Raises EdgeAgentError (``grpc_bind_failed``) when the
        address cannot be bound or the TLS files cannot be read."""
        grpc = _import_grpc()
        from edge_agent.grpc.service import add_services

        credentials = self._credentials(grpc) if self.tls is not None else None
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.so_reuseport", 0)],  # a second agent on the port fails to bind, as over HTTP
        )
        add_services(server, self.predictor, self.observe, self.max_message_bytes)
        host = f"[{self.host}]" if ":" in self.host else self.host
        target = f"{host}:{self.port}"
        try:
            bound = (server.add_secure_port(target, credentials) if credentials is not None
                     else server.add_insecure_port(target))
        except RuntimeError as exc:
            bound, detail = 0, str(exc)
        else:
            detail = "address in use or not available"
        if not bound:
            server.stop(None)
            raise EdgeAgentError(f"grpc: cannot serve on {self.host}:{self.port}: {detail}", code="grpc_bind_failed")
        server.start()
        self._server = server
        self.address = (self.host, bound)
        log.info("gRPC API (TF Serving's PredictionService, ModelService) on %s:%d%s", self.host, bound,
                 " with TLS" if credentials is not None else "")

    def _credentials(self, grpc: Any) -> Any:
        tls = self.tls
        try:
            key, cert = tls.keyfile.read_bytes(), tls.certfile.read_bytes()
            ca = tls.client_ca_certs.read_bytes() if tls.client_ca_certs is not None else None
        except OSError as exc:
            raise EdgeAgentError(f"grpc.tls: cannot read {exc.filename}: {exc.strerror}", code="grpc_bind_failed") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, let those in flight finish for up to ``grace_s``."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()
            log.info("gRPC API stopped")
