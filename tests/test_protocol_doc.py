"""The worked examples of docs/protocol.md are run as written (host, port
and the served file substituted) against a real agent and a real mosquitto,
and the replies are checked against the ones the page shows."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shlex
import subprocess
import threading
from pathlib import Path

import pytest

from edge_agent.bundle import sha256_file
from lifecycle_helpers import make_bundle
from mqtt_helpers import AgentProcess, Client, Mosquitto

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def examples() -> tuple[list[str], list[dict]]:
    text = DOC.read_text()
    block = text.split("<!-- protocol-examples -->", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    replies = re.search(r"```\n(.*?)```", block.split("The replies, in order", 1)[1], re.S).group(1)
    lines = [ln for ln in commands.splitlines() if ln.startswith("mosquitto_pub")]
    expected = []
    for ln in replies.splitlines():
        m = re.match(r'\S+ \{"id":"([^"]+)","ok":(true|false)(?:.*"code":"([a-z_]+)")?', ln)
        expected.append({"id": m.group(1), "ok": m.group(2) == "true", "code": m.group(3)})
    return lines, expected


def test_the_worked_examples_of_protocol_md(tmp_path: Path, assets: dict[str, Path]) -> None:
    lines, expected = examples()
    assert len(lines) == len(expected) >= 10
    broker = Mosquitto(tmp_path / "broker")
    v1 = make_bundle(tmp_path / "b", 1, name="classifier")
    v2 = make_bundle(tmp_path / "www", 2, name="classifier", archive=True)
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(v2.parent)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{v2.name}"
    cam = assets["demo_video"]  # the real camera-like video, looped
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""device_id = "cam-01"
groups = ["lobby"]
[mqtt]
host = "{broker.host}"
port = {broker.port}
[store]
path = "{tmp_path}/store"
[[models]]
name = "classifier"
bundle = "{v1}"
threads = 1
probation_s = 0.3
[[sources]]
name = "front"
uri = "{cam}"
model = "classifier"
loop = true
source_fps = 20
""")
    agent = AgentProcess(cfg)
    client = Client(broker.host, broker.port, ["edge/#"])
    try:
        client.wait_for(lambda: any(s.get("state") == "online" for s in client.json("cam-01/status")), 60)
        for line, want in zip(lines, expected):
            if want["id"] == "ex-remove":  # version 2 must have passed its probation to free version 1
                def passed() -> bool:
                    names = [(e["event"], e.get("reason")) for e in client.json("cam-01/events")]
                    after = names[names.index(("activated", "command ex-activate")) + 1:]
                    return any(event == "probation_passed" for event, _ in after)

                client.wait_for(passed)
            line = (line.replace("-h mqtt.lan", f"-h {broker.host} -p {broker.port}")
                    .replace("http://files.lan/classifier-2.tar.gz", url)
                    .replace('"SHA256"', json.dumps(sha256_file(v2))).replace("SIZE", str(v2.stat().st_size)))
            subprocess.run(shlex.split(line), check=True, timeout=10)
            reply = client.reply(want["id"], timeout=60)
            assert reply["ok"] == want["ok"], (line, reply)
            if want["code"]:
                assert reply["error"]["code"] == want["code"]
        assert agent.proc.poll() is None
    finally:
        client.close()
        agent.stop()
        httpd.shutdown()
        broker.stop()
