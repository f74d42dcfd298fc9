"""The fleet console against a real mosquitto and real agents (the
``Agent`` of ``edge-agent run``, in this process: each with its own store,
MQTT connection, command plane and transfer receiver).

Why these tests matter: the console is how a fleet is changed. A deploy
that reports success for a device that did not activate, a device left
out silently because it was offline, or a transfer that costs the uplink
once per device would each be a fleet-wide mistake.

Each test uses its own topic prefix and device ids, so the retained
statuses and persistent sessions of one test never reach another.
"""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from edge_agent import fleet as f
from edge_agent.agent import Agent
from edge_agent.bundles.pack import pack
from edge_agent.cli import main
from edge_agent.config import parse_config
from edge_agent.errors import UsageError
from edge_agent.fleet.deployment import _slowest
from edge_agent.testing import tiny_onnx_classifier
from waiting import poll_until

PRE = {"size": (16, 16), "resize": "stretch"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """clf v1 (a directory, installed at start) and v2 (an archive of about
    600 kB: ten 64 KiB chunks over MQTT)."""
    folder = tmp_path_factory.mktemp("fleet-bundles")
    extra = folder / "extra.bin"
    extra.write_bytes(os.urandom(600_000))
    out = {}
    for version in (1, 2):
        model = tiny_onnx_classifier(folder / f"clf-{version}.onnx", size=(16, 16), seed=version)
        out[f"v{version}"] = pack(
            model, name="clf", version=version, preprocessing=dict(PRE),
            out=folder / (f"clf-{version}" if version == 1 else f"clf-{version}.tar.gz"),
            extra_files={"extra.bin": extra} if version == 2 else None,
        )
    return out


class Fleet:
    """Agents of one test: a prefix of their own, started and stopped at will."""

    def __init__(self, broker: Any, tmp: Path, v1: Path) -> None:
        self.broker = broker
        self.tmp = tmp
        self.v1 = v1
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"fleet-{self.tag}"
        self.agents: dict[str, Agent] = {}
        self.extra: dict[str, Any] = {}  # more agent config sections
        self.watcher = f.Console(self.settings()).connect()

    def name(self, short: str) -> str:
        return f"{short}-{self.tag}"

    def config(self, device: str, groups: list[str]) -> Any:
        return parse_config({
            "device_id": device,
            "groups": groups,
            "log_level": "warning",
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "topic_prefix": self.prefix,
                     "telemetry_interval_s": 0.5, "session_expiry_s": 600},
            "store": {"path": str(self.tmp / device / "store")},
            "models": [{"name": "clf", "bundle": str(self.v1), "threads": 1}],
            "transfer": {"idle_s": 0.3, "max_idle_s": 1.0},
            "download": {"backoff_s": 0.1, "max_backoff_s": 0.5, "timeout_s": 5.0},
            **self.extra,
        })

    def start(self, short: str, groups: list[str] = ()) -> Agent:
        device = self.name(short)
        agent = Agent(self.config(device, list(groups)))
        agent.start()
        self.agents[device] = agent
        self.wait_state(device, "online")
        return agent

    def wait_state(self, device: str, state: str, timeout: float = 10.0) -> None:
        """Until the broker has the device's retained status in ``state`` (the
        agent publishes ``online`` just after it reports being connected)."""
        deadline = time.monotonic() + timeout
        with self.watcher.cond:
            while (info := self.watcher.devices.get(device)) is None or info.state != state:
                left = deadline - time.monotonic()
                assert left > 0, f"{device} is not {state}"
                self.watcher.cond.wait(left)

    def stop(self, short: str) -> None:
        self.agents.pop(self.name(short)).shutdown()
        self.wait_state(self.name(short), "stopped")

    def active(self, short: str) -> Any:
        return self.agents[self.name(short)].models.status()["clf"]["active"]

    def settings(self) -> f.BrokerSettings:
        return f.BrokerSettings(host=self.broker.host, port=self.broker.port, prefix=self.prefix)

    def cli(self, *args: str) -> Any:
        common = ["--host", self.broker.host, "--port", str(self.broker.port), "--prefix", self.prefix]
        return CliRunner().invoke(main, ["fleet", *args, *common], catch_exceptions=False)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.shutdown()
        self.agents.clear()
        self.watcher.close()


@pytest.fixture
def fleet(broker: Any, tmp_path: Path, bundles: dict[str, Path]) -> Iterator[Fleet]:
    made = Fleet(broker, tmp_path, bundles["v1"])
    yield made
    made.close()


