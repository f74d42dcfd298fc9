"""``edge-agent models``: the same commands with the agent stopped (the store
directly) and running (through its control socket)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.comms.local import agent_listening
from lifecycle_helpers import agent_toml, frames, make_bundle
from waiting import let_time_pass, wait_until

pytestmark = pytest.mark.integration



def ea(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args, "--config", str(root / "agent.toml")],
                          cwd=root, capture_output=True, text=True, timeout=120)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for v in (1, 2, 3):
        make_bundle(tmp_path / "b", v)
    frames(tmp_path / "frames")
    (tmp_path / "agent.toml").write_text(agent_toml("cli", store={"keep_versions": 5}, probation_s=4.0))
    return tmp_path


def listing(root: Path) -> dict:
    out = ea(root, "models", "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_models_cli_with_the_agent_stopped(root: Path) -> None:
    assert "no versions installed" in ea(root, "models", "list").stdout
    assert ea(root, "models", "add", "b/clf-v1").returncode == 0
    out = ea(root, "models", "add", "b/clf-v2", "--activate")
    assert out.returncode == 0 and "activated; active: 2" in out.stdout
    assert ea(root, "models", "add", "b/clf-v3").returncode == 0
    st = listing(root)
    assert not st["running"] and st["models"]["clf"]["versions"] == [1, 2, 3] and st["models"]["clf"]["active"] == 2
    table = ea(root, "models", "list").stdout
    assert "agent stopped" in table and "active, last-good" in table
    out = ea(root, "models", "remove", "clf", "2")
    assert out.returncode == 1 and "version_active" in out.stderr and "Traceback" not in out.stderr
    out = ea(root, "models", "activate", "clf", "9")
    assert out.returncode == 2 and "version_not_found" in out.stderr
    out = ea(root, "models", "add", "b/does-not-exist")
    assert out.returncode == 2
    assert ea(root, "models", "activate", "clf", "3").returncode == 0
    out = ea(root, "models", "rollback", "clf")
    assert out.returncode == 0 and "from version 3 to 2" in out.stdout
    assert ea(root, "models", "remove", "clf", "1").returncode == 0
    assert listing(root)["models"]["clf"]["versions"] == [2, 3]


def test_models_cli_through_the_running_agent(root: Path) -> None:
    assert ea(root, "models", "add", "b/clf-v1", "--activate").returncode == 0
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(root / "agent.toml")],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def listening() -> bool:
            if agent_listening(root / "store" / "agent.sock"):
                return True
            assert agent.poll() is None
            return False

        wait_until(listening, 60, "the agent listens on its socket", interval=0.1)
        out = ea(root, "models", "add", "b/clf-v2", "--activate")
        assert out.returncode == 0 and "active: 2" in out.stdout, out.stderr
        st = listing(root)
        assert st["running"] and st["models"]["clf"]["active"] == 2
        assert st["models"]["clf"]["probation"]["version"] == 2  # the running agent watches it
        wait_until(lambda: listing(root)["models"]["clf"]["last_good"] == 2, 60,  # probation (4 s) passes
                   "version 2 passed its probation", interval=0.5)
        out = ea(root, "models", "activate", "clf", "1")
        assert out.returncode == 0 and "availability swap" in out.stdout
        assert ea(root, "models", "add", "b/clf-v3", "--activate").returncode == 0
        out = ea(root, "models", "rollback", "clf")
        assert out.returncode == 0 and "from version 3 to" in out.stdout
        out = ea(root, "models", "remove", "clf", str(listing(root)["models"]["clf"]["active"]))
        assert out.returncode == 1 and "version_active" in out.stderr
        assert agent.poll() is None  # errors never take the agent down
    finally:
        agent.terminate()
        assert agent.wait(30) == 0
    st = listing(root)
    assert not st["running"]


def test_local_control_socket_answers_and_stops_at_once(tmp_path: Path) -> None:
    """The socket's loop polls only every 30 s (an idle agent should not
    wake for nothing), so stopping must wake it: the agent's shutdown may
    not wait for the next poll. Requests before the stop are answered."""
    from edge_agent.comms.local import LocalSocketServer, request

    server = LocalSocketServer(tmp_path / "agent.sock", lambda payload, origin: {"ok": True, "echo": len(payload)})
    server.start()
    assert agent_listening(tmp_path / "agent.sock")
    assert request(tmp_path / "agent.sock", "ping")["ok"] is True
    let_time_pass(0.3, "the loop is now inside its 30 s select()")
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2.0
    assert not (tmp_path / "agent.sock").exists()
    assert not agent_listening(tmp_path / "agent.sock")
