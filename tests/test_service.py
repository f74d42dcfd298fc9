"""The agent as a systemd service: the notify protocol over a real datagram
socket, the watchdog that stops pinging when a part of the agent stops
making progress, SIGHUP reload without unloading models, JSON logs and the
``EDGE_AGENT_CONFIG`` environment variable.

systemd itself is not running here, so each test plays its part: it binds
the ``NOTIFY_SOCKET`` and reads what the agent tells it, as systemd would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from edge_agent.cli import main
from edge_agent.logs import JsonFormatter
from edge_agent.service import Notifier, Supervisor, _watchdog_usec
from waiting import let_time_pass, poll_until


class NotifyListener:
    """systemd's end of ``NOTIFY_SOCKET``: collects every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float, after: int = 0) -> dict[str, str]:
        """The first message at index >= ``after`` carrying ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            for _, fields in self.messages[after:]:
                if key in fields:
                    return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key} within {timeout} s; got {[m for _, m in self.messages]}")
            self.poll(0.1)

    def times(self, key: str) -> list[float]:
        return [t for t, fields in self.messages if key in fields]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path):
    made = NotifyListener(tmp_path / "notify.sock")
    yield made
    made.close()


# -- the protocol -------------------------------------------------------------


def test_notifier_sends_each_call_as_one_datagram(listener: NotifyListener) -> None:
    """systemd reads one datagram per notification; fields of one call must
    arrive together (READY with its STATUS), newlines in a status must not
    split it into bogus fields."""
    n = Notifier({"NOTIFY_SOCKET": listener.path})
    n.ready("model v1 | cam 5.0 fps")
    n.status("two\nlines")
    n.watchdog()
    n.stopping()
    listener.poll(0.3)
    got = [m for _, m in listener.messages]
    assert got == [
        {"READY": "1", "STATUS": "model v1 | cam 5.0 fps"},
        {"STATUS": "two lines"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]


def test_notifier_reaches_an_abstract_socket() -> None:
    """systemd may hand out an abstract socket ('@' first)."""
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails(caplog) -> None:
    n = Notifier({})
    assert not n.enabled and n.send("READY=1") is False
    n.ready("x")
    n.watchdog()
    # and a socket that has gone away is a warning, once, never an exception
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    with caplog.at_level(logging.WARNING):
        assert gone.send("READY=1") is False
        assert gone.send("READY=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_watchdog_usec_is_read_only_when_meant_for_this_process() -> None:
    assert _watchdog_usec({"WATCHDOG_USEC": "30000000"}) == 30_000_000
    assert _watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30_000_000
    assert _watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert _watchdog_usec({"WATCHDOG_USEC": "junk"}) is None
    assert _watchdog_usec({}) is None


def test_a_slow_start_asks_systemd_for_more_time_within_a_limit(listener: NotifyListener) -> None:
    """Loading a big model from an SD card can outlast TimeoutStartSec: the
    agent asks for more time while it starts, but not for ever."""
    from edge_agent.service import StartupExtender

    notifier = Notifier({"NOTIFY_SOCKET": listener.path})
    with StartupExtender(notifier, every_s=0.1, limit_s=0.55):
        listener.poll(1.0)
    got = [m for _, m in listener.messages]
    assert got[0] == {"STATUS": "starting: verifying and loading models, opening sources"}
    extends = [int(m["EXTEND_TIMEOUT_USEC"]) for m in got if "EXTEND_TIMEOUT_USEC" in m]
    assert 3 <= len(extends) <= 6  # every 0.1 s until the 0.55 s limit, then no more
    assert all(0 < usec <= 200_000 for usec in extends)
    with StartupExtender(Notifier({})):  # without systemd: nothing, no thread
        pass


# -- logs and the command line --------------------------------------------------


def test_json_log_lines_are_one_object_each_with_the_exception() -> None:
    """Loki and Elasticsearch take one JSON object per line; a traceback
    stays inside its record instead of spilling over many lines."""
    logger = logging.getLogger("edge_agent.test")
    try:
        raise ValueError("bad frame")
    except ValueError:
        record = logger.makeRecord("edge_agent.test", logging.ERROR, __file__, 1, "source %s: %d\nerrors",
                                   ("cam", 3), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["logger"] == "edge_agent.test"
    assert entry["message"] == "source cam: 3\nerrors"
    assert "ValueError: bad frame" in entry["exc"]
    assert entry["ts"].endswith("+00:00")


def test_edge_agent_config_is_the_environment_form_of_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "from-env"\n')
    runner = CliRunner()
    result = runner.invoke(main, ["validate-config"], env={"EDGE_AGENT_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert "from-env" in result.output
    # --config still wins over the variable
    other = tmp_path / "other.toml"
    other.write_text('device_id = "from-option"\n')
    result = runner.invoke(main, ["validate-config", "--config", str(other)], env={"EDGE_AGENT_CONFIG": str(config)})
    assert "from-option" in result.output
    for args in (["run", "--help"], ["models", "list", "--help"], ["validate-config", "--help"]):
        assert "EDGE_AGENT_CONFIG" in runner.invoke(main, args).output, args
    assert "EDGE_FLEET_HOST" in runner.invoke(main, ["fleet", "status", "--help"]).output


def test_run_refuses_a_bad_log_format(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[logging]\nformat = "xml"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "logging.format" in result.output


# -- the real agent -------------------------------------------------------------


def _config_text(bundle: Path, sources: str, extra: str = "") -> str:
    return f"""