def rows(output: str) -> dict[str, list[str]]:
    """The table's rows by first column (device)."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if parts:
            out[parts[0]] = parts
    return out


# -- deploys ----------------------------------------------------------------------------


def test_deploy_over_mqtt_reaches_three_agents_one_started_late(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """One transfer serves the whole group. The third agent is offline when
    the deploy starts and comes back after every chunk was published once:
    its persistent session hands it the command, and it asks for the whole
    file with ``need`` (only that is published again)."""
    for short in ("a", "b", "c"):
        fleet.start(short, ["lobby"])
    fleet.stop("c")  # known to the console (status "stopped", group lobby), offline
    late = fleet.name("c")
    both_done = threading.Event()
    seen: dict[str, set[str]] = {}

    def progress(st: f.DeviceProgress) -> None:
        seen.setdefault(st.device, set()).add(st.step)
        if all(seen.get(fleet.name(s), set()) & {"done"} for s in ("a", "b")):
            both_done.set()

    def start_late() -> None:
        if both_done.wait(30):
            fleet.start("c", ["lobby"])

    starter = threading.Thread(target=start_late)
    starter.start()
    prepared = f.prepare_bundle(bundles["v2"])
    with f.Console(fleet.settings()) as console:
        report = f.deploy(console, prepared, f.Target("group", ("lobby",)), wait_online=30, timeout=60,
                          progress=progress)
    starter.join()

    assert [(o.device, o.ok, o.active) for o in report.outcomes] == [
        (fleet.name(s), True, 2) for s in ("a", "b", "c")
    ], report.outcomes
    assert all(fleet.active(s) == 2 for s in ("a", "b", "c"))
    assert {"transfer", "activating", "done"} <= seen[fleet.name("a")]
    assert seen[late] >= {"done"}
    # The late agent asked for what it missed; the file went out about twice
    # (first pass + its need), not once per device.
    assert report.needs >= 1
    assert prepared.size <= report.bytes_sent < 2.5 * prepared.size + 100_000


def test_a_lost_reply_is_asked_for_again_and_never_runs_twice(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """A broker drops messages for a client whose queue is full; here the
    deploy reply of one agent is lost on its way out. The console, hearing
    nothing more about the command from that device, sends it the same
    command id again; the agent answers from its memory of replies (the
    deploy does not run a second time) and the deploy reports both ok."""
    fleet.start("x", ["dock"])
    lossy = fleet.start("y", ["dock"])
    outbox = lossy.plane.outbox
    real_send = outbox.send
    replies: list[dict[str, Any]] = []

    def send(kind: str, suffix: str, payload: dict[str, Any], *, qos: int = 1, delivered: Any = None) -> None:
        if kind == "replies":
            replies.append(payload)
            if len(replies) == 1:
                return  # lost
        real_send(kind, suffix, payload, qos=qos, delivered=delivered)

    outbox.send = send  # type: ignore[method-assign]
    events: list[str] = []
    with f.Console(fleet.settings()) as console:
        console.on_message(lambda kind, device, p: events.append(p.get("event", "")) if device == fleet.name("y")
                           and kind == "events" else None)
        report = f.deploy(console, f.prepare_bundle(bundles["v2"]), f.Target("group", ("dock",)), timeout=60,
                          reask_s=1.0)
    assert [(o.device, o.ok, o.active) for o in report.outcomes] == [
        (fleet.name("x"), True, 2), (fleet.name("y"), True, 2)
    ], report.outcomes
    assert len(replies) == 2 and replies[0] == replies[1]  # the repeat was answered from memory
    assert events.count("deploy_started") == 1 and events.count("deploy_done") == 1  # ran once
    assert fleet.active("y") == 2


def test_deploy_by_url_served_by_the_console(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """``--via url --serve``: the console serves the archive over HTTP while
    the group downloads it; the table shows every device's new version."""
    fleet.start("a", ["yard"])
    fleet.start("b", ["yard"])
    result = fleet.cli("deploy", str(bundles["v2"]), "--group", "yard", "--via", "url", "--serve", "127.0.0.1:0",
                       "--timeout", "60")
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    for short in ("a", "b"):
        assert table[fleet.name(short)][1:3] == ["ok", "2"], result.stdout
        assert fleet.active(short) == 2
    assert "2 of 2 device(s) succeeded" in result.stdout


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file; the first full GET is cut off halfway through the body."""

    protocol_version = "HTTP/1.1"
    path_on_disk: Path
    requests: list[str | None]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        data = self.path_on_disk.read_bytes()
        rng = self.headers.get("Range")
        self.requests.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if len(self.requests) == 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-body
            self.close_connection = True
            return
        self.wfile.write(data[start:])


def test_deploy_by_url_resumes_an_interrupted_download(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """``--via url --url``: the server drops the connection halfway; the
    device resumes with a Range request and the deploy succeeds."""
    fleet.start("a")
    handler = type("H", (_DroppingHandler,), {"path_on_disk": bundles["v2"], "requests": []})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{bundles['v2'].name}"
        result = fleet.cli("deploy", str(bundles["v2"]), "--device", fleet.name("a"), "--via", "url", "--url", url,
                           "--timeout", "60")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    assert rows(result.stdout)[fleet.name("a")][1:3] == ["ok", "2"]
    half = bundles["v2"].stat().st_size // 2
    assert handler.requests[0] is None and handler.requests[1] == f"bytes={half}-", handler.requests


def test_offline_targets_are_reported_not_waited_for(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """A group member that is offline, and a device never seen, get the
    outcome ``offline`` at once; the online one is deployed; exit code 1."""
    fleet.start("on", ["dock"])
    fleet.start("off", ["dock"])
    fleet.stop("off")
    started = time.monotonic()
    result = fleet.cli("deploy", str(bundles["v2"]), "--group", "dock", "--timeout", "60")
    assert result.exit_code == 1, result.output
    table = rows(result.stdout)
    assert table[fleet.name("on")][1:3] == ["ok", "2"]
    assert table[fleet.name("off")][1] == "offline"
    assert "1 of 2 device(s) succeeded" in result.stdout
    assert time.monotonic() - started < 30

    ghost = fleet.cli("rollback", "clf", "--device", "ghost-" + fleet.tag, "--json")
    assert ghost.exit_code == 1
    (out,) = json.loads(ghost.stdout)["outcomes"]
    assert out["code"] == "offline" and "never seen" in out["message"]


# -- status, rollback, watch --------------------------------------------------------------


def test_status_table(fleet: Fleet) -> None:
    """Every device with a retained status: state, agent version, active
    model version, and the CPU/memory of recent telemetry."""
    from edge_agent import __version__

    fleet.start("s1", ["lobby"])
    fleet.start("s2", ["yard"])
    fleet.start("s3", ["lobby"])
    fleet.stop("s3")
    result = fleet.cli("status", "--wait", "3")
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert table["DEVICE"][:5] == ["DEVICE", "STATE", "SEEN", "AGENT", "MODELS"]
    s1 = table[fleet.name("s1")]
    assert s1[1] == "online" and s1[3] == __version__ and s1[4] == "clf:v1"
    assert s1[5].endswith("%") and s1[6].endswith("%")  # telemetry arrived
    assert table[fleet.name("s3")][1] == "stopped"
    assert "2 of 3 device(s) online" in result.stdout

    lobby = fleet.cli("status", "--group", "lobby", "--wait", "0")
    assert set(rows(lobby.stdout)) == {"DEVICE", fleet.name("s1"), fleet.name("s3"), "1"}


def test_status_of_an_empty_fleet_names_the_prefix(fleet: Fleet) -> None:
    result = fleet.cli("status", "--wait", "0")
    assert result.exit_code == 0, result.output
    assert f"no device has published a status under prefix {fleet.prefix}" in result.stdout


def test_rollback(fleet: Fleet, bundles: dict[str, Path]) -> None:
    """After a deploy of v2, ``fleet rollback`` returns the device to v1; a
    device with nothing to roll back to reports why, and the exit code is 1."""
    fleet.start("r1", ["g"])
    fleet.start("r2", ["g"])
    with f.Console(fleet.settings()) as console:
        report = f.deploy(console, f.prepare_bundle(bundles["v2"]), f.Target("device", (fleet.name("r1"),)),
                          timeout=60)
    assert report.ok, report.outcomes
    result = fleet.cli("rollback", "clf", "--group", "g")
    assert result.exit_code == 1, result.output
    table = rows(result.stdout)
    assert table[fleet.name("r1")][1:3] == ["ok", "1"]
    assert table[fleet.name("r2")][1] == "no_rollback_target"
    assert fleet.active("r1") == 1


def test_devices_with_trusted_keys_run_only_commands_signed_by_them(fleet: Fleet, bundles: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """``[commands] trusted_keys``: an unsigned console, or one signing with
    another key, is refused with a clear code and changes nothing; the
    console with ``--sign-key`` deploys and rolls back as usual."""
    from edge_agent.bundles.signing import generate_keypair

    ours, theirs = (tmp_path / "keys" / "ours", tmp_path / "keys" / "theirs")
    for prefix in (ours, theirs):
        generate_keypair(f"{prefix}.key", f"{prefix}.pub")
    fleet.extra = {"commands": {"trusted_keys": [f"{ours}.pub"]}}
    fleet.start("s1")
    device = fleet.name("s1")

    with f.Console(fleet.settings()) as console:  # no key
        report = f.deploy(console, f.prepare_bundle(bundles["v2"]), f.Target("device", (device,)), timeout=30)
    assert [(o.ok, o.code) for o in report.outcomes] == [(False, "signature_missing")]
    result = fleet.cli("rollback", "clf", "--device", device, "--sign-key", f"{theirs}.key")
    assert result.exit_code == 1 and rows(result.stdout)[device][1] == "untrusted_key", result.output
    assert fleet.active("s1") == 1

    signed = replace(fleet.settings(), sign_key=Path(f"{ours}.key"))
    with f.Console(signed) as console:
        report = f.deploy(console, f.prepare_bundle(bundles["v2"]), f.Target("device", (device,)), timeout=60)
    assert report.ok, report.outcomes
    assert fleet.active("s1") == 2
    result = fleet.cli("rollback", "clf", "--device", device, "--sign-key", f"{ours}.key")
    assert result.exit_code == 0 and rows(result.stdout)[device][1:3] == ["ok", "1"], result.output
    assert fleet.active("s1") == 1


def test_watch_prints_telemetry_and_events(fleet: Fleet) -> None:
    """``fleet watch`` prints one line per telemetry message of the device."""
    fleet.start("w1")
    result = fleet.cli("watch", "--device", fleet.name("w1"), "--count", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(f"{fleet.name('w1')} telemetry #" in line for line in lines)


# -- pieces without agents ------------------------------------------------------------------


def test_archive_server_answers_ranges(tmp_path: Path) -> None:
    """The console's HTTP server resumes: ``Range: bytes=N-`` gives 206 and
    the rest of the file; a range past the end gives 416."""
    path = tmp_path / "b.tar.gz"
    data = os.urandom(100_000)
    path.write_bytes(data)
    with f.ArchiveServer(path, "127.0.0.1", 0) as server:
        with urllib.request.urlopen(server.url) as resp:
            assert resp.status == 200 and resp.read() == data
        req = urllib.request.Request(server.url, headers={"Range": "bytes=60000-"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206 and resp.read() == data[60000:]
            assert resp.headers["Content-Range"] == f"bytes 60000-99999/{len(data)}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server.url, headers={"Range": "bytes=100000-"}))
        assert err.value.code == 416
        # the handler counts just after its last write
        poll_until(lambda: server.bytes_sent >= len(data) + 40000, 2, interval=0.01)
        assert server.bytes_sent == len(data) + 40000


@pytest.mark.parametrize("args, message", [
    (["deploy", "BUNDLE"], "exactly one of --device, --group and --all"),
    (["deploy", "BUNDLE", "--all", "--via", "url"], "--via url needs exactly one of --url and --serve"),
    (["deploy", "BUNDLE", "--all", "--url", "http://x/b.tar.gz"], "--url and --serve go with --via url"),
    (["deploy", "BUNDLE", "--all", "--via", "url", "--url", "http://x/b.tar.gz", "--advertise", "h"],
     "--advertise goes with --serve"),
    (["rollback", "clf", "--group", "no/slash"], "not a valid group name"),
    (["status", "--config", "MISSING"], "file not found"),
])
def test_usage_errors_exit_2(args: list[str], message: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    """Mistakes on the command line are exit code 2 with one line, no traceback."""
    args = [str(bundles["v2"]) if a == "BUNDLE" else str(tmp_path / "none.toml") if a == "MISSING" else a
            for a in args]
    result = CliRunner().invoke(main, ["fleet", *args, "--port", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_broker_settings_from_an_agent_config(tmp_path: Path) -> None:
    """``--config`` reads the agent's [mqtt] (address, prefix, credentials,
    TLS); options given on the command line win."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "x"\n[mqtt]\nhost = "mq.lan"\nport = 8883\ntopic_prefix = "site1"\n'
                   f'username = "ops"\npassword = "pw"\n[mqtt.tls]\nca_certs = "{ca}"\n')
    s = f.BrokerSettings.from_options(cfg, port=18883)
    assert (s.host, s.port, s.prefix, s.username, s.password, s.ca_certs, s.uses_tls) == (
        "mq.lan", 18883, "site1", "ops", "pw", ca, True)
    bare = tmp_path / "bare.toml"
    bare.write_text('device_id = "x"\n')
    with pytest.raises(UsageError, match="no \\[mqtt\\] section"):
        f.BrokerSettings.from_options(bare)


