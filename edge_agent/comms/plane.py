"""The MQTT plane of a running agent (:class:`MqttPlane`): commands in,
replies, events, telemetry and results out, with store-and-forward while the
broker is away.

Parts, each from its own module: the transport (:mod:`.mqtt`) knows
connections, the topic tree (:mod:`.topics`) the topics; the dispatcher
(:mod:`.dispatcher`) turns a payload into one reply; the command handlers
(:mod:`.handlers`) do the work; the spool
(:mod:`.spool`) keeps messages on disk; downloads (:mod:`.download`) and MQTT
transfers (:mod:`.transfer`) bring bundles. This module wires them:

* commands arrive on ``P/D/cmd``, ``P/groups/<g>/cmd`` and ``P/all/cmd``
  (QoS 1, persistent session) and are executed by ``commands.workers``
  threads, never on paho's network thread; each reply goes to ``P/D/reply``;
* :class:`Outbox` publishes results, events, replies and telemetry; while
  the broker is unreachable (or older messages are still being replayed)
  they go to the spool, and after a reconnect they are replayed in order
  before anything new, so a subscriber sees them in sequence;
* telemetry every ``mqtt.telemetry_interval_s``; the retained status again
  whenever a model changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from edge_agent.comms.dispatcher import error_reply, readable_id
from edge_agent.comms.mqtt import MqttTransport, PahoHandle
from edge_agent.comms.topics import results_suffix
from edge_agent.errors import EdgeAgentError, SpoolError

log = logging.getLogger(__name__)

STATUS_EVENTS = {"activated", "rolled_back", "removed", "label_set", "probation_passed", "load_failed"}


class Outbox:
    """Publishes JSON messages under ``P/D/``, through the spool when needed.

    Everything goes out through the transport
    (:meth:`MqttTransport.publish_bytes`, :meth:`MqttTransport.when_acknowledged`),
    never around it.

    Thread-safety: :meth:`send` may be called from any thread.
    """

    def __init__(self, transport: MqttTransport, spool: Any | None) -> None:
        self.transport = transport
        self.spool = spool
        self._lock = threading.Lock()
        self._backlog = bool(spool is not None and len(spool))
        self._replaying = False
        self._stop = threading.Event()
        self._lost = 0
        self._lost_logged = -60.0
        self._failures = 0  # drains in a row that ended in an error

    retry_s = 0.05
    """Pause of a drain that could not hand paho everything (its queue full)."""
    batch = 50
    """Spooled messages handed to paho at once by a drain."""

    def send(self, kind: str, suffix: str, payload: dict[str, Any], *, qos: int = 1,
             delivered: Callable[[], None] | None = None) -> None:
        """Publish ``payload`` on ``P/D/<suffix>``. ``delivered()``, when
        given, is called once the message is safe from this process dying:
        the broker acknowledged it (QoS 1), or it is in the spool on disk
        (it is then replayed, after a restart too). It may be called on this
        thread or on paho's; not at all when the message is lost."""
        topic = self.transport.topic(suffix)
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        with self._lock:
            if self.spool is not None and (self._backlog or not self.transport.connected.is_set()):
                kept = self._spool(kind, topic, data, qos)
                drain = self.transport.connected.is_set()
            else:
                drain = None
        if drain is not None:
            if kept and delivered is not None:
                delivered()
            if drain:
                self.drain()  # connected but backed up: the backlog drains now, not at the next reconnect
            return
        info = self.transport.publish_bytes(topic, data, qos=qos)
        if info.rc == 0 or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
            # sent, or (QoS 1, connection just lost) kept by paho and sent after reconnecting
            if delivered is not None and qos > 0:
                self.transport.when_acknowledged(info, delivered)
            return
        # QoS 0 without a connection, or paho's queue full (a burst faster
        # than the broker acknowledges): keep it here, in order, and drain.
        if self.spool is not None:
            with self._lock:
                kept = self._spool(kind, topic, data, qos)
            if kept and delivered is not None:
                delivered()
            self.drain()
        else:
            log.warning("MQTT: a %s message could not be sent (%s) and there is no spool", kind, info.rc)

    def _spool(self, kind: str, topic: str, data: bytes, qos: int) -> bool:
        """Keep a message in the spool (the caller holds the lock); False
        when the spool could not keep it (counted and logged)."""
        try:
            self.spool.put(topic, data, qos=max(qos, 1) if kind != "results" else qos, kind=kind)
            self._backlog = True
            return True
        except SpoolError as exc:
            # Counted by the spool (telemetry's spool_dropped); logged at most
            # once a minute, as a line per lost frame would fill the very disk.
            self._lost += 1
            now = time.monotonic()
            if now - self._lost_logged >= 60.0:
                log.error("store-and-forward: cannot keep a %s message: %s (%d lost since the last such line)",
                          kind, exc, self._lost)
                self._lost, self._lost_logged = 0, now
            return False

    def on_connected(self) -> None:
        """After a (re)connect: replay what was spooled."""
        self.drain()

    def drain(self) -> None:
        """Publish what was spooled, oldest first, on a thread of its own
        (paho's must go on), unless a drain already runs. Whatever is sent
        meanwhile joins the spool behind it, so the order holds; once the
        spool is empty, messages go straight to paho again."""
        if self.spool is None or self._stop.is_set():
            return
        with self._lock:
            if self._replaying or not self._backlog:
                return
            self._replaying = True
        threading.Thread(target=self._replay, name="spool-replay", daemon=True).start()

    def _publish_batch(self, items: list[Any]) -> list[int]:
        """Hand ``items`` to paho together (its in-flight window fills, one
        round trip for the lot), then wait for each acknowledgement; returns
        the seqs published, oldest first, up to the first that was not."""
        handles = []
        for item in items:
            if not self.transport.connected.is_set() or self._stop.is_set():
                break
            info = self.transport.publish_bytes(item.topic, item.payload, qos=item.qos, retain=item.retain)
            if info.rc != 0:
                break  # paho's queue is full, or the connection just went
            handles.append((item, info))
        done = []
        for item, info in handles:
            if item.qos and not PahoHandle(info).wait(10.0):
                break
            done.append(item.seq)
        return done

    def _replay(self) -> None:
        total = 0
        failed = False
        try:
            while True:
                items = self.spool.peek(self.batch)
                done = self._publish_batch(items) if items else []
                if done:
                    self.spool.ack(done)  # one transaction for the batch
                    total += len(done)
                with self._lock:
                    if len(self.spool) == 0:
                        self._backlog = False
                        break
                if not self.transport.connected.is_set() or self._stop.is_set():
                    break
                if len(done) < len(items) and self._stop.wait(self.retry_s):
                    break  # paho's queue is still full: give the broker's acknowledgements a moment
        except Exception:
            failed = True
            log.exception("store-and-forward: replay failed")
        finally:
            with self._lock:
                self._replaying = False
            if total:
                log.info("store-and-forward: replayed %d message(s) kept while the broker was away", total)
        self._failures = self._failures + 1 if failed else 0
        if self._failures and self._stop.wait(min(30.0, 0.5 * 2 ** (self._failures - 1))):
            return  # a spool that keeps failing (a bad SD card) is retried with back-off, not in a hot loop
        # Whatever arrived in the spool while we decided may need another pass.
        if self.transport.connected.is_set() and not self._stop.is_set():
            with self._lock:
                again = self._backlog and not self._replaying
            if again:
                self.drain()

    def stop(self) -> None:
        self._stop.set()