device_id = "svc"
{extra}
[store]
path = "store"

[[models]]
name = "mobilenet_v2"
bundle = "{bundle}"
threads = 1
{sources}
"""


def _video_source(name: str, video: Path, fps: float = 5, more: str = "") -> str:
    return f"""
[[sources]]
name = "{name}"
uri = "{video}"
model = "mobilenet_v2"
fps = {fps}
loop = true
{more}
"""


@pytest.mark.integration
def test_ready_status_watchdog_reload_and_stop_as_systemd_sees_them(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets
) -> None:
    """The whole conversation with systemd, from a real `edge-agent run`:
    READY only after the model serves and every source has opened or is
    retrying (STATUS says which), pings at WATCHDOG_USEC/2, RELOADING/READY
    around SIGHUP, STOPPING on SIGTERM; every log line is JSON."""
    config = tmp_path / "agent.toml"
    sources = _video_source("cam", assets["demo_video"]) + """
[[sources]]
name = "dead"
uri = "rtsp://127.0.0.1:9/nothing-listens-here"
model = "mobilenet_v2"
stall_timeout_s = 2
"""
    config.write_text(_config_text(mobilenet_bundle, sources))
    env = dict(os.environ, NOTIFY_SOCKET=listener.path, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--log-format", "json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = listener.wait_for("READY", 60)
        ready_at = listener.times("READY")[0]
        assert "mobilenet_v2 v1" in ready["STATUS"]
        assert "dead retrying" in ready["STATUS"], ready
        listener.wait_for("WATCHDOG", 5)
        listener.poll(3)
        # a status with the measured rate, once the rate meter has a window
        status = listener.wait_for("STATUS", 10, after=1)
        assert "cam" in status["STATUS"]
        pings = [t for t in listener.times("WATCHDOG") if t > ready_at]
        assert len(pings) >= 4
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.75  # every WATCHDOG_USEC / 2, with slack

        # SIGHUP with a new fps for cam: RELOADING then READY again
        config.write_text(_config_text(mobilenet_bundle, _video_source("cam", assets["demo_video"], fps=2)))
        seen = len(listener.messages)
        proc.send_signal(signal.SIGHUP)
        assert "MONOTONIC_USEC" in listener.wait_for("RELOADING", 10, after=seen)
        listener.wait_for("READY", 10, after=seen)

        seen = len(listener.messages)
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING", 20, after=seen)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # Every log record is one JSON line (OpenCV's FFmpeg back end writes its
    # own warnings about the dead stream to stderr, outside logging).
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert any("serving" in m for m in messages)
    assert any(m.startswith("reloaded") and "source cam: fps 2.0" in m and "source dead removed" in m
               for m in messages), messages
    assert not any(e["level"] == "error" and "Traceback" in e.get("exc", "") for e in entries)


class _BlockingSource:
    """A camera whose read never returns after ``frames`` frames, as a V4L2
    driver or a dead network stream without a time-out does."""

    def __init__(self, cfg, photo: Path, frames: int) -> None:
        from edge_agent.sources.base import FrameSource

        image = cv2.imread(str(photo))
        release = threading.Event()

        class Stuck(FrameSource):
            live = True

            def _open(self) -> None:
                self.n = 0

            def _grab(self):
                self.n += 1
                if self.n > frames:
                    release.wait()
                let_time_pass(0.02, "a live camera's frame interval")
                return image

        self.source = Stuck(cfg)
        self.release = release


def _agent(tmp_path: Path, bundle: Path, sources: str, *, extra: str = "", sinks=None):
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text(_config_text(bundle, sources, extra))
    return Agent(load_config(path), extra_sinks=sinks), path


def _supervise(agent, listener: NotifyListener, stall_s: float) -> Supervisor:
    notifier = Notifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "200000"})
    return Supervisor(agent, notifier, stall_s=stall_s, status_line=lambda: "test")


def _pings_in(listener: NotifyListener, seconds: float) -> int:
    before = len(listener.times("WATCHDOG"))
    listener.poll(seconds)
    return len(listener.times("WATCHDOG")) - before


@pytest.mark.integration
def test_watchdog_pings_stop_while_a_source_read_blocks_and_resume_after(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets, monkeypatch, caplog
) -> None:
    """A read that never returns is what the agent cannot heal itself: the
    pings stop (systemd restarts the agent) and the log names the source
    and the call it is stuck in."""
    import edge_agent.agent as agent_module

    made: dict[str, _BlockingSource] = {}

    def fake_open(cfg):
        made[cfg.name] = _BlockingSource(cfg, assets["photos"] / "chelsea.jpg", frames=5)
        return made[cfg.name].source

    monkeypatch.setattr(agent_module, "open_source", fake_open)
    agent, _ = _agent(tmp_path, mobilenet_bundle, """
