"""The MQTT control plane against a real mosquitto and the real agent
(`edge-agent run` as a subprocess): every command, malformed commands, the
last will, a broker restart with store-and-forward, commands queued while the
device was away, deploys by file and http URL, and TLS with client
certificates. Driven by `mosquitto_pub`/`mosquitto_sub` and by a paho client."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from edge_agent.bundles import sha256_file
from lifecycle_helpers import frames, make_bundle
from mqtt_helpers import AgentProcess, Client, Mosquitto, agent_config, make_certs
from waiting import let_time_pass

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path, assets: dict[str, Path]):
    broker = Mosquitto(tmp_path / "broker")
    prefix = f"t{uuid.uuid4().hex[:6]}"
    v1 = make_bundle(tmp_path / "b", 1)
    cam = assets["demo_video"]  # the real camera-like video, looped
    yield broker, prefix, v1, cam, tmp_path
    broker.stop()


def start_agent(tmp_path: Path, broker: Mosquitto, prefix: str, v1: Path, cam: Path | None, *, device: str = "dev1",
                groups: list[str] = ("lobby",), extra: str = "", mqtt_extra: str = "", watch: Client | None = None,
                tls: dict | None = None) -> tuple[AgentProcess, Client]:
    cfg = agent_config(tmp_path, broker.host, broker.port, prefix=prefix, device=device, bundle=v1, frames=cam,
                       groups=list(groups), extra=extra, mqtt_extra=mqtt_extra)
    agent = AgentProcess(cfg)
    client = watch or Client(broker.host, broker.port, [f"{prefix}/#"], tls=tls)
    try:
        client.wait_for(lambda: any(s.get("state") == "online" for s in client.json(f"{device}/status")), 60)
    except AssertionError:
        agent.stop()
        raise AssertionError(agent.output()[-3000:])
    return agent, client


def pub(broker: Mosquitto, topic: str, message: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic, "-m", message],
                   check=True, timeout=10)


class SubOne:
    """`mosquitto_sub -C 1`: the next message on ``topic``. Returns once the
    broker acknowledged the subscription (``-d`` prints ``Subscribed (mid...``),
    so a command sent afterwards cannot be answered before it listens."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        # stdbuf: mosquitto_sub's stdout is a pipe, fully buffered without it.
        self.proc = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", broker.host, "-p", str(broker.port),
                                      "-q", "1", "-t", topic, "-C", "1", "-W", "30"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # ends by -W 30 at the latest
            seen.append(line)
            if line.startswith("Subscribed (mid"):
                return
        raise AssertionError(f"mosquitto_sub did not subscribe (exit {self.proc.wait(10)}): {''.join(seen)}")

    def message(self, timeout: float = 40) -> str:
        """The message, without the debug lines (``Client ...``) around it."""
        code = self.proc.wait(timeout)
        out = self.proc.stdout.read()
        assert code == 0, f"mosquitto_sub exited {code}: {out}"
        lines = [line for line in out.splitlines() if not line.startswith("Client ")]
        assert lines, f"mosquitto_sub printed no message: {out}"
        return "\n".join(lines)


def test_commands_and_malformed_commands_with_mosquitto_clients(env) -> None:
    broker, prefix, v1, cam, tmp = env
    agent, client = start_agent(tmp, broker, prefix, v1, cam, extra="[commands]\nmax_payload = 2048\n")
    cmd, reply = f"{prefix}/dev1/cmd", f"{prefix}/dev1/reply"
    try:
        cases = [
            ('{"id": "p1", "cmd": "ping"}', {"id": "p1", "ok": True, "result": {"pong": True}}),
            ("{not json", None),
            ('{"id": "u1", "cmd": "reboot", "args": {}}', None),
            ('{"id": "a1", "cmd": "activate", "args": {"model": "clf", "version": "2"}}', None),
            ('[1, 2]', None),
        ]
        codes = []
        for message, want in cases:
            sub = SubOne(broker, reply)
            pub(broker, cmd, message)
            got = json.loads(sub.message())
            if want is not None:
                assert got == want
            else:
                codes.append((got["id"], got["error"]["code"]))
        assert codes == [(None, "bad_json"), ("u1", "unknown_command"), ("a1", "bad_args"), (None, "bad_command")]
        sub = SubOne(broker, reply)
        pub(broker, cmd, json.dumps({"id": "big", "cmd": "ping", "args": {"pad": "x" * 3000}}))
        big = json.loads(sub.message())
        assert big["error"]["code"] == "payload_too_large"
        # status: the same object as the status topic
        sid = client.command(cmd, "status")
        status = client.reply(sid)["result"]
        assert status["state"] == "online" and status["models"]["clf"]["active"] == 1
        assert status["device_id"] == "dev1" and status["groups"] == ["lobby"]
        # group and all topics reach the device
        gid = client.command(f"{prefix}/groups/lobby/cmd", "ping")
        aid = client.command(f"{prefix}/all/cmd", "ping")
        assert client.reply(gid)["ok"] and client.reply(aid)["ok"]
        # a repeated id is answered again and not executed twice
        v2 = make_bundle(tmp / "b", 2)
        first = client.command(cmd, "deploy", {"model": "clf", "version": 2, "url": v2.as_uri() + "/", "sha256": "0" * 64,
                                               "size": 1})
        assert client.reply(first)["error"]["code"] == "bad_args"  # sha256/size of an archive, not a directory
        archive = make_bundle(tmp / "b2", 2, archive=True)
        args = {"model": "clf", "version": 2, "url": archive.as_uri(), "sha256": sha256_file(archive),
                "size": archive.stat().st_size}
        did = client.command(cmd, "deploy", args)
        r1 = client.reply(did)
        assert r1["ok"] and r1["result"]["active"] == 2, r1
        client.command(cmd, "deploy", args, cmd_id=did)
        r2 = client.reply(did, index=1)
        assert r2 == r1
        events = [e for e in client.json("dev1/events") if e.get("id") == did]
        assert [e["event"] for e in events].count("deploy_started") == 1
        assert {"deploy_started", "deploy_progress", "deploy_done"} <= {e["event"] for e in events}
        # the retained status follows the change
        client.wait_for(lambda: client.json("dev1/status")[-1]["models"]["clf"]["active"] == 2)
        assert agent.proc.poll() is None  # nothing above took it down
    finally:
        client.close()
        assert agent.stop() == 0


def test_lifecycle_commands_set_and_telemetry(env) -> None:
    broker, prefix, v1, cam, tmp = env
    agent, client = start_agent(tmp, broker, prefix, v1, cam)
    cmd = f"{prefix}/dev1/cmd"
    try:
        archive = make_bundle(tmp / "b2", 2, archive=True)
        served = tmp / "www"
        served.mkdir()
        (served / archive.name).write_bytes(archive.read_bytes())
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{archive.name}"
        bad = client.command(cmd, "deploy", {"model": "clf", "version": 2, "url": url, "sha256": "1" * 64,
                                             "size": archive.stat().st_size})
        assert client.reply(bad)["error"]["code"] == "checksum_mismatch"
        good = client.command(cmd, "deploy", {"model": "clf", "version": 2, "url": url,
                                              "sha256": sha256_file(archive), "size": archive.stat().st_size})
        assert client.reply(good)["result"]["active"] == 2
        httpd.shutdown()
        client.wait_for(lambda: any(e["event"] == "probation_passed" for e in client.json("dev1/events")))
        rb = client.command(cmd, "rollback", {"model": "clf"})
        assert client.reply(rb)["result"]["version"] == 1
        rm = client.command(cmd, "remove", {"model": "clf", "version": 1})
        assert client.reply(rm)["error"]["code"] == "version_active"
        act = client.command(cmd, "activate", {"model": "clf", "version": 2})
        assert client.reply(act)["result"]["version"] == 2
        # set: publish one result in 10
        n0 = len(client.json("dev1/results/cam"))
        let_time_pass(1.0, "results flow for a second at the source's rate")
        rate_before = len(client.json("dev1/results/cam")) - n0
        st = client.command(cmd, "set", {"source": "cam", "results": {"every": 10}, "fps": 10.0})
        assert client.reply(st)["result"]["sources"]["cam"]["results"]["every"] == 10
        n1 = len(client.json("dev1/results/cam"))
        let_time_pass(2.0, "two seconds at the new rate: at most a third as many results")
        assert len(client.json("dev1/results/cam")) - n1 <= max(4, rate_before // 3)
        unknown = client.command(cmd, "set", {"source": "nope", "fps": 1.0})
        assert client.reply(unknown)["error"]["code"] == "unknown_source"
        # telemetry: CONTRACT fields, seq one by one
        tel = client.wait_for(lambda: client.json("dev1/telemetry")[-3:] if len(client.json("dev1/telemetry")) >= 3 else None)
        for key in ("ts", "seq", "uptime_s", "cpu_percent", "mem_percent", "rss_mb", "temp_c", "disk_free_mb",
                    "sources", "models"):
            assert key in tel[-1]
        assert [t["seq"] for t in tel] == list(range(tel[0]["seq"], tel[0]["seq"] + 3))
        assert set(tel[-1]["sources"]["cam"]["latency_ms"]) == {"p50", "p95", "p99"}
        assert "spool_dropped" not in tel[-1]  # an extension, present only after a loss
    finally:
        client.close()
        agent.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_last_will_after_kill9_and_commands_queued_while_away(env, protocol: str) -> None:
    """MQTT 5 (clean start off, session expiry) and 3.1.1 (clean session off)
    both keep the device's session, so a command sent while it is down
    arrives when it is back."""
    broker, prefix, v1, cam, tmp = env
    proto = f'protocol = "{protocol}"\n'
    agent, client = start_agent(tmp, broker, prefix, v1, None, mqtt_extra=proto)
    try:
        agent.kill9()
        client.wait_for(lambda: client.json("dev1/status")[-1] == {"state": "offline"}, 15)
        # a QoS 1 command sent while the device is down waits in its session
        cid = client.command(f"{prefix}/dev1/cmd", "ping")  # acknowledged: the broker holds it
        agent, _ = start_agent(tmp, broker, prefix, v1, None, watch=client, mqtt_extra=proto)
        assert client.reply(cid)["result"] == {"pong": True}
        # a clean stop publishes "stopped", retained
        assert agent.stop() == 0
        client.wait_for(lambda: client.json("dev1/status")[-1].get("state") == "stopped")
    finally:
        client.close()
        agent.stop()


def test_broker_restart_store_and_forward_keeps_every_telemetry(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    prefix = "sf"
    v1 = make_bundle(tmp_path / "b", 1)
    cam = frames(tmp_path / "frames")
    watcher = Client(broker.host, broker.port, [f"{prefix}/dev1/telemetry"], client_id="sf-watcher", persistent=True)
    agent, client = start_agent(tmp_path, broker, prefix, v1, cam)
    try:
        watcher.wait_for(lambda: len(watcher.json("telemetry")) >= 3)
        broker.stop()
        let_time_pass(3.0, "the broker stays down while ~6 telemetry messages go to the spool")
        broker.start()
        before = watcher.json("telemetry")[-1]["seq"]
        watcher.wait_for(lambda: watcher.json("telemetry")[-1]["seq"] >= before + 10, 40)
        seqs = [t["seq"] for t in watcher.json("telemetry")]
        unique = sorted(set(seqs))
        assert unique == list(range(unique[0], unique[-1] + 1)), f"gap in {seqs}"
        watcher.wait_for(lambda: "store-and-forward: replayed" in agent.output())
    finally:
        watcher.close()
        client.close()
        agent.stop()
        broker.stop()


def test_username_and_password(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"dev1": "s3cret", "console": "c0nsole"})
    v1 = make_bundle(tmp_path / "b", 1)
    watch = Client(broker.host, broker.port, ["auth/#"], auth=("console", "c0nsole"))
    agent, client = start_agent(tmp_path, broker, "auth", v1, None, watch=watch,
                                mqtt_extra='username = "dev1"\npassword = "s3cret"\n')
    try:
        cid = client.command("auth/dev1/cmd", "ping")
        assert client.reply(cid)["result"] == {"pong": True}
    finally:
        agent.stop()
    # A wrong password: refused by the broker, said in the log, the agent keeps serving.
    bad = agent_config(tmp_path, broker.host, broker.port, prefix="auth", device="dev2", bundle=v1,
                       frames=frames(tmp_path / "frames"), mqtt_extra='username = "dev1"\npassword = "wrong"\n')
    agent = AgentProcess(bad)
    try:
        client.wait_for(lambda: "refused the connection" in agent.output() and "edge_agent.results" in agent.output())
        assert agent.proc.poll() is None
    finally:
        client.close()
        agent.stop()
        broker.stop()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    broker = Mosquitto(tmp_path / "broker", tls=certs["broker"])
    c = certs["client"]
    v1 = make_bundle(tmp_path / "b", 1)
    mqtt_tls = f'[mqtt.tls]\nca_certs = "{c["ca"]}"\ncertfile = "{c["cert"]}"\nkeyfile = "{c["key"]}"\n'
    agent, client = start_agent(tmp_path, broker, "tls", v1, None, mqtt_extra=mqtt_tls, tls=c)
    try:
        cid = client.command("tls/dev1/cmd", "ping")
        assert client.reply(cid)["result"] == {"pong": True}
    finally:
        client.close()
        agent.stop()
        broker.stop()