class MqttPlane:
    """Commands, events, telemetry and store-and-forward for one agent."""

    def __init__(
        self,
        *,
        transport: MqttTransport,
        dispatcher_factory: Callable[[Callable[[dict[str, Any]], None]], Any],
        groups: list[str],
        workers: int,
        telemetry: Any | None,
        interval_s: float,
        spool: Any | None,
        max_waiting: int = 256,
        max_payload: int = 256 * 1024,
    ) -> None:
        self.transport = transport
        self.outbox = Outbox(transport, spool)
        self.dispatcher = dispatcher_factory(self.event)
        self.telemetry = telemetry
        self.interval_s = interval_s
        self.max_payload = max_payload
        # Bounded: a flood beyond what the workers can take is answered
        # `busy` (or shed, counted, when no id can be read) instead of
        # growing memory and delaying every later command.
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=max_waiting)
        self._shed_lock = threading.Lock()
        self.shed = {"busy": 0, "unreadable": 0}
        """Commands refused because too many were waiting, since the start."""
        self._shed_logged = 0.0
        self.successor: MqttPlane | None = None
        """Set when a reload replaced this plane: late replies and events go there."""
        self._workers = [threading.Thread(target=self._work, name=f"command-{i}", daemon=True) for i in range(workers)]
        self._stop = threading.Event()
        self._telemetry_thread = threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True)
        self.command_topics = transport.topics.command_topics(groups)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for topic in self.command_topics:
            self.transport.subscribe(topic, self._on_command)
        self.transport.on_connected.append(self.outbox.on_connected)
        for w in self._workers:
            w.start()
        if self.telemetry is not None:
            self._telemetry_thread.start()
        if self.transport.connected.is_set():
            self.outbox.on_connected()

    def stop(self, successor: "MqttPlane | None" = None) -> list[tuple[str, bytes]]:
        """Stop; returns the commands taken but not started (the broker was
        told they arrived, so a successor must run them: see :meth:`take`).

        With ``successor`` (a reload), the replies and events of commands
        still running here go out through it when they end; without, a
        command still running is answered through this plane's outbox while
        it can."""
        self.successor = successor
        self._stop.set()
        self.outbox.stop()
        pending = []
        while True:  # what still waits is not run here: make room for the workers' end marks
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item)
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=5.0)
        if self._telemetry_thread.is_alive():
            self._telemetry_thread.join(timeout=5.0)
        self.close()
        return pending

    def close(self) -> None:
        """Release the spool (also of a plane built but never started)."""
        if self.outbox.spool is not None:
            self.outbox.spool.close()

    def take(self, topic: str, payload: bytes) -> None:
        """A command received elsewhere (handed over from a replaced plane)."""
        self._on_command(topic, payload)

    # -- commands ----------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes) -> None:
        """On paho's thread: hand over and return, never block."""
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self._refuse_busy(topic, payload)

    def _refuse_busy(self, topic: str, payload: bytes) -> None:
        """More commands are waiting than the agent can take: answer this
        one ``busy`` (it was not run; sending it again later is safe), or,
        when no id can be read from it, shed it. Both are counted
        (``commands_shed`` in telemetry) and logged at most once a second."""
        cmd_id = readable_id(payload, self.max_payload)
        with self._shed_lock:
            self.shed["busy" if cmd_id is not None else "unreadable"] += 1
            counts = dict(self.shed)
            now = time.monotonic()
            say = now - self._shed_logged >= 1.0
            if say:
                self._shed_logged = now
        if say:
            log.warning("commands arrive faster than they can be run (%d waiting): %d refused as busy, %d unreadable "
                        "shed so far", self._queue.maxsize, counts["busy"], counts["unreadable"])
        if cmd_id is not None:
            self.send_reply(error_reply(cmd_id, "busy", f"{self._queue.maxsize} commands are already waiting; this one "
                                    "was not run: send it again later"))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            reply = self.dispatcher.handle(payload, topic, later=self.send_reply)
            if reply is not None:  # None: a repeat of a running command, answered when it ends
                self.send_reply(reply)

    def send_reply(self, reply: dict[str, Any]) -> None:
        """Send a command's reply on ``P/D/reply`` (through the successor
        after a reload); a journaled one is marked delivered once the broker
        acknowledged it or the spool kept it, else it is sent again after a
        crash (:meth:`Dispatcher.recover`)."""
        if self.successor is not None:
            self.successor.send_reply(reply)
            return
        cmd_id = reply.get("id")
        self.outbox.send("replies", "reply", reply, qos=1,
                         delivered=None if cmd_id is None else lambda: self.dispatcher.delivered(cmd_id))

    # -- events, results, telemetry ------------------------------------------

    def event(self, message: dict[str, Any]) -> None:
        """A lifecycle or command event: to ``P/D/events``; a model change
        also re-publishes the retained status."""
        if self.successor is not None:
            self.successor.event(message)
            return
        message.setdefault("id", None)
        self.outbox.send("events", "events", message, qos=1)
        if message.get("event") in STATUS_EVENTS:
            self.transport.publish_status()

    def result(self, source: str, result: dict[str, Any]) -> None:
        self.outbox.send("results", results_suffix(source), result, qos=self.transport.cfg.results_qos)

    def _telemetry_loop(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            message = self.telemetry.collect()
            if self.outbox.spool is not None:
                dropped = self.outbox.spool.dropped()
                if any(dropped.values()):  # CONTRACT extension: only when something was lost
                    message["spool_dropped"] = dropped
            with self._shed_lock:
                if any(self.shed.values()):  # likewise: only once a command was refused for want of room
                    message["commands_shed"] = dict(self.shed)
            self.outbox.send("telemetry", "telemetry", message, qos=1)


class BundleFetcher:
    """Brings a deploy's bundle to local disk: by http(s) download (resumable)
    or by MQTT transfer. ``file://`` URLs need no fetching."""

    def __init__(self, *, transport: MqttTransport, staging: Path, max_bytes: int, download_cfg: Any,
                 transfer_cfg: Any, stop: threading.Event) -> None:
        self.transport = transport
        self.staging = Path(staging)
        self.max_bytes = max_bytes
        self.download_cfg = download_cfg
        self.transfer_cfg = transfer_cfg
        self.stop = stop

    def sweep(self, *, keep: int = 2, max_age_s: float | None = None) -> int:
        """Remove what interrupted deploys left in ``staging``: partial
        downloads and transfers a crash cut short (the next deploy's
        transfer has another id, so nothing else would). The ``keep`` most
        recently written folders stay, if written within ``max_age_s``
        (default ``transfer.deadline_s``): a console that sends the same
        deploy again resumes them. Call at start, with the store lock held.
        Returns the bytes removed."""
        import shutil

        max_age_s = self.transfer_cfg.deadline_s if max_age_s is None else max_age_s
        try:
            folders = [p for p in self.staging.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot look for leftovers of interrupted deploys in %s: %s", self.staging, exc)
            return 0

        from edge_agent.models.store import dir_size

        newest = {f: max([f.stat().st_mtime, *(x.stat().st_mtime for x in f.rglob("*"))]) for f in folders}
        now = time.time()
        ranked = sorted(folders, key=newest.__getitem__, reverse=True)
        stale = [f for i, f in enumerate(ranked) if i >= keep or now - newest[f] > max_age_s]
        removed = 0
        for folder in stale:
            removed += dir_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
        if stale:
            log.info("removed %d folder(s), %.1f MB, of deploys interrupted before they were installed (%s)",
                     len(stale), removed / 1e6, self.staging)
        return removed

    def fetch(self, args: Any, progress: Callable[..., None]) -> Path:
        """The verified bundle under ``staging`` (``download()`` and
        ``TransferReceiver.start()`` create the folders, with coded errors)."""
        if args.transfer is not None:
            return self._transfer(args, progress)
        from edge_agent.bundles import is_archive
        from edge_agent.comms.download import download

        name = Path(urllib.parse.urlparse(args.url).path).name
        if not is_archive(Path(name)):
            name = "bundle.tar.gz"
        dest = self.staging / f"{args.model}-{args.version}-{args.sha256[:12]}" / name
        throttled = _throttle(lambda got, total: progress("fetching", received=got, total=total))
        d = self.download_cfg
        try:
            return download(args.url, dest, sha256=args.sha256, size=args.size, max_bytes=self.max_bytes,
                            progress=throttled, retries=d.retries, timeout=d.timeout_s, backoff_s=d.backoff_s,
                            max_backoff_s=d.max_backoff_s, cancel=self.stop)
        except BaseException:
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # only when nothing was kept there for a resume
            raise

    def _transfer(self, args: Any, progress: Callable[..., None]) -> Path:
        from edge_agent.comms.transfer.receiver import TransferReceiver

        t = self.transfer_cfg
        rx = TransferReceiver(
            self.transport.link, self.transport.topics.prefix, args.transfer, self.transport.device_id, self.staging,
            max_bytes=self.max_bytes, expected_sha256=args.sha256, expected_size=args.size,
            progress=_throttle(lambda got, total: progress("transfer", received=got, total=total)),
            idle_s=t.idle_s, max_idle_s=t.max_idle_s, deadline_s=t.deadline_s,
        )
        rx.start()
        # Only now: the console starts the chunks when it sees this step, and
        # the broker handles our SUBSCRIBE before this event (one client's
        # packets in order), so the first pass reaches us.
        progress("transfer")
        try:
            return rx.wait(timeout=t.deadline_s, cancel=self.stop)
        finally:
            rx.close()


def _throttle(fn: Callable[[int, int], None], every_s: float = 0.5) -> Callable[[int, int], None]:
    """At most one progress call per ``every_s``, plus the last one."""
    last = [0.0]

    def call(got: int, total: int) -> None:
        now = time.monotonic()
        if got >= total or now - last[0] >= every_s:
            last[0] = now
            try:
                fn(got, total)
            except EdgeAgentError:
                raise
            except Exception:
                log.exception("progress report failed")

    return call