[[sources]]
name = "usb"
uri = "/dev/video9"
model = "mobilenet_v2"
stall_timeout_s = 0.2
""")
    supervisor = _supervise(agent, listener, stall_s=1.0)
    agent.start()
    supervisor.start()
    try:
        assert _pings_in(listener, 0.6) >= 2
        with caplog.at_level(logging.ERROR, logger="edge_agent.service"):
            deadline = time.monotonic() + 10
            while not supervisor.stalls and time.monotonic() < deadline:
                listener.poll(0.1)
            assert supervisor.stalls, "the blocked read was never noticed"
            assert _pings_in(listener, 1.0) == 0
        assert "source usb: capture thread stuck in read" in caplog.text
        assert "systemd will restart the agent" in caplog.text
        made["usb"].release.set()
        deadline = time.monotonic() + 5
        while supervisor.stalls and time.monotonic() < deadline:
            listener.poll(0.1)
        assert _pings_in(listener, 0.6) >= 2
    finally:
        made["usb"].release.set()
        supervisor.stop()
        agent.shutdown()


class _StuckSink:
    """A result sink whose third result never returns: the frame's
    processing never ends, as an inference stuck in a driver would."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def emit(self, source: str, result: dict) -> None:
        self.calls += 1
        if self.calls == 3:
            self.release.wait()