def test_broker_unreachable_is_a_runtime_failure() -> None:
    from mqtt_helpers import free_port

    result = CliRunner().invoke(main, ["fleet", "status", "--port", str(free_port())])
    assert result.exit_code == 1 and "cannot reach the broker" in result.output


def test_pacing_follows_the_slowest_device_heard_from() -> None:
    """The first pass waits for the slowest device still receiving; one that
    went silent or finished does not hold the fleet back."""
    now = time.monotonic()
    states = {
        "a": f.DeviceProgress("a", "transfer", 3_000_000, 4_000_000, updated=now),
        "b": f.DeviceProgress("b", "transfer", 1_000_000, 4_000_000, updated=now),
        "c": f.DeviceProgress("c", "transfer", 10, 4_000_000, updated=now - 60),  # silent
        "d": f.DeviceProgress("d", "done", done=True, ok=True, updated=now),
    }
    assert _slowest(states, ["a", "b", "c", "d"], stall_s=3) == 1_000_000
    assert _slowest(states, ["c", "d"], stall_s=3) is None
    assert f.chunk_size_for(4_000_000) == 256 * 1024
    big = f.chunk_size_for(2_000_000_000)
    assert big % 1024 == 0 and 2_000_000_000 / big <= 1024  # the meta stays small


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_readable_with_and_without_a_terminal() -> None:
    """On a terminal: a bar per device redrawn in place; in a log: a line per
    step change and per quarter of the transfer, no escape codes."""
    from edge_agent.cli.fleet import ProgressView

    steps = [f.DeviceProgress("cam-1", "transfer", r, 400, done=False) for r in (0, 50, 100, 120, 400)]
    steps.append(f.DeviceProgress("cam-1", "done", done=True, ok=True))
    log = _Stream(tty=False)
    view = ProgressView(log)
    view.targets(["cam-1"], ["cam-2"])
    for st in steps:
        view.update(st)
    view.finish()
    assert "\x1b" not in log.text
    assert log.text.splitlines() == [
        "deploying to 1 online device(s), 1 offline", "cam-1: transfer 0%", "cam-1: transfer 25%",
        "cam-1: transfer 100%", "cam-1: done"]

    term = _Stream(tty=True)
    view = ProgressView(term)
    view.targets(["cam-1"], [])
    for st in steps:
        view.update(st)
    view.finish()
    assert "\x1b[1F" in term.text and term.text.rstrip().endswith("cam-1 [" + "#" * 24 + "] done")


