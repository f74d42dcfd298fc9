"""``edge-agent fleet ...``: the console side of the fleet (CONTRACT §1).

The logic is in the package :mod:`edge_agent.fleet`; this module parses options, shows
progress (stderr) and prints tables (stdout). Exit codes: 0 when every
targeted device succeeded, 1 when one did not (or was offline), 2 for bad
usage or a bad config file.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable

import click

from edge_agent.cli.common import table, user_errors

ENV = "EDGE_FLEET_"


def broker_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Where the broker is: ``--config`` (an agent config's ``[mqtt]``)
    and/or the options, which win. Each option also reads EDGE_FLEET_<NAME>."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar=ENV + "CONFIG", show_envvar=True,
                     help="Agent-style config file: the broker address, credentials and TLS of its [mqtt]."),
        click.option("--host", envvar=ENV + "HOST", show_envvar=True, help="Broker host [default: 127.0.0.1]."),
        click.option("--port", type=click.IntRange(1, 65535), envvar=ENV + "PORT", show_envvar=True, help="Broker port [default: 1883]."),
        click.option("--prefix", envvar=ENV + "PREFIX", show_envvar=True, help="Topic prefix (mqtt.topic_prefix) [default: edge]."),
        click.option("--username", envvar=ENV + "USERNAME", show_envvar=True, help="Broker user name."),
        click.option("--password", envvar=ENV + "PASSWORD", show_envvar=True, help="Broker password (better: EDGE_FLEET_PASSWORD)."),
        click.option("--ca-certs", type=click.Path(dir_okay=False, exists=True), envvar=ENV + "CA_CERTS", show_envvar=True,
                     help="CA bundle of the broker's certificate (turns TLS on)."),
        click.option("--certfile", type=click.Path(dir_okay=False, exists=True), envvar=ENV + "CERTFILE", show_envvar=True,
                     help="Client certificate for mutual TLS."),
        click.option("--keyfile", type=click.Path(dir_okay=False, exists=True), envvar=ENV + "KEYFILE", show_envvar=True,
                     help="Private key of --certfile."),
        click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), envvar=ENV + "SIGN_KEY", show_envvar=True,
                     help="Ed25519 private key (edge-agent keygen) to sign every command with, for devices "
                     "with [commands] trusted_keys."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(opts: dict[str, Any]):
    """The broker options of :func:`broker_options` (all of ``**broker``) as settings."""
    from edge_agent.fleet import BrokerSettings

    return BrokerSettings.from_options(opts.pop("config_path"), **opts)


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--device", "devices", multiple=True, help="A device id (repeatable)."),
        click.option("--group", help="Every online device of this group."),
        click.option("--all", "all_", is_flag=True, help="Every online device."),
        click.option("--wait-online", type=click.FloatRange(min=0), default=0, show_default=True,
                     help="Seconds a targeted device that is offline is given to come online "
                     "(0: report it offline at once)."),
        click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON instead of a table."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _print_outcomes(outcomes: list[Any], as_json: bool, extra: dict[str, Any] | None = None) -> None:
    from edge_agent.fleet import OUTCOME_HEAD, outcome_rows

    if as_json:
        data = {**(extra or {}), "outcomes": [
            {"device": o.device, "ok": o.ok, "code": o.code, "message": o.message, "active": o.active,
             "seconds": o.seconds, "result": o.result} for o in outcomes]}
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(table(OUTCOME_HEAD, outcome_rows(outcomes)))
    good = sum(o.ok for o in outcomes)
    click.echo(f"{good} of {len(outcomes)} device(s) succeeded")


def _exit_for(outcomes: list[Any]) -> None:
    if not outcomes:
        click.echo("error: no device matches the target (see `edge-agent fleet status`)", err=True)
        sys.exit(1)
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


class ProgressView:
    """Deploy progress on stderr.

    On a terminal: one bar per device (up to ``MAX_LINES``), redrawn in place
    at most five times a second; with more devices, one line of counts per
    step. Not on a terminal (a log, CI): a line when a device changes step
    and at each quarter of its transfer, or, for many devices, a line of
    counts every few seconds. Thread-safe (updates come from paho's thread).
    """

    MAX_LINES = 20
    WIDTH = 24

    def __init__(self, stream: Any = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.states: dict[str, Any] = {}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._drawn = 0
        self._last_draw = 0.0
        self._milestone: dict[str, tuple[str, int]] = {}

    @property
    def many(self) -> bool:
        return len(self.states) > self.MAX_LINES

    def targets(self, online: list[str], offline: list[str]) -> None:
        from edge_agent.fleet import DeviceProgress

        with self._lock:
            for device in online:
                self.states.setdefault(device, DeviceProgress(device))
        if self.enabled:
            off = f", {len(offline)} offline" if offline else ""
            self._write(f"deploying to {len(online)} online device(s){off}\n")

    def update(self, st: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.states[st.device] = st
            now = time.monotonic()
            if self.tty:
                if now - self._last_draw >= 0.2 or st.done:
                    self._draw(now)
                return
            if self.many:
                if now - self._last_draw >= 3.0:
                    self._last_draw = now
                    self._write(self._counts() + "\n")
                return
            quarter = int((st.fraction or 0) * 4)
            key = (st.step, quarter if st.fraction is not None else -1)
            if self._milestone.get(st.device) != key:
                self._milestone[st.device] = key
                self._write(f"{st.device}: {self._label(st)}\n")

    def finish(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                self._draw(time.monotonic())
            elif self.many:
                self._write(self._counts() + "\n")

    # -- rendering (lock held) ----------------------------------------------------

    def _label(self, st: Any) -> str:
        if st.fraction is not None and not st.done:
            return f"{st.step} {st.fraction * 100:.0f}%"
        return st.step

    def _bar(self, st: Any) -> str:
        fraction = 1.0 if st.done else (st.fraction or 0.0)
        filled = int(fraction * self.WIDTH)
        return "[" + "#" * filled + "." * (self.WIDTH - filled) + "]"

    def _counts(self) -> str:
        counts: dict[str, int] = {}
        for st in self.states.values():
            step = "failed" if st.done and not st.ok else st.step
            counts[step] = counts.get(step, 0) + 1
        parts = ", ".join(f"{n} {step}" for step, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"[{time.monotonic() - self.started:5.1f}s] {len(self.states)} device(s): {parts}"

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self.many:
            lines = [self._counts()]
        else:
            width = max(len(d) for d in self.states) if self.states else 0
            lines = [f"{d.ljust(width)} {self._bar(st)} {self._label(st)}" for d, st in sorted(self.states.items())]
        out = ""
        if self._drawn:
            out += f"\x1b[{self._drawn}F"
        out += "".join(f"\x1b[2K{line}\n" for line in lines)
        self._drawn = len(lines)
        self._write(out)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@click.group()
def fleet() -> None:
    """The fleet console: deploy, follow and roll back devices over MQTT."""


@fleet.command("deploy")
@click.argument("bundle", type=click.Path(exists=True))
@target_options
@click.option("--via", type=click.Choice(["mqtt", "url"]), default="mqtt", show_default=True,
              help="mqtt: publish the bundle once over the broker; url: devices download it.")
@click.option("--url", help="With --via url: where devices download the archive (http://, https://, file://).")
@click.option("--serve", "serve", metavar="HOST:PORT",
              help="With --via url: serve the archive from this console over HTTP (with Range) while deploying.")
@click.option("--advertise", metavar="HOST", help="With --serve: the host name devices use to reach this console.")
@click.option("--no-activate", is_flag=True, help="Install and verify only; do not serve the new version.")
@click.option("--label", help="Point this version label (e.g. canary) at the new version.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds to wait for every device's reply.")
@click.option("--rate", type=click.FloatRange(min=1), help="With --via mqtt: cap the upload at this many kB/s.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@broker_options
@user_errors
def deploy_cmd(bundle: str, devices: tuple[str, ...], group: str | None, all_: bool, wait_online: float,
               as_json: bool, via: str, url: str | None, serve: str | None, advertise: str | None,
               no_activate: bool, label: str | None, timeout: float, rate: float | None, quiet: bool,
               **broker: Any) -> None:
    """Deploy BUNDLE (a bundle directory or .tar/.tar.gz) to devices.

    \b
    Examples:
      edge-agent fleet deploy cls-4.tar.gz --group lobby
      edge-agent fleet deploy cls-4.tar.gz --all --via url --serve 0.0.0.0:8600 --advertise console.lan
      edge-agent fleet deploy cls-4.tar.gz --device cam-07 --via url --url https://files.lan/cls-4.tar.gz
    """
    from edge_agent import fleet as f

    target = f.Target.of(devices, group, all_)
    f.check_delivery(via, url, serve, advertise)  # before any archiving or connecting
    settings = _settings(broker)
    prepared = f.prepare_bundle(bundle)
    view = ProgressView(enabled=not quiet and not as_json)
    try:
        if not as_json:
            click.echo(f"bundle {prepared.model} v{prepared.version}: {prepared.size} bytes, "
                       f"sha256 {prepared.sha256[:12]}…, via {via}, to {target.describe()}", err=True)
        with f.Console(settings) as console:
            report = f.deploy(
                console, prepared, target, via=via, url=url,  # type: ignore[arg-type]
                serve=f.parse_host_port(serve) if serve else None, advertise=advertise,
                activate=not no_activate, label=label, timeout=timeout, wait_online=wait_online,
                rate_bytes_s=rate * 1000 if rate else None, progress=view.update, on_targets=view.targets,
            )
        view.finish()
    finally:
        prepared.cleanup()
    extra = {"model": prepared.model, "version": prepared.version, "sha256": prepared.sha256, "size": prepared.size,
             "via": via, "url": report.url, "seconds": report.seconds, "bytes_sent": report.bytes_sent}
    _print_outcomes(report.outcomes, as_json, extra)
    if not as_json and report.outcomes:
        click.echo(f"{report.seconds:.1f} s, {report.bytes_sent / 1e6:.1f} MB sent by the console")
    _exit_for(report.outcomes)


@fleet.command("rollback")
@click.argument("model")
@target_options
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds to wait for every device's reply.")
@broker_options
@user_errors
def rollback_cmd(model: str, devices: tuple[str, ...], group: str | None, all_: bool, wait_online: float,
                 as_json: bool, timeout: float, **broker: Any) -> None:
    """Roll MODEL back to its previous good version on devices."""
    from edge_agent import fleet as f

    target = f.Target.of(devices, group, all_)
    with f.Console(_settings(broker)) as console:
        outcomes = f.run_command(console, target, "rollback", {"model": model}, timeout=timeout,
                                 wait_online=wait_online)
    _print_outcomes(outcomes, as_json, {"model": model})
    _exit_for(outcomes)


@fleet.command("status")
@click.option("--group", help="Only the devices of this group.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds to wait for telemetry (CPU, memory, temperature) from the online devices.")
@click.option("--json", "as_json", is_flag=True, help="Print the statuses as JSON.")
@broker_options
@user_errors
def status_cmd(group: str | None, wait_s: float, as_json: bool, **broker: Any) -> None:
    """A table of every device from its retained status (and recent telemetry)."""
    from edge_agent import fleet as f

    settings = _settings(broker)
    with f.Console(settings, telemetry=wait_s > 0) as console:
        devices = f.collect_status(console, group=group, telemetry_wait_s=wait_s)
    if as_json:
        click.echo(json.dumps({d: {"status": i.status, "telemetry": i.telemetry} for d, i in devices.items()},
                              indent=2))
        return
    if not devices:
        where = f"in group {group}" if group else f"under prefix {settings.prefix}"
        click.echo(f"no device has published a status {where}")
        return
    click.echo(table(f.STATUS_HEAD, f.status_rows(devices)))
    online = sum(i.online for i in devices.values())
    click.echo(f"{online} of {len(devices)} device(s) online")


@fleet.command("watch")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--no-events", is_flag=True, help="Telemetry only.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many lines.")
@broker_options
@user_errors
def watch_cmd(devices: tuple[str, ...], no_events: bool, count: int | None, **broker: Any) -> None:
    """Follow telemetry and events live, one line per message, until Ctrl-C."""
    import queue

    from edge_agent import fleet as f

    lines: "queue.Queue[str]" = queue.Queue()
    wanted = set(devices)
    ready = threading.Event()

    def listener(kind: str, device: str, data: dict[str, Any]) -> None:
        if wanted and device not in wanted:
            return
        if kind == "events" and no_events:
            return
        if kind == "status" and not ready.is_set():
            return  # the retained statuses: old news
        lines.put(f.describe_message(kind, device, data))

    console = f.Console(_settings(broker), telemetry=True)
    console.on_message(listener)
    shown = 0
    with console.connect():
        console.sync()
        ready.set()
        click.echo(f"watching {', '.join(sorted(wanted)) or 'every device'} (Ctrl-C to stop)", err=True)
        try:
            while count is None or shown < count:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                click.echo(line)
                shown += 1
        except KeyboardInterrupt:
            pass
