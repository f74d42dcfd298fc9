"""The deploy flow: :func:`deploy` ships a bundle to a device, a group or
every device and waits for each device's reply, over MQTT (one
:class:`~edge_agent.comms.transfer.TransferSender` for all, each chunk
published once, paced by the slowest device's progress) or by URL (given, or
served by the console itself with
:class:`~edge_agent.fleet.archive_server.ArchiveServer`). It follows each
device's ``deploy_*`` events as a :class:`DeviceProgress` and returns a
:class:`DeployReport`.

Threading: :func:`deploy` runs on the caller's thread; the progress callback
runs on paho's network thread and must be quick; the transfer sender has its
own thread.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from edge_agent.errors import UsageError
from edge_agent.fleet.archive_server import ArchiveServer
from edge_agent.fleet.bundles import PreparedBundle, chunk_size_for
from edge_agent.fleet.commands import new_command_id
from edge_agent.fleet.console import Console
from edge_agent.fleet.replies import REASK_S, run_command
from edge_agent.fleet.targets import Outcome, Target


@dataclass
class DeviceProgress:
    """Where one device's deploy stands, from its events."""

    device: str
    step: str = "waiting"
    received: int | None = None
    total: int | None = None
    done: bool = False
    ok: bool | None = None
    updated: float = 0.0
    """time.monotonic() of the device's last event."""

    @property
    def fraction(self) -> float | None:
        if self.received is None or not self.total:
            return None
        return min(1.0, self.received / self.total)


@dataclass
class DeployReport:
    """Everything a deploy did, for the table and for benchmarks."""

    bundle: PreparedBundle
    via: str
    url: str | None
    outcomes: list[Outcome]
    seconds: float
    bytes_sent: int
    """Bytes the console itself sent: transfer chunks and meta, or HTTP bodies."""
    chunks_published: int = 0
    needs: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.ok for o in self.outcomes)


def check_delivery(via: str, url: str | None, serve: Any, advertise: str | None) -> None:
    """The delivery options of a deploy make sense together (UsageError if not)."""
    if via not in ("mqtt", "url"):
        raise UsageError(f"--via {via!r}: use mqtt or url")
    if via == "url" and (url is None) == (serve is None):
        raise UsageError("--via url needs exactly one of --url and --serve")
    if via == "mqtt" and (url is not None or serve is not None):
        raise UsageError("--url and --serve go with --via url")
    if advertise and serve is None:
        raise UsageError("--advertise goes with --serve")


