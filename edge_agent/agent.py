"""The agent: builds the components from a config, starts them in order,
stops them in reverse, from one list.

Order: model store and manager (models must be loaded before frames flow),
the local APIs (HTTP, gRPC), MQTT transport, then per source its capture thread and its inference worker.
The agent runs until SIGTERM/SIGINT, or until every source has ended (a file
or folder without ``loop``); then each worker finishes the frame in flight,
``stopped`` is published, and ``run`` returns 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edge_agent.config import AgentConfig, SourceConfig
from edge_agent.errors import EdgeAgentError, SourceError
from edge_agent.models.manager import ModelManager
from edge_agent.models.store import ModelStore, StoreLock
from edge_agent.pipeline.batching import Batching
from edge_agent.pipeline.sinks import LogSink, Sink
from edge_agent.pipeline.worker import SourceWorker
from edge_agent.sources import FrameSource, open_source

if TYPE_CHECKING:
    from edge_agent.http.metrics import AgentStats

log = logging.getLogger(__name__)


def _tensor_source(model: str) -> str:
    """Why a source cannot be bound to ``model`` (a config error at start and at a reload)."""
    return (f"{model!r} is a tensor model (task 'tensor'), served over HTTP and gRPC only; a source needs a "
            "classify or detect model")


class Agent:
    """Owns every long-lived component. ``stop_event`` is shared by all."""

    def __init__(self, config: AgentConfig, *, extra_sinks: list[Sink] | None = None,
                 config_file: str = "<config>") -> None:
        from edge_agent.runtimes import limit_malloc_arenas

        limit_malloc_arenas()
        self.config = config
        self.stop_event = threading.Event()
        self.store = ModelStore.from_config(config.store)
        self.store_lock = StoreLock(config.store.path)
        self.events: list[Callable[[dict[str, Any]], None]] = []
        self.models = ModelManager(
            self.store, config.models, trusted_keys=config.store.trusted_keys, on_event=self._on_event
        )
        self.config_file = config_file  # named in a config error found at start
        self.models.framed = lambda: {s.model for s in self.config.sources}
        # Results go to the MQTT plane's outbox whenever one runs (an
        # [mqtt] section added by a reload starts publishing at once).
        # One batching point per model with batch_size > 1 (models change at a restart only).
        self.batching = Batching(self.models, config.models)
        # The serving core HTTP and gRPC requests go through; with [batching]
        # enabled it merges concurrent requests (its batcher is replaced by a reload).
        from edge_agent.serving.batching import request_batcher
        from edge_agent.serving.predict import Predictor

        self.predictor = Predictor(self.models, batcher=request_batcher(config.batching))
        # The per-result log line only for sources with `log_results` (a
        # frozenset replaced whole by a reload, read without a lock).
        self._logged_sources = frozenset(s.name for s in config.sources if s.log_results)
        self.sinks: list[Sink] = [
            LogSink(enabled=lambda name: name in self._logged_sources),
            *(extra_sinks or []),
            _PlaneResults(self),
        ]
        self.transport: Any = None
        self.plane: Any = None
        self.journal: Any = None  # the command journal: opened with the first MQTT plane, kept across reloads
        self._skipped_seen: dict[str, int] = {}
        from edge_agent.comms.handlers import CommandHandlers, build_dispatcher
        from edge_agent.comms.local import LocalSocketServer

        self.handlers = CommandHandlers(self.models, status=self.status_message, apply_settings=self.apply_settings)
        self.local_dispatcher = build_dispatcher(self.handlers, local=True, events=self._on_event)
        self.local_server = LocalSocketServer(config.store.socket_path, self.local_dispatcher.handle)
        # Replaced (never mutated) when a source starts or stops, so readers
        # in other threads (telemetry, HTTP, the watchdog) iterate a snapshot.
        self.sources: list[FrameSource] = []
        self.workers: list[SourceWorker] = []
        self.lingering: list[SourceWorker] = []  # stopped by a reload, threads not ended
        self.http: Any = None
        self.grpc: Any = None
        self._metrics: Any = None  # the Prometheus metrics HTTP and gRPC count in (made when either starts)
        self._started: list[tuple[str, Callable[[], None]]] = []

    def start(self) -> None:
        """Start everything; on failure, stop what was started and re-raise."""
        try:
            self._step("store lock", self._lock_store, self.store_lock.release)
            self._step("models", self._start_models, self.models.stop)
            self._step("control socket", self.local_server.start, self.local_server.stop)
            self._step("http", self._start_http, self._stop_http)
            self._step("grpc", self._start_grpc, self._stop_grpc)
            self._step("mqtt", self._start_mqtt, self._stop_mqtt)
            self._step("sources", self._start_sources, self._stop_sources)
        except BaseException:
            self.shutdown()
            raise
        if self.config.sources and not self.workers:
            self.shutdown()
            raise EdgeAgentError("no source could be started (see the errors above)", code="no_sources")
        if self.config.mqtt is None and self.config.sources and not self._logged_sources:
            log.warning("offline (no [mqtt]) and no source has log_results = true: results are not written anywhere")

    def _start_models(self) -> None:
        """Load the models; a tensor model that a source is bound to is a
        config error naming the file and the source's ``model`` key."""
        from edge_agent.errors import ConfigError, TaskMismatch

        try:
            self.models.start()
        except TaskMismatch as exc:
            name = exc.model
            raise ConfigError([
                f"{self.config_file}: sources[{i}] ({s.name}).model: {_tensor_source(s.model)}"
                for i, s in enumerate(self.config.sources) if s.model == name
            ] or [str(exc)]) from None

    # -- components that a reload may replace -------------------------------

    def _start_sources(self) -> None:
        for cfg in self.config.sources:
            self._start_source(cfg)

    def _start_source(self, cfg: SourceConfig) -> None:
        """Open and start one source and its worker; a source that cannot
        be built is logged and left out (the others run)."""
        try:
            source = open_source(cfg)
        except SourceError as exc:
            log.error("%s", exc)
            return
        worker = SourceWorker(source, self.models, self.sinks, threading.Event(), events=self._on_event,
                              batching=self.batching)
        worker.check_labels()  # an allow-list label the model lacks: said at start, not at the first frame
        source.start()
        worker.start()
        self.sources = [*self.sources, source]
        self.workers = [*self.workers, worker]

    def _stop_source(self, worker: SourceWorker) -> None:
        self.workers = [w for w in self.workers if w is not worker]
        self.sources = [s for s in self.sources if s is not worker.source]
        self._skipped_seen.pop(worker.source.name, None)  # a restarted source counts from 0 again
        worker.stop_event.set()
        worker.source.stop()
        worker.join(timeout=10.0)
        if not worker.done or worker.source.capture_alive:
            # stuck in a read or an inference: still the watchdog's business
            log.error("source %s: its threads did not stop; the watchdog keeps watching them", worker.source.name)
            self.lingering = [*self.lingering, worker]

    def _tensor_models(self) -> set[str]:
        """The served models whose serving version is a tensor model."""
        out = set()
        for m in self.config.models:
            try:
                with self.models.acquire(m.name) as model:
                    if model.manifest.task == "tensor":
                        out.add(m.name)
            except EdgeAgentError:
                continue
        return out

    def _stop_sources(self) -> None:
        for worker in reversed(self.workers):
            self._stop_source(worker)

    def _start_http(self, cfg: Any = None) -> None:
        cfg = cfg or self.config.http
        if not cfg.enabled:
            return
        from edge_agent.http.api import Api
        from edge_agent.http.server import HttpServer

        api = Api(self.models, ready=self.readiness, stats=self._http_stats, predictor=self.predictor,
                  metrics=self.metrics())
        http = HttpServer(api.handle, cfg.host, cfg.port, max_body_bytes=int(cfg.max_body_mb * 1e6),
                          idle_timeout_s=cfg.idle_timeout_s)
        http.start()
        self.http = http

    def metrics(self) -> Any:
        """The agent's Prometheus metrics (edge_agent.http.metrics.Metrics), one
        for HTTP and gRPC, kept across their restarts; ``/metrics`` serves it."""
        if self._metrics is None:
            from edge_agent.http.metrics import Metrics

            self._metrics = Metrics(self.models, self._http_stats)
        return self._metrics

    def _stop_http(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            http.stop()

    def _start_grpc(self, cfg: Any = None) -> None:
        """TF Serving's gRPC API; grpcio is imported here only, when enabled."""
        cfg = cfg or self.config.grpc
        if not cfg.enabled:
            return
        from edge_agent.grpc.server import GrpcServer

        server = GrpcServer(self.predictor, cfg.host, cfg.port, max_message_bytes=int(cfg.max_message_mb * 1e6),
                            workers=cfg.workers, tls=cfg.tls, observe=self.metrics().observe_grpc)
        server.start()
        self.grpc = server

    def _stop_grpc(self) -> None:
        server, self.grpc = self.grpc, None
        if server is not None:
            server.stop()

    def _start_mqtt(self) -> None:
        if self.config.mqtt is None:
            return
        transport, plane, handlers = self._build_mqtt(self.config)
        self.fetcher.sweep()  # at start only: at a reload, transfers may be in flight
        self._run_mqtt(transport, plane)
        # Commands a crash cut short: answered once, through the outbox
        # (spooled until connected); replies it cut short: sent again. Only
        # at start: at a reload, what the journal holds as running is still
        # running, and the replies in flight are still in flight.
        plane.dispatcher.recover(handlers.recover, plane.send_reply)

    def _run_mqtt(self, transport: Any, plane: Any, pending: list[tuple[str, bytes]] = ()) -> None:
        """Start a built transport and plane (the plane's subscriptions and
        hooks in place before the first connect); ``pending``: commands a
        replaced plane had taken but not started, handed over."""
        self.transport, self.plane = transport, plane
        self.events.append(plane.event)
        try:
            plane.start()
            for topic, payload in pending:
                plane.take(topic, payload)
            transport.start()
        except BaseException:
            self._stop_mqtt()
            raise

    def _stop_mqtt(self, successor: Any = None) -> list[tuple[str, bytes]]:
        """Disconnect and stop the plane; returns the commands it had taken
        but not started. With ``successor`` (a reload), replies and events
        of commands still running go out through it."""
        transport, plane = self.transport, self.plane
        self.transport = self.plane = None
        if transport is not None:
            transport.stop()
        if plane is None:
            return []
        if plane.event in self.events:
            self.events.remove(plane.event)
        return plane.stop(successor=successor)

    def _build_mqtt(self, cfg: AgentConfig) -> tuple[Any, Any, Any]:
        """The transport, MQTT plane and command handlers for ``cfg``, built but not
        started: whatever they read (TLS files, trusted keys, the spool)
        fails here, before a running connection is given up."""
        from edge_agent.comms.mqtt import MqttTransport
        from edge_agent.comms.handlers import CommandHandlers, build_dispatcher
        from edge_agent.comms.plane import BundleFetcher, MqttPlane
        from edge_agent.telemetry import TelemetryCollector

        assert cfg.mqtt is not None
        transport = MqttTransport(cfg.mqtt, cfg.device_id, status_provider=self.models.status, groups=cfg.groups)
        verifier = None
        if cfg.commands.trusted_keys:
            from edge_agent.comms.handlers import command_verifier

            verifier = command_verifier(cfg.commands.trusted_keys, cfg.commands.max_age_s)
        spool = None
        if cfg.spool.enabled:
            from edge_agent.comms.spool import Spool

            spool = Spool(cfg.spool.path or cfg.store.path / ".spool.db", max_bytes=cfg.spool.max_bytes)
        max_bytes = int(cfg.store.max_bundle_mb * 1e6)
        self.fetcher = BundleFetcher(
            transport=transport, staging=cfg.transfer.staging or cfg.store.path / ".transfers",
            max_bytes=max_bytes, download_cfg=cfg.download, transfer_cfg=cfg.transfer, stop=self.stop_event,
        )
        handlers = CommandHandlers(self.models, status=self.status_message, apply_settings=self.apply_settings,
                                   fetcher=self.fetcher.fetch, max_bytes=max_bytes)
        telemetry = TelemetryCollector(disk_path=cfg.store.path, sources=self._source_intervals,
                                       models=self.models.model_stats)
        journal = self._command_journal(cfg)
        plane = MqttPlane(
            transport=transport,
            dispatcher_factory=lambda events: build_dispatcher(
                handlers, local=False, events=events, max_payload=cfg.commands.max_payload, memory=cfg.commands.memory,
                verifier=verifier, journal=journal,
            ),
            groups=cfg.groups, workers=cfg.commands.workers, telemetry=telemetry,
            interval_s=cfg.mqtt.telemetry_interval_s, spool=spool, max_waiting=cfg.commands.max_waiting,
            max_payload=cfg.commands.max_payload,
        )
        return transport, plane, handlers

    def _command_journal(self, cfg: AgentConfig) -> Any:
        """The command journal in the store (one per process; see edge_agent.comms.journal)."""
        from edge_agent.comms.journal import JOURNAL_NAME, CommandJournal

        c = cfg.commands
        if self.journal is None:
            self.journal = CommandJournal(self.config.store.path / JOURNAL_NAME, keep=c.memory, max_age_s=c.max_age_s)
        else:
            self.journal.configure(keep=c.memory, max_age_s=c.max_age_s)
        return self.journal

    # -- reload (SIGHUP) -----------------------------------------------------

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply a re-read config without unloading models; returns one line
        per change made.

        Applied at once: sources (added, removed, restarted when their input
        changed; ``fps``, ``threshold``, ``top_k`` and the detection keys
        (``labels``, ``thresholds``, ``min_box_area``, ``track``, ``zones``,
        ``events``) changed on the running worker, its tracks kept), the MQTT connection and everything riding on it (``mqtt``,
        ``groups``, ``commands``, ``spool``, ``download``, ``transfer``),
        ``http``, ``grpc``, ``batching`` and the log level. ``device_id``, ``store`` and ``models``
        take effect at the next start (logged). Raises ConfigError, changing
        nothing, when a source names a model this agent does not serve.
        """
        from edge_agent.errors import ConfigError

        old = self.config
        served = {m.name for m in old.models}
        problems = [f"sources ({s.name}).model: {s.model!r} is not served by the running agent (models change "
                    "at the next restart)" for s in new.sources if s.model not in served]
        tensor = self._tensor_models()
        problems += [f"sources ({s.name}).model: {_tensor_source(s.model)}" for s in new.sources if s.model in tensor]
        if problems:
            raise ConfigError(problems)
        changes = []
        later = [key for key in ("device_id", "store", "models", "logging") if getattr(old, key) != getattr(new, key)]
        if later:
            log.warning("reload: %s changed; that takes effect when the agent restarts", ", ".join(later))
        plane_keys = ("mqtt", "groups", "commands", "spool")
        rebuild = any(getattr(old, k) != getattr(new, k) for k in plane_keys)
        built = None
        if rebuild and new.mqtt is not None:
            try:  # everything the new connection reads, read before the running one is given up
                built = self._build_mqtt(new)
            except Exception as exc:
                raise ConfigError([f"mqtt: cannot use the new settings: {exc}"]) from None
        for key, start, stop in (("http", self._start_http, self._stop_http),
                                 ("grpc", self._start_grpc, self._stop_grpc)):
            was, cfg = getattr(old, key), getattr(new, key)
            if was == cfg:
                continue
            stop()
            try:
                start(cfg)
            except Exception as exc:
                start(was)  # the running one comes back
                if built is not None:
                    built[1].close()
                raise ConfigError([f"{key}: cannot serve on {cfg.host}:{cfg.port}: {exc}"]) from None
            changes.append(f"{key} restarted" if cfg.enabled else f"{key} off")
        if old.batching != new.batching:
            from edge_agent.serving.batching import request_batcher

            self.predictor.batcher = request_batcher(new.batching)  # requests in flight finish on the old one
            changes.append("batching " + ("on" if new.batching.enabled else "off"))
        if old.log_level != new.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
            changes.append(f"log_level {new.log_level}")
        if rebuild:
            pending = self._stop_mqtt(successor=built[1] if built else None)
            if built is not None:
                self._run_mqtt(built[0], built[1], pending)
                changes.append("mqtt reconnected")
            else:
                if pending:
                    log.warning("reload: [mqtt] removed: %d command(s) taken but not started are dropped", len(pending))
                changes.append("mqtt off")
        elif self.plane is not None and (old.download != new.download or old.transfer != new.transfer):
            self.fetcher.download_cfg, self.fetcher.transfer_cfg = new.download, new.transfer
            changes.append("download/transfer settings")
        self.config = new
        changes += self._reload_sources(new.sources)
        return changes

    def _reload_sources(self, wanted: list[SourceConfig]) -> list[str]:
        live_keys = {"fps", "threshold", "top_k", "log_results", "labels", "thresholds", "min_box_area", "track",
                     "zones", "events"}
        self._logged_sources = frozenset(c.name for c in wanted if c.log_results)
        changes = []
        running = {w.source.name: w for w in self.workers}
        names = {c.name for c in wanted}
        for name, worker in running.items():
            if name not in names:
                self._stop_source(worker)
                changes.append(f"source {name} removed")
        for cfg in wanted:
            worker = running.get(cfg.name)
            if worker is None:
                self._start_source(cfg)
                changes.append(f"source {cfg.name} added")
                continue
            old = worker.cfg
            if old == cfg:
                continue
            differ = {k for k in type(cfg).model_fields if getattr(old, k) != getattr(cfg, k)}
            if differ <= live_keys:
                worker.apply_config(cfg)
                worker.check_labels()
                changes.append(f"source {cfg.name}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in sorted(differ)))
            else:
                self._stop_source(worker)
                self._start_source(cfg)
                changes.append(f"source {cfg.name} restarted ({', '.join(sorted(differ))} changed)")
        return changes

    def _source_intervals(self) -> dict[str, Any]:
        """Per source, what happened since the previous telemetry message."""
        from dataclasses import replace

        out = {}
        for w in self.workers:
            skipped = w.source.stats()["skipped"]
            delta = skipped - self._skipped_seen.get(w.source.name, 0)
            self._skipped_seen[w.source.name] = skipped
            out[w.source.name] = replace(w.counters.drain(), skipped=delta, zones=w.detection.counts())
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

    def wait(self, poll_s: float = 0.5, interrupt: threading.Event | None = None) -> None:
        """Block until stop is requested, every source has ended, or
        ``interrupt`` is set (checked every ``poll_s``)."""
        while not self.stop_event.wait(poll_s):
            if interrupt is not None and interrupt.is_set():
                break
            workers = self.workers
            if workers and all(w.done for w in workers):
                log.info("all sources have ended")
                break

    def wait_opened(self, timeout: float) -> list[str]:
        """Wait until every source has tried its first open; returns the
        names of those still opening when ``timeout`` ran out."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [s.name for s in self.sources if s.state == "starting"]
            if not pending or self.stop_event.wait(min(0.05, max(0.0, deadline - time.monotonic()))) \
                    or time.monotonic() >= deadline:
                return pending

    def status_line(self, rates: dict[str, float]) -> str:
        """One line for ``systemctl status``: model versions, fps per
        source (or its state), the broker."""
        # Once a second: the serving versions only (status() lists the store's folders and copies the state)
        names = [m.name for m in self.config.models]
        parts = [", ".join(f"{n} v{self.models.active_version(n)}" for n in names) or "no models"]
        srcs = []
        for w in self.workers:
            state = w.source.state
            if w.done:
                state = "ended"
            srcs.append(f"{w.source.name} {rates.get(w.source.name, 0.0):.1f} fps" if state == "open"
                        else f"{w.source.name} {state}")
        parts.append(", ".join(srcs) or "no sources")
        if self.transport is not None:
            parts.append("broker " + ("connected" if self.transport.connected.is_set() else "disconnected"))
        return " | ".join(parts)

    def shutdown(self) -> None:
        """Stop components in reverse start order; safe to call twice."""
        self.stop_event.set()
        while self._started:
            name, stop = self._started.pop()
            try:
                stop()
            except Exception:
                log.exception("stopping %s failed", name)
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready (``/readyz``) when every configured model has a loaded
        version and every configured source runs (started, not failed, not
        ended); otherwise the problems, one line each."""
        problems = [f"model {name}: no version loaded"
                    for name, stats in self.models.model_stats().items() if stats["version"] is None]
        workers = {w.source.name: w for w in self.workers}
        for cfg in self.config.sources:
            worker = workers.get(cfg.name)
            if worker is None:
                problems.append(f"source {cfg.name}: not started")
            elif worker.source.failed:
                problems.append(f"source {cfg.name}: could not be opened ({worker.source.last_error})")
            elif worker.done:
                problems.append(f"source {cfg.name}: ended")
        return not problems, problems

    def _http_stats(self) -> "AgentStats":
        """What the HTTP API's ``/metrics`` reads of the agent at a scrape."""
        from edge_agent.http.metrics import AgentStats, SourceStats

        sources = []
        for w in self.workers:
            stats = w.source.stats()
            sources.append(SourceStats(name=w.source.name, frames=w.counters.frames, errors=w.counters.errors,
                                       captured=stats["captured"], skipped=stats["skipped"],
                                       up=not (w.done or w.source.failed)))
        transport = self.transport
        return AgentStats(device_id=self.config.device_id, sources=sources,
                          mqtt_connected=None if transport is None else transport.connected.is_set())

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
        changes: dict[str, Any] = {
            k: v for k, v in (("fps", args.fps), ("threshold", args.threshold), ("top_k", args.top_k)) if v is not None
        }
        if args.results is not None:
            if args.results.enabled is not None:
                changes["results_enabled"] = args.results.enabled
            if args.results.every is not None:
                changes["results_every"] = args.results.every
        for w in targets:
            s = w.update(**changes)  # together: no frame sees half of one command
            out[w.source.name] = {
                "fps": s.fps, "threshold": s.threshold, "top_k": s.top_k,
                "results": {"enabled": s.results_enabled, "every": s.results_every},
            }
        return {"sources": out}


class _PlaneResults:
    """Result sink: each result to ``P/D/results/<source>`` through the
    MQTT plane's outbox (so results are kept on disk while the broker is
    away, and replayed in order)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def emit(self, source: str, result: dict[str, Any]) -> None:
        plane = self.agent.plane  # read once: a reload may replace it meanwhile
        if plane is not None:
            plane.result(source, result)


def run_agent(config: AgentConfig, config_path: Path | str | None = None) -> int:
    """Run until SIGTERM/SIGINT or the sources end; returns the exit code.

    SIGHUP re-reads ``config_path`` and applies it (:meth:`Agent.reload`);
    an invalid file is refused with every problem logged. Under systemd the
    notify protocol and the watchdog run (:mod:`edge_agent.service`).
    """
    from edge_agent.service import Notifier, RateMeter, StartupExtender, Supervisor

    agent = Agent(config, config_file=str(config_path) if config_path is not None else "<config>")
    notifier = Notifier()
    hangup = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the frame in flight", signal.Signals(signum).name)
        agent.stop_event.set()

    def _on_hup(_signum: int, _frame: Any) -> None:
        hangup.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _on_hup)
    meter = RateMeter()
    supervisor = Supervisor(
        agent, notifier, stall_s=config.watchdog.stall_s,
        status_line=lambda: agent.status_line(meter.rates((w.source.name, w.counters.frames) for w in agent.workers)),
    )
    try:
        with StartupExtender(notifier):
            agent.start()
            pending = agent.wait_opened(timeout=max([s.stall_timeout_s for s in config.sources], default=0) + 5)
        log.info(
            "edge-agent running as %s: %d model(s), %d source(s)%s",
            config.device_id,
            len(config.models),
            len(agent.workers),
            "" if config.mqtt else " (offline: no [mqtt] section)",
        )
        if pending:
            log.warning("ready while still opening: %s", ", ".join(pending))
        supervisor.start()
        notifier.ready(agent.status_line({}))
        while True:
            agent.wait(interrupt=hangup)
            if not hangup.is_set():
                break
            hangup.clear()
            _reload(agent, config_path, notifier)
            supervisor.stall_s = agent.config.watchdog.stall_s
        failed = [s.name for s in agent.sources if s.failed]
    finally:
        notifier.stopping()
        supervisor.stop()
        agent.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        notifier.close()
    if failed:
        log.error("edge-agent stopped; source(s) that could not be read: %s", ", ".join(failed))
        return 1
    log.info("edge-agent stopped")
    return 0


def _reload(agent: Agent, config_path: Path | str | None, notifier: Any) -> None:
    """SIGHUP: re-read the config and apply it, or keep the running one."""
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError

    if config_path is None:
        log.warning("SIGHUP: no config file to re-read; nothing changed")
        return
    notifier.reloading()
    try:
        new = load_config(config_path)
        changes = agent.reload(new)
    except ConfigError as exc:
        log.error("reload refused, the running config stays: %d problem(s)", len(exc.problems))
        for problem in exc.problems:
            log.error("reload: %s", problem)
    except Exception:
        log.exception("reload failed; what was applied before the failure stays")
    else:
        log.info("reloaded %s: %s", config_path, "; ".join(changes) or "nothing changed")
    finally:
        notifier.ready()