@pytest.mark.integration
def test_watchdog_pings_stop_when_a_frame_never_finishes(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets, caplog
) -> None:
    sink = _StuckSink()
    agent, _ = _agent(tmp_path, mobilenet_bundle, _video_source("cam", assets["demo_video"], fps=20), sinks=[sink])
    supervisor = _supervise(agent, listener, stall_s=1.0)
    agent.start()
    supervisor.start()
    try:
        with caplog.at_level(logging.ERROR, logger="edge_agent.service"):
            deadline = time.monotonic() + 15
            while not supervisor.stalls and time.monotonic() < deadline:
                listener.poll(0.1)
            assert [str(s.part) for s in supervisor.stalls] == ["worker cam"]
            assert _pings_in(listener, 0.8) == 0
        assert "worker cam: stuck in processing a frame" in caplog.text
    finally:
        sink.release.set()
        supervisor.stop()
        agent.shutdown()


@pytest.mark.integration
def test_watchdog_pings_stop_when_a_worker_thread_dies(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets, caplog
) -> None:
    """A worker thread killed by a bug outside the per-frame guard is a dead
    camera nobody notices, unless the watchdog does."""
    agent, _ = _agent(tmp_path, mobilenet_bundle, _video_source("cam", assets["demo_video"]))
    supervisor = _supervise(agent, listener, stall_s=5.0)
    agent.start()
    caplog.set_level(logging.ERROR)
    try:
        source = agent.workers[0].source

        def broken(timeout=None):
            raise RuntimeError("a bug in the mailbox")

        source.next_frame = broken
        agent.workers[0].join(5)
        assert agent.workers[0].done
        with caplog.at_level(logging.ERROR, logger="edge_agent.service"):
            stalls = supervisor.check()
        assert [s.what for s in stalls] == ["inference thread died"]
        assert "source cam: the inference loop crashed" in caplog.text
        assert "RuntimeError: a bug in the mailbox" in caplog.text
        assert _pings_in(listener, 0.3) == 0
    finally:
        agent.shutdown()


# -- reload ---------------------------------------------------------------------


def _loaded_model(agent):
    with agent.models.acquire("mobilenet_v2") as model:
        return model


@pytest.mark.integration
def test_reload_applies_source_changes_without_unloading_the_model(
    tmp_path: Path, mobilenet_bundle: Path, assets
) -> None:
    from edge_agent.config import load_config

    video, photos = assets["demo_video"], assets["photos"]
    agent, path = _agent(tmp_path, mobilenet_bundle,
                         _video_source("a", video) + _video_source("b", video) + _video_source("c", video))
    agent.start()
    try:
        model = _loaded_model(agent)
        a, b, c = agent.workers
        path.write_text(_config_text(
            mobilenet_bundle,
            _video_source("a", video, fps=2, more="threshold = 0.3")  # live settings
            + _video_source("c", photos)  # a new input: restarted
            + _video_source("d", video),  # new
        ))
        changes = agent.reload(load_config(path))
        assert changes == ["source b removed", "source a: fps 2.0, threshold 0.3",
                           "source c restarted (uri changed)", "source d added"]
        names = [w.source.name for w in agent.workers]
        assert sorted(names) == ["a", "c", "d"]
        assert agent.workers[0] is a and a.fps == 2.0 and a.threshold == 0.3  # same worker, new settings
        assert c not in agent.workers and b not in agent.workers
        assert not b.source.capture_alive and b.done
        assert _loaded_model(agent) is model  # not unloaded, not reloaded
        poll_until(lambda: all(w.counters.frames for w in agent.workers), 10, interval=0.1)
        assert all(w.counters.frames for w in agent.workers)
    finally:
        agent.shutdown()