def deploy(
    console: Console,
    bundle: PreparedBundle,
    target: Target,
    *,
    via: Literal["mqtt", "url"] = "mqtt",
    url: str | None = None,
    serve: tuple[str, int] | None = None,
    activate: bool = True,
    label: str | None = None,
    timeout: float = 600.0,
    wait_online: float = 0.0,
    join_wait_s: float = 5.0,
    chunk_size: int | None = None,
    rate_bytes_s: float | None = None,
    window_bytes: int = 2 * 1024 * 1024,
    repeat_after_s: float = 10.0,
    advertise: str | None = None,
    progress: Callable[[DeviceProgress], None] | None = None,
    on_targets: Callable[[list[str], list[str]], None] | None = None,
    reask_s: float | None = REASK_S,
) -> DeployReport:
    """Deploy ``bundle`` to ``target`` and wait for every device's reply.

    ``via="mqtt"``: the deploy command goes out first (devices start
    listening for the transfer), the console waits up to ``join_wait_s`` for
    the targets to report the ``transfer`` step (they listen), then publishes the transfer
    once for all of them and serves ``need`` requests until every device
    replied; the first pass keeps within ``window_bytes`` of the slowest
    device's reported progress, so that a busy fleet is not flooded into
    asking for chunks again; a chunk is re-published for a ``need`` at most
    every ``repeat_after_s`` (each repeat reaches every device, and under
    load a device asks for chunks that are still queued for it).
    ``via="url"``: the command carries ``url``, or the URL of an
    :class:`ArchiveServer` on ``serve`` (host, port) run for the duration,
    reached by the devices at ``advertise`` (default: the bound host).

    ``progress(DeviceProgress)`` is called on paho's thread at every event of
    this deploy; ``on_targets(online, offline)`` once the targets are known.
    """
    from edge_agent.comms.transfer import TransferSender

    check_delivery(via, url, serve, advertise)
    cmd_id = new_command_id("deploy")
    args: dict[str, Any] = {"model": bundle.model, "version": bundle.version, "sha256": bundle.sha256,
                            "size": bundle.size, "activate": activate}
    if label is not None:
        args["label"] = label
    server: ArchiveServer | None = None
    sender: TransferSender | None = None
    states: dict[str, DeviceProgress] = {}
    started = threading.Condition()
    bytes_before = console.link.bytes

    def on_message(kind: str, device: str, data: dict[str, Any]) -> None:
        if kind != "events" or data.get("id") != cmd_id:
            return
        with started:
            st = states.setdefault(device, DeviceProgress(device))
            st.updated = time.monotonic()
            event = data.get("event")
            if event == "deploy_started":
                st.step = "started" if st.step == "waiting" else st.step
            elif event == "deploy_progress":
                step = data.get("step")
                if isinstance(step, str):
                    if step != st.step:
                        st.received = st.total = None
                    st.step = step
                for key in ("received", "total"):
                    if isinstance(data.get(key), int):
                        setattr(st, key, data[key])
            elif event in ("deploy_done", "deploy_failed"):
                st.done, st.ok = True, event == "deploy_done"
                st.step = "done" if st.ok else f"failed: {data.get('code', 'error')}"
            else:
                return
            started.notify_all()
            snapshot = replace(st)
        if progress is not None:
            progress(snapshot)

    def before_send(online: list[str], offline: list[str]) -> None:
        with started:
            for device in online:
                states.setdefault(device, DeviceProgress(device))
        if on_targets is not None:
            on_targets(online, offline)

    def after_send(online: list[str]) -> None:
        nonlocal sender
        if via != "mqtt" or (not online and wait_online <= 0):
            return
        # Let the devices subscribe to the transfer before its chunks flow, so
        # the first pass reaches them all: a device reports the "transfer"
        # step once it listens. One that is late asks for the rest.
        limit = time.monotonic() + (join_wait_s if online else 0)
        with started:
            while any(states.get(d, DeviceProgress(d)).step in ("waiting", "started") for d in online):
                left = limit - time.monotonic()
                if left <= 0:
                    break
                started.wait(left)
        size = chunk_size or chunk_size_for(bundle.size)
        link = _PacedLink(console.link, console.topics.transfer(transfer_id).chunk_prefix, size, bundle.size,
                          window_bytes, started, lambda: _slowest(states, online, stall_s=3.0))
        sender = TransferSender(link, console.prefix, bundle.archive, tid=transfer_id, chunk_size=size,
                                rate_bytes_s=rate_bytes_s, repeat_after_s=repeat_after_s)
        sender.start()

    def on_sent(devices: list[str]) -> None:
        with started:
            for device in devices:
                states.setdefault(device, DeviceProgress(device))

    transfer_id = uuid.uuid4().hex
    t0 = time.monotonic()
    remove = console.on_message(on_message)
    try:
        if via == "mqtt":
            args["transfer"] = transfer_id
        else:
            if serve is not None:
                server = ArchiveServer(bundle.archive, serve[0], serve[1], advertise=advertise).start()
                url = server.url
            args["url"] = url
        outcomes = run_command(console, target, "deploy", args, timeout=timeout, wait_online=wait_online,
                               reask_s=reask_s,
                               cmd_id=cmd_id, before_send=before_send, after_send=after_send, on_sent=on_sent)
    finally:
        remove()
        if sender is not None:
            sender.close()
        if server is not None:
            server.close()
    seconds = time.monotonic() - t0
    sent = server.bytes_sent if server is not None else console.link.bytes - bytes_before
    return DeployReport(bundle, via, args.get("url"), outcomes, round(seconds, 3), sent,
                        chunks_published=sender.published if sender else 0,
                        needs=len(sender.needs) if sender else 0)


class _PacedLink:
    """Flow control for a transfer's first pass: a new chunk is published only
    while it ends at most ``window`` bytes beyond what the slowest devices
    reported receiving (``slowest()``; None: nobody to wait for). Devices
    report at most twice a second, so the window allows about twice its size
    per second. A device silent for a while is not waited for (``slowest``
    leaves it out); re-published chunks are never held.

    Flooding a fleet faster than it reads does not make it faster: the broker
    queues, a device busy with its backlog hears nothing new for seconds and
    asks for everything again, and every device receives the repeats.
    """

    def __init__(self, inner: Any, chunk_prefix: str, chunk_size: int, size: int, window: int,
                 cond: threading.Condition, slowest: Callable[[], int | None]) -> None:
        self.inner = inner
        self.chunk_prefix = chunk_prefix
        self.chunk_size = chunk_size
        self.size = size
        self.window = max(window, chunk_size)
        self.cond = cond
        self.slowest = slowest
        self.highest = -1

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> Any:
        if topic.startswith(self.chunk_prefix):
            index = int(topic.rsplit("/", 1)[1])
            if index > self.highest:
                self.highest = index
                end = min((index + 1) * self.chunk_size, self.size)
                with self.cond:
                    while (low := self.slowest()) is not None and end - low > self.window:
                        self.cond.wait(0.25)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        return self.inner.subscribe(topic_filter, callback)


def _slowest(states: dict[str, DeviceProgress], devices: list[str], *, stall_s: float) -> int | None:
    """The bytes received by the slowest of ``devices`` still receiving and
    heard from within ``stall_s`` (condition held)."""
    now = time.monotonic()
    lows = []
    for device in devices:
        st = states.get(device)
        if st is None or st.done or now - st.updated > stall_s:
            continue
        if st.step in ("waiting", "started"):
            lows.append(0)
        elif st.step == "transfer":
            lows.append(st.received or 0)
    return min(lows) if lows else None
