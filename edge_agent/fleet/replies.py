"""One command sent to its targets and one reply collected per device:
:func:`run_command`. It resolves the target from the retained statuses,
publishes once on a group's or the fleet's topic (or on each named device's
own), sends it to a device that comes online while it waits, asks a silent
device again (:data:`REASK_S`) and turns each reply, or its absence, into an
:class:`~edge_agent.fleet.targets.Outcome`.

Targets are resolved from the retained statuses: a device whose status is
``online`` is sent the command; one that is known but not online (its last
status is ``offline`` or ``stopped``), or was asked for by name and never
seen, gets the outcome ``offline`` at once, or, with ``wait_online``, is
given that long to come online and is then sent the command on its own
topic (with the same command id, so a device that had it already answers
with its first reply and does not run it twice).

Threading: :func:`run_command` runs on the caller's thread and waits on the
console's condition; the re-asker's listener runs on paho's thread.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from edge_agent.fleet.commands import new_command_id
from edge_agent.fleet.console import Console
from edge_agent.fleet.rendering import format_age
from edge_agent.fleet.targets import DeviceInfo, Outcome, Target, outcome_of

log = logging.getLogger(__name__)

DELIVERY_SLACK_S = 5.0
"""A command expires (MQTT 5) this long after the console stops waiting for
devices to come online."""
REASK_S = 15.0
"""A device that got a command and has said nothing about it (no event, no
reply) for this long is sent the same command (same id) again on its own
topic, then after twice as long, and so on: the command or its reply may have
been lost (a broker drops messages for a client whose queue is full). A
device never runs an id twice: it answers a repeat from memory, or when the
first run ends."""


def _offline_outcome(device: str, info: DeviceInfo | None, waited: float) -> Outcome:
    if info is None:
        message = "never seen on this broker (no status)"
    else:
        when = info.last_seen
        ago = f", last seen {format_age(time.time() - when)} ago" if when else ""
        message = f"not online (status {info.state}{ago})"
    if waited > 0:
        message += f"; did not come online within {waited:.0f} s"
    return Outcome(device, False, code="offline", message=message)


class _Reasker:
    """Which devices to ask again for one command: those silent about it
    (no event carrying its id) for ``every`` seconds since they were last
    asked or last spoke of it; the interval doubles per device, up to 8x."""

    def __init__(self, console: Console, cmd_id: str, every: float | None) -> None:
        self.console = console
        self.cmd_id = cmd_id
        self.every = every
        self.active_at: dict[str, float] = {}
        self.interval: dict[str, float] = {}
        self.asked = 0
        self._remove = console.on_message(self._on_message) if every else (lambda: None)

    def _on_message(self, kind: str, device: str, payload: dict[str, Any]) -> None:
        if kind == "events" and payload.get("id") == self.cmd_id:
            with self.console.cond:
                self.active_at[device] = time.monotonic()

    def sent(self, devices: list[str], at: float) -> None:
        with self.console.cond:
            self.active_at.update({d: at for d in devices})

    def due(self, missing: list[str], now: float) -> list[str]:
        """(condition held)"""
        if not self.every:
            return []
        due = []
        for device in missing:
            every = self.interval.setdefault(device, self.every)
            if now - self.active_at.get(device, now) >= every:
                due.append(device)
                self.active_at[device] = now
                self.interval[device] = min(every * 2, 8 * self.every)
        self.asked += len(due)
        return due

    def close(self) -> None:
        self._remove()


def run_command(
    console: Console,
    target: Target,
    cmd: str,
    args: dict[str, Any],
    *,
    timeout: float = 60.0,
    wait_online: float = 0.0,
    cmd_id: str | None = None,
    on_sent: Callable[[list[str]], None] | None = None,
    before_send: Callable[[list[str], list[str]], None] | None = None,
    after_send: Callable[[list[str]], None] | None = None,
    reask_s: float | None = REASK_S,
) -> list[Outcome]:
    """Send ``cmd`` to ``target`` and wait (at most ``timeout`` s) for one
    reply per device. Returns one outcome per device, sorted by device.

    A device that has not replied and has said nothing about the command for
    ``reask_s`` seconds is asked again (the same id, on its own topic; see
    :data:`REASK_S`); None never asks again.

    A group or ``--all`` command is published once on the group's or the
    fleet's topic; devices named one by one get it on their own topics.
    Devices not online are ``offline`` at once, or, with ``wait_online``,
    get the command on their own topic if they come online within that many
    seconds (a device that is new to the group counts too while the console
    waits). ``before_send(online, offline)`` runs just before the first publish,
    ``after_send(online)`` just after it, ``on_sent([device])`` whenever a
    late device is sent the command.
    """
    console.sync()
    cmd_id = cmd_id or new_command_id(cmd)
    online, offline = console.resolve(target)
    reasker = _Reasker(console, cmd_id, reask_s)
    try:
        return _send_and_wait(console, target, cmd, args, cmd_id, online, offline, reasker, timeout=timeout,
                              wait_online=wait_online, on_sent=on_sent, before_send=before_send,
                              after_send=after_send)
    finally:
        reasker.close()
        if reasker.asked:
            log.warning("fleet: %s %s: asked %d time(s) again for a reply that did not come", cmd, cmd_id, reasker.asked)


def _send_and_wait(console: Console, target: Target, cmd: str, args: dict[str, Any], cmd_id: str,
                   online: list[str], offline: list[str], reasker: _Reasker, *, timeout: float,
                   wait_online: float, on_sent: Callable[[list[str]], None] | None,
                   before_send: Callable[[list[str], list[str]], None] | None,
                   after_send: Callable[[list[str]], None] | None) -> list[Outcome]:
    """The body of :func:`run_command`."""
    sent_at: dict[str, float] = {}
    start = time.monotonic()
    deadline = start + timeout
    online_deadline = start + min(wait_online, timeout)
    # Online devices get the command at once; one that is away receives it from
    # its persistent session only while we still wait for it.
    expiry = min(wait_online, timeout) + DELIVERY_SLACK_S
    if before_send is not None:
        before_send(online, offline)
    if online:
        if target.kind == "device":
            for device in online:
                console.publish_command(console.command_topic(device), cmd_id, cmd, args, expiry_s=expiry)
        else:
            console.publish_command(console.command_topic(target), cmd_id, cmd, args, expiry_s=expiry)
        now = time.monotonic()
        sent_at.update({d: now for d in online})
        reasker.sent(online, now)
    if after_send is not None:
        after_send(online)
    waiting = set(offline) if wait_online > 0 else set()

    def late_comers() -> list[str]:
        """Devices that came online while we wait and should get the command."""
        if time.monotonic() >= online_deadline:
            return []
        with console.cond:
            return sorted(
                d for d, i in console.devices.items()
                if i.online and d not in sent_at and (d in waiting or target.matches(i))
            )

    while True:
        for device in late_comers():
            log.info("fleet: %s came online: sending it %s %s", device, cmd, cmd_id)
            console.publish_command(console.command_topic(device), cmd_id, cmd, args, expiry_s=DELIVERY_SLACK_S)
            sent_at[device] = time.monotonic()
            reasker.sent([device], sent_at[device])
            waiting.discard(device)
            if on_sent is not None:
                on_sent([device])
        with console.cond:
            got = console.replies.get(cmd_id, {})
            missing = [d for d in sent_at if d not in got]
            now = time.monotonic()
            if (not missing and (not waiting or now >= online_deadline)) or now >= deadline:
                break
            again = reasker.due(missing, now)
            if not again:
                wake = deadline if not waiting or now >= online_deadline else min(deadline, online_deadline)
                console.cond.wait(min(0.5, max(0.01, wake - now)))
        for device in again:
            log.info("fleet: %s has said nothing about %s %s for a while: asking again", device, cmd, cmd_id)
            console.publish_command(console.command_topic(device), cmd_id, cmd, args,
                                    expiry_s=max(1.0, deadline - time.monotonic()) + DELIVERY_SLACK_S)

    outcomes: dict[str, Outcome] = {}
    snapshot = console.snapshot()
    for device, at in sent_at.items():
        answer = console.reply(cmd_id, device)
        if answer is not None:
            reply, when = answer
            outcomes[device] = outcome_of(device, reply, round(when - at, 3))
        else:
            info = snapshot.get(device)
            if info is not None and not info.online:
                outcomes[device] = Outcome(device, False, code="offline", message="went offline before it replied")
            else:
                outcomes[device] = Outcome(device, False, code="timeout", message=f"no reply within {timeout:.0f} s")
    for device in set(offline) - set(sent_at):
        outcomes[device] = _offline_outcome(device, snapshot.get(device), wait_online)
    return [outcomes[d] for d in sorted(outcomes)]