@pytest.mark.integration
def test_an_invalid_config_is_refused_whole_and_the_running_one_stays(
    tmp_path: Path, mobilenet_bundle: Path, assets, caplog
) -> None:
    from edge_agent.agent import _reload

    video = assets["demo_video"]
    agent, path = _agent(tmp_path, mobilenet_bundle, _video_source("a", video))
    agent.start()
    try:
        before = agent.config
        path.write_text(_config_text(mobilenet_bundle, _video_source("a", video, fps=2) + """
[[sources]]
name = "b"
uri = "0"
model = "mobilenet_v2"
fps = -1
bogus = 1
"""))
        notifier = Notifier({})
        with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
            _reload(agent, path, notifier)
        assert "reload refused, the running config stays: 2 problem(s)" in caplog.text
        assert "sources[1] (b).fps" in caplog.text and "sources[1] (b).bogus: unknown key" in caplog.text
        assert agent.config is before and agent.workers[0].fps == 5
        # a source naming a model the running agent does not serve: refused too
        path.write_text(_config_text(mobilenet_bundle, _video_source("a", video, fps=2)).replace(
            'model = "mobilenet_v2"\nfps', 'model = "other"\nfps') + '\n[[models]]\nname = "other"\n')
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
            _reload(agent, path, notifier)
        assert "'other' is not served by the running agent" in caplog.text
        assert agent.config is before and agent.workers[0].fps == 5
    finally:
        agent.shutdown()


@pytest.mark.integration
def test_reload_connects_to_a_broker_added_to_the_config(
    tmp_path: Path, mobilenet_bundle: Path, assets, broker
) -> None:
    """Adding [mqtt] (or changing the broker) applies without a restart:
    the device comes online on the new broker and results flow there."""
    from test_e2e import Subscriber

    from edge_agent.config import load_config

    video = assets["demo_video"]
    agent, path = _agent(tmp_path, mobilenet_bundle, _video_source("a", video))
    agent.start()
    sub = Subscriber(broker, "reload/svc/#")
    try:
        model = _loaded_model(agent)
        path.write_text(_config_text(mobilenet_bundle, _video_source("a", video), extra=f"""
[mqtt]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "reload"
"""))
        assert agent.reload(load_config(path)) == ["mqtt reconnected"]
        assert sub.wait_for(lambda: any(s["state"] == "online" for s in sub.on("/status")), 15)
        assert sub.wait_for(lambda: len(sub.on("/results/a")) >= 3, 15)
        assert _loaded_model(agent) is model
    finally:
        agent.shutdown()
        sub.close()


class _SlowFiles:
    """A local HTTP server for one file that holds its answer until released."""

    def __init__(self, path: Path) -> None:
        import http.server

        self.release = threading.Event()
        data, release = path.read_bytes(), self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                release.wait(30)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.mark.integration
def test_a_reload_that_reconnects_mqtt_loses_no_command(tmp_path: Path, mobilenet_bundle: Path, assets,
                                                        broker) -> None:
    """A deploy running and commands waiting when `systemctl reload` changes
    the MQTT settings: every one is answered, once, over the new connection."""
    from test_flood import Console

    from edge_agent.bundles import sha256_file
    from edge_agent.config import load_config
    from lifecycle_helpers import make_bundle

    v2 = make_bundle(tmp_path / "b", 2, name="mobilenet_v2", archive=True)
    files = _SlowFiles(v2)
    mqtt = f"""
[mqtt]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "flood"
telemetry_interval_s = {{interval}}

[commands]
workers = 1
"""
    agent, path = _agent(tmp_path, mobilenet_bundle, _video_source("a", assets["demo_video"]),
                         extra=mqtt.format(interval=10))
    agent.start()
    console = Console(broker, "svc")
    try:
        console.wait_online()
        assert console.ping_answered(10) is not None
        deploy = {"id": "dep-1", "cmd": "deploy", "args": {"model": "mobilenet_v2", "version": 2, "url": files.url,
                                                          "sha256": sha256_file(v2), "size": v2.stat().st_size}}
        console.client.publish("flood/svc/cmd", json.dumps(deploy), qos=1).wait_for_publish(5)
        poll_until(lambda: any(e.get("event") == "fetching" for e in console.on("/events")), 10, interval=0.05)
        for i in range(3):  # the only worker is busy: these wait
            console.client.publish("flood/svc/cmd", json.dumps({"id": f"q{i}", "cmd": "ping"}), qos=1).wait_for_publish(5)
        # Nothing outside the agent shows a command waiting in its queue.
        let_time_pass(0.3, "the pings reach the agent and wait behind the deploy")
        path.write_text(_config_text(mobilenet_bundle, _video_source("a", assets["demo_video"]),
                                     extra=mqtt.format(interval=5)))
        assert agent.reload(load_config(path)) == ["mqtt reconnected"]
        files.release.set()
        ids = {"dep-1", "q0", "q1", "q2"}
        assert console.wait_for(lambda: ids <= {r.get("id") for r in console.on("/reply")}, 30), console.on("/reply")
        replies = [r for r in console.on("/reply") if r.get("id") in ids]
        assert len(replies) == 4 and all(r["ok"] for r in replies), replies
    finally:
        files.close()
        agent.shutdown()
        console.close()


