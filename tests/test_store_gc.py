"""Garbage collection of the model store: versions that interrupted or failed
deploys leave behind are collected at start and after a failed deploy, within
``[store] keep_versions``, and never a version that is active, the rollback
target, labelled, or served by the version policy.

The interrupted deploys are real: ``edge-agent models add`` and a running
``edge-agent run`` killed with SIGKILL at a step of the deploy (the crash
injection of tests/test_crash.py), tiny real ONNX models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.comms.local import agent_listening
from edge_agent.config import load_config
from edge_agent.models.lifecycle import deploy
from edge_agent.models.manager import ModelManager
from edge_agent.models.state import ModelState
from edge_agent.models.store import ModelStore
from lifecycle_helpers import Running, agent_toml, config, frames, make_bundle, read_state
from waiting import poll_until, wait_until



def cli(root: Path, *args: str, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("EDGE_AGENT_CRASH_AT", None)
    if crash_at:
        env["EDGE_AGENT_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "edge_agent", *args, "--config", str(root / "agent.toml")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(proc: subprocess.Popen) -> None:
    assert proc.wait(60) == 0, proc.stderr.read()


def killed(proc: subprocess.Popen) -> None:
    assert proc.wait(60) == -signal.SIGKILL, proc.stderr.read()


def crash_agent_during_deploy(root: Path, bundle: Path) -> None:
    """Start the agent, deploy ``bundle`` through it, and let it die by
    SIGKILL once the new version's state (on probation) is written."""
    agent = cli(root, "run", crash_at="activate_after_state")
    try:
        def listening() -> bool:
            if agent_listening(root / "store" / "agent.sock"):
                return True
            assert agent.poll() is None, agent.stderr.read()
            return False

        wait_until(listening, 60, "the agent started (listens on its socket)", interval=0.1)
        add = cli(root, "models", "add", str(bundle), "--activate")
        assert add.wait(60) != 0  # the agent died under it
        killed(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


@pytest.mark.integration  # starts agents (`edge-agent run`) in a helper, out of conftest.py's sight
def test_versions_left_by_crashed_deploys_are_collected_at_start(tmp_path: Path) -> None:
    """Three deploys killed after their version was installed (never
    activated) and two killed while their version was on probation (failed
    at the next start), with ``keep_versions = 1``: the next start leaves the
    active version and the one old version rollback needs; rollback still
    goes back to v1."""
    root = tmp_path
    bundles = {v: make_bundle(root / "b", v, archive=v > 1) for v in range(1, 8)}
    frames(root / "frames")
    (root / "agent.toml").write_text(agent_toml("gc", bundle=bundles[1], store={"keep_versions": 1}, probation_s=3600,
                                                     probation_frames=100000))
    ok(cli(root, "models", "activate", "clf", "1"))  # installs v1
    ok(cli(root, "models", "add", str(bundles[2]), "--activate"))  # v2 active and last good; v1 the rollback target
    for v in (3, 4, 5):  # killed between the install and the activation
        killed(cli(root, "models", "add", str(bundles[v]), "--activate", crash_at="install_renamed"))
    for v in (6, 7):  # killed with the new version on probation: failed at the next start
        crash_agent_during_deploy(root, bundles[v])

    store = ModelStore(root / "store", keep_versions=1)
    manager = ModelManager(store, load_config(root / "agent.toml").models)
    manager.start()
    try:
        versions = store.versions("clf")
        status = manager.status()["clf"]
        assert status["active"] == 2 and status["last_good"] == 2
        assert "7" in status["failed"] or 7 not in versions
        # v2 (active, last good) and v1, the rollback target, kept as the one old version keep_versions allows
        assert versions == [1, 2]
        with manager.acquire("clf") as model:
            assert model.version == 2
        assert manager.rollback("clf")["version"] == 1
        with manager.acquire("clf") as model:
            assert model.version == 1
    finally:
        manager.stop()
    staging = root / "store" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_versions_that_fail_their_probation_are_collected_after_the_rollback(tmp_path: Path) -> None:
    """Three deploys in a row that fail their probation (inference errors on
    the camera's frames): each rollback collects, so with ``keep_versions =
    1`` the store holds v1 and the newest failed version, not all four."""
    bright = frames(tmp_path / "bright", bright=True)
    v1 = make_bundle(tmp_path / "b", 1)
    run = Running(config(tmp_path, v1, bright, probation_frames=50, store={"keep_versions": 1}))
    try:
        run.wait_results(5, version=1)
        for v in (2, 3, 4):
            bad = make_bundle(tmp_path / "b", v, fail_above=0.5)  # passes the grey smoke test, fails on bright frames
            assert deploy(run.models, bad)["active"] == v
            back = run.wait_event("rolled_back")
            assert back["version"] == v and back["to"] == 1
            run.events.clear()
        # the collection follows the rolled_back event
        poll_until(lambda: list(read_state(tmp_path)["failed"]) == ["4"], 10)
        assert run.models.store.versions("clf") == [1, 4]
        state = read_state(tmp_path)
        assert state["active"] == 1 and list(state["failed"]) == ["4"]
        assert [h["version"] for h in state["history"] if h["event"] == "removed"] == [2, 3]
        n = len(run.results())
        run.wait_results(n + 5, version=1)
    finally:
        run.stop()


def test_collection_never_removes_what_the_policy_serves_or_rollback_needs(tmp_path: Path) -> None:
    """``latest = 3`` keeps the two versions below the active one loaded;
    with ``keep_versions = 1`` collection must still leave them (and the
    rollback target), removing only what nothing needs."""
    bundles = [make_bundle(tmp_path / "b", v) for v in range(1, 6)]
    cfg = config(tmp_path, bundles[0], None, latest=3, store={"keep_versions": 1})
    manager = ModelManager(ModelStore(cfg.store.path, keep_versions=1), cfg.models, probation=False)
    manager.start()
    try:
        for bundle in bundles[1:]:
            deploy(manager, bundle)
        status = manager.status()["clf"]
        assert status["active"] == 5 and status["loaded"] == [3, 4, 5]
        # 5 active; 4 and 3 loaded by the policy (4 also the rollback target) stay, even beyond keep_versions
        assert manager.store.versions("clf") == [3, 4, 5]
        assert manager.rollback("clf")["version"] == 4
    finally:
        manager.stop()


@pytest.mark.parametrize(
    ("state", "keep", "collected"),
    [
        # nothing but the protected versions and keep_versions = 1 newest others
        (ModelState(active=6, last_good=6), set(), [1, 2, 3, 4]),
        # failed versions go first: the newest that did not fail is kept
        (ModelState(active=3, last_good=3, failed={5: "x", 6: "y"}), set(), [1, 2, 5, 6]),
        # labelled, and what the manager needs (counted in keep_versions, kept even beyond it)
        (ModelState(active=6, last_good=2, labels={"canary": 1}), {4}, [3, 5]),
        (ModelState(active=6, last_good=6), {2, 4}, [1, 3, 5]),
        # on probation, and the version before it
        (ModelState(active=6, last_good=2, probation={"version": 6, "since": 0.0, "previous": 4}), set(), [1, 3]),
    ],
)
def test_collectable_keeps_the_newest_good_versions(tmp_path: Path, state: ModelState, keep: set[int],
                                                    collected: list[int]) -> None:
    store = ModelStore(tmp_path / "store", keep_versions=1)
    for v in range(1, 7):
        store.path("clf", v).mkdir(parents=True)
    assert store.collectable("clf", state, keep) == collected
