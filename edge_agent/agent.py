"""The agent: builds the components from a config, starts them in order,
stops them in reverse, from one list.

Order: model store and manager (models must be loaded before frames flow),
MQTT transport, then per source its capture thread and its inference worker.
The agent runs until SIGTERM/SIGINT, or until every source has ended (a file
or folder without ``loop``); then each worker finishes the frame in flight,
``stopped`` is published, and ``run`` returns 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError, SourceError
from edge_agent.models.manager import ModelManager
from edge_agent.models.store import ModelStore, StoreLock
from edge_agent.pipeline import LogSink, Sink, SourceWorker
from edge_agent.sources import FrameSource, open_source

log = logging.getLogger(__name__)


class Agent:
    """Owns every long-lived component. ``stop_event`` is shared by all."""

    def __init__(self, config: AgentConfig, *, extra_sinks: list[Sink] | None = None) -> None:
        from edge_agent.runtimes import limit_malloc_arenas

        limit_malloc_arenas()
        self.config = config
        self.stop_event = threading.Event()
        self.store = ModelStore(config.store.path, keep_versions=config.store.keep_versions)
        self.store_lock = StoreLock(config.store.path)
        self.events: list[Callable[[dict[str, Any]], None]] = []
        self.models = ModelManager(
            self.store, config.models, trusted_keys=config.store.trusted_keys, on_event=self._on_event
        )
        self.sinks: list[Sink] = [LogSink(), *(extra_sinks or [])]
        self.transport = None
        self.plane = None
        if config.mqtt is not None:
            from edge_agent.comms.mqtt import MqttTransport

            self.transport = MqttTransport(
                config.mqtt, config.device_id, status_provider=self.models.status, groups=config.groups
            )
            self.sinks.append(_PlaneResults(self))
        self._skipped_seen: dict[str, int] = {}
        from edge_agent.comms.local import LocalControlServer
        from edge_agent.control import Control, build_dispatcher

        self.control = Control(self.models, status=self.status_message, apply_settings=self.apply_settings)
        self.local_dispatcher = build_dispatcher(self.control, local=True, events=self._on_event)
        self.control_server = LocalControlServer(config.store.socket_path, self.local_dispatcher.handle)
        self.sources: list[FrameSource] = []
        self.workers: list[SourceWorker] = []
        self.http = None
        if config.http.enabled:
            from edge_agent.httpapi import HttpServer

            self.http = HttpServer(self, config.http.host, config.http.port,
                                   max_body_bytes=int(config.http.max_body_mb * 1e6),
                                   idle_timeout_s=config.http.idle_timeout_s)
        self._started: list[tuple[str, Callable[[], None]]] = []

    def start(self) -> None:
        """Start everything; on failure, stop what was started and re-raise."""
        try:
            self._step("store lock", self._lock_store, self.store_lock.release)
            self._step("models", self.models.start, self.models.stop)
            self._step("control socket", self.control_server.start, self.control_server.stop)
            if self.http is not None:
                self._step("http", self.http.start, self.http.stop)
            if self.transport is not None:
                self._step("control plane", self._start_plane, self._stop_plane)
                self._step("mqtt", self.transport.start, self.transport.stop)
            for cfg in self.config.sources:
                try:
                    source = open_source(cfg)
                except SourceError as exc:
                    log.error("%s", exc)
                    continue
                worker = SourceWorker(source, self.models, self.sinks, self.stop_event)
                self._step(f"source {cfg.name}", source.start, source.stop)
                self._step(f"worker {cfg.name}", worker.start, lambda w=worker: w.join(timeout=10.0))
                self.sources.append(source)
                self.workers.append(worker)
        except BaseException:
            self.shutdown()
            raise
        if self.config.sources and not self.workers:
            self.shutdown()
            raise EdgeAgentError("no source could be started (see the errors above)", code="no_sources")

    def _start_plane(self) -> None:
        """Commands, events, telemetry and store-and-forward over MQTT (the
        subscriptions and hooks are in place before the first connect)."""
        from edge_agent.comms.plane import BundleFetcher, ControlPlane
        from edge_agent.control import Control, build_dispatcher
        from edge_agent.telemetry import TelemetryCollector

        cfg = self.config
        assert self.transport is not None and cfg.mqtt is not None
        spool = None
        if cfg.spool.enabled:
            from edge_agent.comms.spool import Spool

            spool = Spool(cfg.spool.path or cfg.store.path / ".spool.db", max_bytes=cfg.spool.max_bytes)
        max_bytes = int(cfg.store.max_bundle_mb * 1e6)
        self.fetcher = BundleFetcher(
            transport=self.transport, staging=cfg.transfer.staging or cfg.store.path / ".transfers",
            max_bytes=max_bytes, download_cfg=cfg.download, transfer_cfg=cfg.transfer, stop=self.stop_event,
        )
        control = Control(self.models, status=self.status_message, apply_settings=self.apply_settings,
                          fetcher=self.fetcher.fetch, max_bytes=max_bytes)
        verifier = None
        if cfg.commands.trusted_keys:
            from edge_agent.control import command_verifier

            verifier = command_verifier(cfg.commands.trusted_keys, cfg.commands.max_age_s)
        telemetry = TelemetryCollector(disk_path=cfg.store.path, sources=self._source_intervals,
                                       models=self.models.model_stats)
        self.plane = ControlPlane(
            transport=self.transport,
            dispatcher_factory=lambda events: build_dispatcher(
                control, local=False, events=events, max_payload=cfg.commands.max_payload, memory=cfg.commands.memory,
                verifier=verifier,
            ),
            groups=cfg.groups, workers=cfg.commands.workers, telemetry=telemetry,
            interval_s=cfg.mqtt.telemetry_interval_s, spool=spool,
        )
        self.events.append(self.plane.event)
        self.plane.start()

    def _stop_plane(self) -> None:
        if self.plane is not None:
            if self.plane.event in self.events:
                self.events.remove(self.plane.event)
            self.plane.stop()

    def _source_intervals(self) -> dict[str, Any]:
        """Per source, what happened since the previous telemetry message."""
        from dataclasses import replace

        out = {}
        for w in self.workers:
            skipped = w.source.stats()["skipped"]
            delta = skipped - self._skipped_seen.get(w.source.name, 0)
            self._skipped_seen[w.source.name] = skipped
            out[w.source.name] = replace(w.counters.drain(), skipped=delta)
        return out

    def _lock_store(self) -> None:
        if not self.store_lock.acquire():
            raise EdgeAgentError(
                f"model store {self.store.root} is in use by another process (another agent, or an "
                "`edge-agent models` command in progress)",
                code="store_locked",
            )

    def _on_event(self, event: dict[str, Any]) -> None:
        for sink in self.events:
            sink(event)

    def _step(self, name: str, start: Callable[[], None], stop: Callable[[], None]) -> None:
        start()
        self._started.append((name, stop))

    def wait(self, poll_s: float = 0.5) -> None:
        """Block until stop is requested or every source has ended."""
        while not self.stop_event.wait(poll_s):
            if self.workers and all(w.done for w in self.workers):
                log.info("all sources have ended")
                break

    def shutdown(self) -> None:
        """Stop components in reverse start order; safe to call twice."""
        self.stop_event.set()
        while self._started:
            name, stop = self._started.pop()
            try:
                stop()
            except Exception:
                log.exception("stopping %s failed", name)

    def status(self) -> dict[str, Any]:
        return {"models": self.models.status(), "sources": {w.source.name: w.source.stats() for w in self.workers}}

    def status_message(self) -> dict[str, Any]:
        """The object of the status topic (CONTRACT §3)."""
        from edge_agent.comms.commands import status_object

        return status_object("online", self.config.device_id, self.config.groups, self.models.status())

    def apply_settings(self, args: Any) -> dict[str, Any]:  # noqa: C901 - one branch per setting
        """The ``set`` command: change run-time settings of sources."""
        targets = [
            w for w in self.workers if (args.source is not None and w.source.name == args.source)
            or (args.model is not None and w.cfg.model == args.model)
        ]
        if not targets:
            what = f"source {args.source!r}" if args.source else f"model {args.model!r}"
            raise EdgeAgentError(f"no running source matches {what}", code="unknown_source")
        out = {}
        for w in targets:
            if args.fps is not None:
                w.fps = args.fps
            if args.threshold is not None:
                w.threshold = args.threshold
            if args.top_k is not None:
                w.top_k = args.top_k
            if args.results is not None:
                if args.results.enabled is not None:
                    w.results_enabled = args.results.enabled
                if args.results.every is not None:
                    w.results_every = args.results.every
            out[w.source.name] = {
                "fps": w.fps, "threshold": w.threshold, "top_k": w.top_k,
                "results": {"enabled": w.results_enabled, "every": w.results_every},
            }
        return {"sources": out}


class _PlaneResults:
    """Result sink: each result to ``P/D/results/<source>`` through the
    control plane's outbox (so results are kept on disk while the broker is
    away, and replayed in order)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def emit(self, source: str, result: dict[str, Any]) -> None:
        if self.agent.plane is not None:
            self.agent.plane.result(source, result)


def run_agent(config: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT or the sources end; returns the exit code."""
    agent = Agent(config)

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the frame in flight", signal.Signals(signum).name)
        agent.stop_event.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start()
        log.info(
            "edge-agent running as %s: %d model(s), %d source(s)%s",
            config.device_id,
            len(config.models),
            len(agent.workers),
            "" if config.mqtt else " (offline: no [mqtt] section)",
        )
        agent.wait()
        failed = [s.name for s in agent.sources if s.failed]
    finally:
        agent.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        log.error("edge-agent stopped; source(s) that could not be read: %s", ", ".join(failed))
        return 1
    log.info("edge-agent stopped")
    return 0