@pytest.mark.integration
def test_a_reload_whose_mqtt_files_are_missing_is_refused_and_stays_connected(
    tmp_path: Path, mobilenet_bundle: Path, assets, broker
) -> None:
    from test_flood import Console

    from edge_agent.agent import _reload

    mqtt = f'\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "flood"\n'
    agent, path = _agent(tmp_path, mobilenet_bundle, _video_source("a", assets["demo_video"]), extra=mqtt)
    agent.start()
    console = Console(broker, "svc")
    try:
        console.wait_online()
        assert console.ping_answered(10) is not None
        before = agent.config
        path.write_text(_config_text(mobilenet_bundle, _video_source("a", assets["demo_video"], fps=2),
                                     extra=mqtt + f'[mqtt.tls]\nca_certs = "{tmp_path}/missing-ca.pem"\n'))
        _reload(agent, path, Notifier({}))
        assert agent.config is before and agent.workers[0].fps == 5  # nothing applied
        assert console.ping_answered(10) is not None  # still connected
    finally:
        agent.shutdown()
        console.close()


@pytest.mark.integration
def test_a_slow_fps_is_not_a_stall_and_a_faster_fps_applies_at_once(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets
) -> None:
    """A time-lapse camera (one frame every 5 s) waits longer than the
    watchdog's stall_s between frames: that is not a stall. Raising its fps
    (`set`, reload) applies at once, not after the long wait."""
    agent, _ = _agent(tmp_path, mobilenet_bundle, _video_source("slow", assets["demo_video"], fps=0.2))
    supervisor = _supervise(agent, listener, stall_s=1.0)
    agent.start()
    try:
        worker = agent.workers[0]
        poll_until(lambda: worker.counters.frames >= 1, 10, interval=0.05)
        assert worker.counters.frames == 1
        for _ in range(25):  # 2.5 s into the 5 s wait, checked as the watchdog does
            assert supervisor.check() == []
            listener.poll(0.1)
        worker.fps = 20.0
        poll_until(lambda: worker.counters.frames >= 5, 1.5, interval=0.05)
        assert worker.counters.frames >= 5
    finally:
        agent.shutdown()


@pytest.mark.integration
def test_a_camera_whose_capture_thread_crashes_is_a_stall_and_a_failure(
    tmp_path: Path, listener: NotifyListener, mobilenet_bundle: Path, assets, monkeypatch
) -> None:
    """A bug or an OS error inside a camera's capture thread ends that
    thread: nothing would read the camera again, so the watchdog stops
    pinging and the source counts as failed (exit status 1)."""
    import edge_agent.agent as agent_module
    from edge_agent.sources.base import FrameSource

    class Crashing(FrameSource):
        live = True

        def _open(self) -> None:
            pass

        def _grab(self):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(agent_module, "open_source", lambda cfg: Crashing(cfg))
    agent, _ = _agent(tmp_path, mobilenet_bundle, '\n[[sources]]\nname = "usb"\nuri = "/dev/video9"\nmodel = "mobilenet_v2"\n')
    supervisor = _supervise(agent, listener, stall_s=5.0)
    agent.start()
    try:
        source = agent.sources[0]
        poll_until(lambda: source.state == "failed", 5)
        assert source.failed
        assert [(s.part, s.what) for s in supervisor.check()] == [("source usb", "capture thread crashed")]
    finally:
        agent.shutdown()
