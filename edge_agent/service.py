"""Running as a systemd service: the notify protocol and the watchdog.

Under ``Type=notify`` systemd hands the agent a datagram socket in
``NOTIFY_SOCKET``; the agent tells it ``READY=1`` once every model serves
and every source has opened (or failed and is retrying), keeps a one-line
``STATUS=`` current, says ``RELOADING=1``/``READY=1`` around a reload and
``STOPPING=1`` on shutdown. With ``WatchdogSec=`` set, systemd passes
``WATCHDOG_USEC`` and restarts the agent when ``WATCHDOG=1`` stops coming.

:class:`Notifier` is the protocol (a few lines of socket code: nothing is
sent when ``NOTIFY_SOCKET`` is unset, and a vanished socket is never an
error). :class:`Supervisor` is the watchdog: a thread that checks, every
tick, that each capture thread and each inference worker makes progress,
pings only while they all do, and says in the log which part stalled
before the pings stop. What the agent heals itself (a camera that delivers
nothing is reopened, a pipe program restarted, by the source after its
``stall_timeout_s``) never stops the pings; what it cannot heal (a read
that never returns, an inference that never ends, a dead thread) does, and
systemd restarts the process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``; a no-op when it is unset.

    Thread-safe: each call sends one datagram. Send errors are logged once
    and otherwise ignored (systemd going away must not stop the agent).
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False
        self._lock = threading.Lock()
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; True when it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block: a notify socket nobody reads must not stall
                # the watchdog thread (systemd reads at once; a full buffer
                # is an error like any other).
                self._sock.sendto(payload, socket.MSG_DONTWAIT, self.address)
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
                    self._warned = True
                return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class StartupExtender:
    """While the agent starts (models verified and loaded, sources opened),
    ask systemd for more time every ``every_s`` seconds with
    ``EXTEND_TIMEOUT_USEC``, so a big model on a slow SD card is not killed
    by ``TimeoutStartSec``; never beyond ``limit_s`` in all, so a start that
    hangs still fails. A context manager; a no-op without systemd."""

    def __init__(self, notifier: Notifier, *, every_s: float = 30.0, limit_s: float = 900.0) -> None:
        self.notifier = notifier
        self.every_s = every_s
        self.limit_s = limit_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StartupExtender":
        if self.notifier.enabled:
            self.notifier.status("starting: verifying and loading models, opening sources")
            self._thread = threading.Thread(target=self._run, name="startup-extender", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._done.wait(self.every_s) and time.monotonic() < deadline:
            self.notifier.extend_timeout(min(2 * self.every_s, deadline - time.monotonic()))


def _watchdog_usec(env: dict[str, str] | Any) -> int | None:
    """``WATCHDOG_USEC`` when it is meant for this process (sd_watchdog_enabled)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None


@dataclass(frozen=True)
class Stall:
    """One part that does not make progress: what and for how long."""

    part: str
    what: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.part}: {self.what} for {self.seconds:.0f} s"


def find_stalls(agent: Any, now: float, stall_s: float) -> list[Stall]:
    """Every capture thread and worker of ``agent`` that has stopped moving.

    Also checked: workers a reload stopped whose threads did not end
    (``agent.lingering``), and a live source whose capture thread crashed.
    A capture thread counts when it is alive and has shown no progress for
    longer than ``max(stall_s, 3 * stall_timeout_s)``: the source restarts a
    silent camera itself after ``stall_timeout_s``, so only a call that does
    not return even then is a stall. A worker counts when its thread died
    while its source still runs, or when one frame's processing has taken
    longer than ``stall_s``.
    """
    stalls = []
    for worker in [*agent.workers, *agent.lingering]:
        source = worker.source
        name = source.name
        if source.live and source.state == "failed":
            # a camera's capture thread that crashed: nothing reads it any more
            stalls.append(Stall(f"source {name}", "capture thread crashed", now - source.last_progress))
            continue
        if source.capture_alive:
            limit = max(stall_s, 3 * source.cfg.stall_timeout_s)
            idle = now - source.last_progress
            if idle > limit:
                where = source.blocked_in or "its loop"
                stalls.append(Stall(f"source {name}", f"capture thread stuck in {where}", idle))
        if worker.done:
            if not worker.finished_cleanly:
                stalls.append(Stall(f"worker {name}", "inference thread died", now - worker.last_progress))
            continue
        idle = now - worker.last_progress
        if idle > stall_s:
            stalls.append(Stall(f"worker {name}", f"stuck in {worker.blocked_in or 'its loop'}", idle))
    return stalls


class Supervisor:
    """The watchdog thread, and the keeper of ``STATUS=``.

    Every ``tick_s`` it checks the agent's parts (:func:`find_stalls`); while
    none stalls it sends ``WATCHDOG=1`` (when systemd asked for it) at least
    every ``WATCHDOG_USEC / 2``. When a part stalls it logs which one, once,
    and withholds the pings; should the part recover, pings resume and that
    is logged too. ``status_line`` is sent whenever it changes.
    """

    def __init__(
        self,
        agent: Any,
        notifier: Notifier,
        *,
        stall_s: float,
        status_line: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.notifier = notifier
        self.stall_s = stall_s
        self.status_line = status_line
        self.clock = clock
        usec = notifier.watchdog_usec
        self.ping_every = usec / 2e6 if usec else None
        self.tick_s = min(1.0, self.ping_every or 1.0)
        self.stalls: list[Stall] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None
        self._last_ping = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def check(self) -> list[Stall]:
        """One round: find stalls, ping or withhold, refresh the status."""
        now = self.clock()
        stalls = find_stalls(self.agent, now, self.stall_s)
        if stalls and not self.stalls:
            log.error(
                "watchdog: %s; %s", "; ".join(map(str, stalls)),
                "no more WATCHDOG=1 pings, systemd will restart the agent" if self.ping_every
                else "the agent cannot heal this itself (no systemd watchdog to restart it)",
            )
        elif self.stalls and not stalls:
            log.warning("watchdog: every part makes progress again; pings resume")
        self.stalls = stalls
        if not stalls and self.ping_every is not None and now - self._last_ping >= self.ping_every * 0.9:
            self.notifier.watchdog()
            self._last_ping = now
        line = self.status_line()
        if stalls:
            line = f"STALLED {'; '.join(map(str, stalls))} | {line}"
        if line != self._last_status:
            self.notifier.status(line)
            self._last_status = line
        return stalls

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.check()
            except Exception:  # the watchdog must not die of a bug in a status line
                log.exception("watchdog: check failed")


class RateMeter:
    """Frames per second from running totals, averaged over at least
    ``min_s`` seconds (a status line read every second stays steady)."""

    def __init__(self, min_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_s = min_s
        self.clock = clock
        self._mark: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}

    def rates(self, totals: Iterable[tuple[str, int]]) -> dict[str, float]:
        now = self.clock()
        out = {}
        for name, total in totals:
            then, before = self._mark.setdefault(name, (now, total))
            if total < before:  # a restarted source counts from 0 again
                then, before = self._mark[name] = (now, total)
            if now - then >= self.min_s:
                self._rate[name] = (total - before) / (now - then)
                self._mark[name] = (now, total)
            out[name] = self._rate.get(name, 0.0)
        return out
