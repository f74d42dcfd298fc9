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

from edge_agent.bundles import sha256_file
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


# Codes that never reach a command's reply, each with where it goes instead.
NOT_IN_REPLIES = {
    # defaults of base classes: every raise in the code names its own code
    "error": "EdgeAgentError's default", "bad_bundle": "BundleError's default",
    "deploy_failed": "DeployError's default", "store_error": "StoreError's default",
    # the command line, before or without a running agent (exit code 2 or 1)
    "bad_usage": "CLI", "bad_config": "CLI", "bad_key": "CLI, or the agent refusing to start",
    "key_exists": "edge-agent keygen", "bad_sample": "edge-agent pack", "bad_bench_input": "edge-agent bench",
    "agent_unreachable": "edge-agent models", "store_unusable": "start-up", "store_locked": "start-up",
    "no_sources": "start-up", "http_bind_failed": "start-up",
    # the fleet console's own outcomes (docs/fleet.md)
    "broker_refused": "fleet", "broker_unreachable": "fleet", "fleet_error": "fleet", "offline": "fleet",
    "publish_failed": "fleet", "serve_failed": "fleet", "timeout": "fleet",
    # frames and the HTTP API, not commands
    "source_failed": "sources", "model_not_available": "frames and HTTP",
    # the spool: logged and counted (telemetry's spool_dropped), never a reply
    "spool_full": "spool", "spool_failed": "spool",
    # `set` on an agent built without run-time settings (never the real agent)
    "unsupported_command": "tests",
}


def test_every_error_code_a_reply_can_carry_is_in_the_error_table() -> None:
    """A console author reads the table to handle each code; a code the
    code can send that the table does not list (``inference_failed`` was
    one) is a silent gap in the contract."""
    import ast

    package = Path(__file__).resolve().parent.parent / "edge_agent"
    codes: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "code":
                value = node.value
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                value = node.value
            else:
                continue
            for code in _literals(value):
                codes.setdefault(code, str(path.relative_to(package.parent)))
    table = DOC.read_text().split("### Error codes", 1)[1].split("\n\n", 2)[1]
    documented = {code for line in table.splitlines() if line.startswith("| `")
                  for code in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    missing = {code: where for code, where in codes.items() if code not in documented and code not in NOT_IN_REPLIES}
    assert not missing, f"error codes not in docs/protocol.md's table (code: file): {missing}"
    assert "inference_failed" in documented
    stale = sorted(code for code in NOT_IN_REPLIES if code not in codes)
    assert not stale, f"NOT_IN_REPLIES lists codes the code no longer has: {stale}"


def _literals(node) -> list[str]:
    """The code names an expression given as ``code=`` can be: a string, or
    either side of ``"a" if full else "b"`` / ``x or "b"``."""
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z][a-z_]+", node.value):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body) + _literals(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [code for value in node.values for code in _literals(value)]
    return []