def test_console_sees_an_agent_started_by_edge_agent_run(fleet: Fleet, tmp_path: Path) -> None:
    """The same through the real command line on both sides: ``edge-agent run``
    in its own process, ``fleet status`` and ``fleet deploy`` against it."""
    from mqtt_helpers import AgentProcess, agent_config

    device = fleet.name("cli")
    cfg = agent_config(tmp_path, fleet.broker.host, fleet.broker.port, prefix=fleet.prefix, device=device,
                       bundle=fleet.v1, frames=None, groups=["cli"], mqtt_extra="session_expiry_s = 60")
    agent = AgentProcess(cfg)
    try:
        fleet.wait_state(device, "online", timeout=30)
        status = fleet.cli("status", "--config", str(cfg), "--wait", "2")
        assert status.exit_code == 0, status.output
        assert rows(status.stdout)[device][1] == "online"
        deploy = CliRunner().invoke(main, ["fleet", "deploy", str(fleet.v1), "--group", "cli", "--config", str(cfg)])
        assert deploy.exit_code == 0, deploy.output  # v1 again: installed already, still active
        assert rows(deploy.stdout)[device][1:3] == ["ok", "1"]
    finally:
        assert agent.stop() == 0, agent.output()
    fleet.wait_state(device, "stopped")


def test_a_bundle_directory_is_archived_for_the_deploy(bundles: dict[str, Path]) -> None:
    """``fleet deploy ./dir/`` ships a .tar.gz of the directory, verified as
    a device will open it, and removes it afterwards."""
    from edge_agent.bundles import open_bundle, sha256_file

    prepared = f.prepare_bundle(bundles["v1"])
    try:
        assert prepared.temporary and prepared.archive.name == "clf-1.tar.gz"
        assert (prepared.model, prepared.version) == ("clf", 1)
        assert prepared.sha256 == sha256_file(prepared.archive) and prepared.size == prepared.archive.stat().st_size
        with open_bundle(prepared.archive) as shipped, open_bundle(bundles["v1"]) as original:
            assert shipped.manifest == original.manifest
    finally:
        prepared.cleanup()
    assert not prepared.archive.exists()
