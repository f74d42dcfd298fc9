"""Model lifecycle on a running agent: deploy, verification, swap, labels,
probation and rollback. Real ONNX Runtime sessions on small models built in
code, real image files read by OpenCV, the real Agent and its pipeline."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundles import sha256_file
from edge_agent.bundles.signing import generate_keypair
from edge_agent.errors import BundleError, EdgeAgentError
from edge_agent.models.lifecycle import deploy, file_url
from edge_agent.models.store import StoreError
from lifecycle_helpers import Running, config, frames, make_bundle, read_state, rehash
from waiting import let_time_pass, poll_until


@pytest.fixture
def cam(tmp_path: Path) -> Path:
    return frames(tmp_path / "frames")


def test_deploy_by_file_url_swaps_without_a_failed_frame(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    run = Running(config(tmp_path, v1, cam, probation_frames=15))
    try:
        run.wait_results(10, version=1)
        steps = []
        result = deploy(run.models, file_url(v2), sha256=sha256_file(v2), size=v2.stat().st_size,
                        progress=lambda step, **kw: steps.append(step))
        assert result["active"] == 2 and result["installed"]
        assert result["activation"]["mode"] == "availability" and result["activation"]["gap_ms"] == 0.0
        assert steps == ["fetching", "verifying", "installing", "loading", "activating"]
        state = read_state(tmp_path)
        assert state["active"] == 2 and state["probation"]["version"] == 2 and state["last_good"] == 1
        run.wait_event("probation_passed")
        state = read_state(tmp_path)
        assert state["last_good"] == 2 and state["probation"] is None
        run.wait_results(20, version=2)
        assert run.errors() == 0
        versions = [r["version"] for r in run.results()]
        switch = versions.index(2)
        assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}  # one clean switch
        status = run.models.status()["clf"]
        assert status["active"] == 2 and status["versions"] == [1, 2] and status["loaded"] == [2]
    finally:
        run.stop()


def test_a_bundle_folder_is_hashed_on_opening_and_after_copying_only(tmp_path: Path, cam: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploying a bundle folder checks its files where they are and the copy
    in the store; loading the copy just checked does not hash them again."""
    import edge_agent.bundles.verify as bundle_module

    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    run = Running(config(tmp_path, v1, cam))
    hashed: list[str] = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(Path(path).suffix) or real(path))
    try:
        assert deploy(run.models, v2)["active"] == 2
        assert hashed.count(".onnx") == 2, hashed
        run.wait_results(len(run.results()) + 3, version=2)
    finally:
        run.stop()


def test_tampered_bundle_is_refused_and_the_old_version_keeps_serving(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    model = next(v2.glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    run = Running(config(tmp_path, v1, cam))
    try:
        run.wait_results(5)
        with pytest.raises(BundleError) as err:
            deploy(run.models, v2)
        assert err.value.code == "checksum_mismatch"
        assert run.models.store.versions("clf") == [1]
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert run.errors() == 0 and read_state(tmp_path)["active"] == 1
    finally:
        run.stop()


def test_archive_with_wrong_sha256_or_size_is_refused(tmp_path: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    run = Running(config(tmp_path, v1, None))
    try:
        with pytest.raises(EdgeAgentError) as err:
            deploy(run.models, v2, sha256="0" * 64)
        assert err.value.code == "checksum_mismatch"
        with pytest.raises(EdgeAgentError) as err:
            deploy(run.models, v2, size=v2.stat().st_size + 1)
        assert err.value.code == "size_mismatch"
        with pytest.raises(EdgeAgentError) as err:
            deploy(run.models, "https://example.invalid/b.tar.gz")
        assert err.value.code == "unsupported_url"
        with pytest.raises(EdgeAgentError) as err:
            deploy(run.models, v2, model="other")
        assert err.value.code == "name_mismatch"
        assert run.models.status()["clf"]["active"] == 1
    finally:
        run.stop()


def test_signatures_are_enforced_when_a_trust_key_is_configured(tmp_path: Path, cam: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "fleet.key", keys / "fleet.pub")
    generate_keypair(keys / "other.key", keys / "other.pub")
    v1 = make_bundle(tmp_path / "b", 1, sign_key=keys / "fleet.key")
    cfg = config(tmp_path, v1, cam, store={"trusted_keys": [str(keys / "fleet.pub")]})
    run = Running(cfg)
    try:
        run.wait_results(3)
        cases = {
            "untrusted_key": make_bundle(tmp_path / "b1", 2, sign_key=keys / "other.key"),
            "signature_missing": make_bundle(tmp_path / "b2", 2),
        }
        for code, bundle in cases.items():
            with pytest.raises(BundleError) as err:
                deploy(run.models, bundle)
            assert err.value.code == code
            assert run.models.status()["clf"]["active"] == 1
        assert run.models.store.versions("clf") == [1]
        good = make_bundle(tmp_path / "b3", 2, sign_key=keys / "fleet.key")
        assert deploy(run.models, good)["active"] == 2
        assert run.errors() == 0
    finally:
        run.stop()


def test_samples_that_do_not_reproduce_fail_the_smoke_test(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    images = sorted(cam.glob("*.png"))[:2]
    v2 = make_bundle(tmp_path / "b", 2, samples=images)
    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["samples"] == "samples.npz"
    run = Running(config(tmp_path, v1, cam))
    try:
        # The honest bundle passes: its outputs are reproduced on this machine.
        good = deploy(run.models, v2, activate=False)
        assert good["installed"] and run.models.status()["clf"]["active"] == 1
        run.models.remove("clf", 2)
        # Now the same bundle, consistent (re-hashed) but recording other outputs.
        with np.load(v2 / "samples.npz") as data:
            arrays = {k: data[k] for k in data.files}
        arrays["output_0"] = arrays["output_0"] + 5.0 * (arrays["output_0"].max() - arrays["output_0"].min() + 1)
        np.savez(v2 / "samples.npz", **arrays)
        rehash(v2)
        with pytest.raises(EdgeAgentError) as err:
            deploy(run.models, v2)
        assert err.value.code == "smoke_test_failed"
        assert run.models.store.versions("clf") == [1]
        assert any(h["event"] == "rejected" and h["version"] == 2 for h in read_state(tmp_path)["history"])
        assert run.errors() == 0
    finally:
        run.stop()


def test_probation_rolls_back_a_version_that_raises(tmp_path: Path) -> None:
    bright = frames(tmp_path / "bright", bright=True)
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, fail_above=0.5)  # passes the grey smoke test, fails on bright frames
    run = Running(config(tmp_path, v1, bright, probation_frames=50))
    try:
        run.wait_results(5, version=1)
        assert deploy(run.models, v2)["active"] == 2
        failed = run.wait_event("probation_failed")
        assert "inference error" in failed["reason"]
        back = run.wait_event("rolled_back")
        assert back["version"] == 2 and back["to"] == 1
        state = read_state(tmp_path)
        assert state["active"] == 1 and state["last_good"] == 1 and "2" in state["failed"]
        n = len(run.results())
        run.wait_results(n + 10, version=1)  # serving again, with the last good version
        assert run.models.status()["clf"]["active"] == 1
    finally:
        run.stop()


def test_probation_rolls_back_a_version_five_times_slower(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1, slow=4)
    v2 = make_bundle(tmp_path / "b", 2, slow=28)
    run = Running(config(tmp_path, v1, cam, source_fps=100, probation_frames=40, max_latency_factor=3.0))
    try:
        run.wait_results(30, version=1)
        deploy(run.models, v2)
        back = run.wait_event("rolled_back")
        assert "latency regression" in back["reason"], back
        state = read_state(tmp_path)
        assert state["active"] == 1 and "latency" in state["failed"]["2"]
        assert run.errors() == 0
    finally:
        run.stop()


def test_resource_preserving_swap_reports_its_gap_and_fails_no_frame(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    run = Running(config(tmp_path, v1, cam, swap="resource"))
    try:
        run.wait_results(5)
        act = deploy(run.models, v2)["activation"]
        assert act["mode"] == "resource" and act["gap_ms"] > 0
        run.wait_results(10, version=2)
        assert run.errors() == 0
        assert not any(e["event"] == "rolled_back" for e in run.events), run.events
    finally:
        run.stop()


@pytest.mark.parametrize("swap", ["availability", "resource"])
def test_a_full_disk_during_a_swap_keeps_the_old_version_serving(tmp_path: Path, cam: Path, swap: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file cannot be written (disk full) after the new version
    was loaded: the activation fails with the store's error, the version
    that served before serves again (reloaded if the resource-preserving
    swap had closed it), the state on disk and in memory is unchanged, and
    the same activation works once the disk has room."""
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    run = Running(config(tmp_path, v1, cam, swap=swap))
    try:
        run.wait_results(5)
        deploy(run.models, v2, activate=False)
        import edge_agent.models.store as store_module

        def full(*args: Any, **kwargs: Any) -> None:  # what the kernel says when the SD card is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(store_module, "write_state", full)
        with pytest.raises(StoreError) as err:
            run.models.activate("clf", 2)
        assert err.value.code == "disk_full"
        status = run.models.status()["clf"]
        assert status["active"] == 1 and status["loaded"] == [1]
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert read_state(tmp_path)["active"] == 1
        monkeypatch.undo()  # the disk has room again
        run.models.set_label("clf", "stable", 1)  # the next state write does not record the failed swap
        assert read_state(tmp_path)["active"] == 1
        assert run.models.activate("clf", 2)["changed"]
        run.wait_results(len(run.results()) + 5, version=2)
        assert run.errors() == 0
    finally:
        run.stop()


def test_a_source_served_by_label(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    sources = [
        {"name": "main", "uri": str(cam), "model": "clf", "loop": True, "source_fps": 40.0},
        {"name": "trial", "uri": str(cam), "model": "clf", "loop": True, "source_fps": 40.0, "label": "canary"},
    ]
    run = Running(config(tmp_path, v1, cam, sources=sources))
    try:
        run.wait_results(3, version=1)  # no canary yet: the label falls back to the active version
        deploy(run.models, v2, activate=False, label="canary")
        status = run.models.status()["clf"]
        assert status["active"] == 1 and status["labels"] == {"canary": 2} and status["loaded"] == [1, 2]
        def both_served() -> bool:
            recent = run.sink.items[-20:]
            return {r["version"] for s, r, _ in recent if s == "trial"} == {2} and any(s == "main" for s, _, _ in recent)

        poll_until(both_served, 10, interval=0.05)
        recent = run.sink.items[-20:]
        assert {r["version"] for s, r, _ in recent if s == "main"} == {1}
        assert {r["version"] for s, r, _ in recent if s == "trial"} == {2}
        with pytest.raises(EdgeAgentError) as err:
            run.models.remove("clf", 2)
        assert err.value.code == "version_labelled"
        run.models.set_label("clf", "canary", None)
        assert run.models.status()["clf"]["loaded"] == [1]
    finally:
        run.stop()


def test_remove_rules_and_garbage_collection(tmp_path: Path) -> None:
    bundles = [make_bundle(tmp_path / "b", v) for v in range(1, 6)]
    run = Running(config(tmp_path, bundles[0], None, store={"keep_versions": 1}, probation_s=0.05))
    try:
        for b in bundles[1:4]:
            deploy(run.models, b)
            run.wait_event("probation_passed")
            run.events.clear()
        # v4 active and last good, v3 kept (keep_versions = 1), v1 and v2 collected
        assert run.models.store.versions("clf") == [3, 4]
        deploy(run.models, bundles[4], activate=False)
        for version, code in [(4, "version_active"), (9, "version_not_found")]:
            with pytest.raises(EdgeAgentError) as err:
                run.models.remove("clf", version)
            assert err.value.code == code
        run.models.activate("clf", 5)
        with pytest.raises(EdgeAgentError) as err:
            run.models.remove("clf", 4)  # the last good one while 5 is on probation
        assert err.value.code == "version_last_good"
        assert run.models.remove("clf", 3)["removed"]
        assert run.models.store.versions("clf") == [4, 5]
        assert run.models.rollback("clf")["version"] == 4
    finally:
        run.stop()


def test_restart_during_probation(tmp_path: Path, cam: Path) -> None:
    """A clean stop re-arms probation at the next start; a crash (the state
    file still says "on probation", no clean stop) rolls back."""
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    cfg = config(tmp_path, v1, cam, probation_frames=100000, probation_s=3600)
    run = Running(cfg)
    deploy(run.models, v2)
    run.stop()
    state = read_state(tmp_path)
    assert state["probation"]["clean_stop"] is True
    run = Running(cfg)
    try:
        status = run.models.status()["clf"]
        assert status["active"] == 2 and status["probation"]["version"] == 2
    finally:
        run.stop()
    # Simulate the crash: the state as a killed agent leaves it.
    path = tmp_path / "store" / "clf" / "state.json"
    state = json.loads(path.read_text())
    state["probation"]["clean_stop"] = False
    path.write_text(json.dumps(state))
    run = Running(cfg)
    try:
        assert run.models.status()["clf"]["active"] == 1
        state = read_state(tmp_path)
        assert state["failed"]["2"] == "the agent stopped during its probation" and state["probation"] is None
    finally:
        run.stop()


def test_a_failed_activation_leaves_the_probation_running(tmp_path: Path, cam: Path) -> None:
    """v2 is on probation; activating v3, whose file rotted on disk, fails:
    v2 keeps serving *and* stays on probation (it is still judged)."""
    v1, v2, v3 = (make_bundle(tmp_path / "b", v) for v in (1, 2, 3))
    run = Running(config(tmp_path, v1, cam, probation_frames=100000, probation_s=3600))
    try:
        deploy(run.models, v2)
        deploy(run.models, v3, activate=False)
        assert run.models.status()["clf"]["probation"]["version"] == 2
        model = next((tmp_path / "store" / "clf" / "3").glob("*.onnx"))
        model.write_bytes(model.read_bytes()[:-100])
        with pytest.raises(EdgeAgentError):
            run.models.activate("clf", 3)
        status = run.models.status()["clf"]
        assert status["active"] == 2 and status["probation"]["version"] == 2
        assert read_state(tmp_path)["probation"]["version"] == 2
        run.wait_results(len(run.results()) + 3, version=2)
    finally:
        run.stop()


def test_a_corrupt_active_version_on_disk_falls_back_at_start(tmp_path: Path, cam: Path) -> None:
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    cfg = config(tmp_path, v1, cam, probation_s=0.05)
    run = Running(cfg)
    deploy(run.models, v2)
    run.wait_event("probation_passed")
    run.stop()
    model = next((tmp_path / "store" / "clf" / "2").glob("*.onnx"))
    model.write_bytes(model.read_bytes()[:-100])  # bit rot / a half-written file
    run = Running(cfg)
    try:
        assert run.models.status()["clf"]["active"] == 1
        assert any(e["event"] == "load_failed" and e["version"] == 2 for e in run.events)
        run.wait_results(3, version=1)
    finally:
        run.stop()


def test_auto_swap_mode_follows_free_memory(tmp_path: Path) -> None:
    """swap = "auto": resource-preserving when free memory cannot hold the new
    version beside the old (estimated from the bundle size), else availability."""
    from edge_agent.models.manager import ModelManager
    from edge_agent.models.store import ModelStore

    v1 = make_bundle(tmp_path / "b", 1)
    bundles = [make_bundle(tmp_path / "b", v) for v in (2, 3)]
    cfg = config(tmp_path, v1, None)
    free = {"bytes": 8 << 30}
    manager = ModelManager(ModelStore(tmp_path / "store"), cfg.models, memory_available=lambda: free["bytes"])
    manager.start()
    try:
        assert deploy(manager, bundles[0])["activation"]["mode"] == "availability"
        free["bytes"] = 32 << 20  # less than 64 MB of headroom
        act = deploy(manager, bundles[1])["activation"]
        assert act["mode"] == "resource" and act["gap_ms"] > 0
        with manager.acquire("clf") as model:
            assert model.version == 3
    finally:
        manager.stop()


def test_the_probation_supervisor_sleeps_until_a_probation_starts(tmp_path: Path) -> None:
    """With nothing on probation the supervisor does not wake at all (an idle
    agent on a Pi, or 500 simulated ones on one machine, should not poll 10
    times a second); an activation on probation wakes it at once."""
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2)
    run = Running(config(tmp_path, v1, None))
    try:
        manager = run.models
        checks: list[float] = []
        real = manager._check_probation

        def counting(slot: Any) -> None:
            checks.append(time.monotonic())
            real(slot)

        manager._check_probation = counting  # type: ignore[method-assign]
        let_time_pass(0.6, "a supervisor that polled without a probation would have checked by now")
        assert checks == []
        deploy(manager, v2)
        activated = time.monotonic()  # after the deploy: its own duration is not the supervisor's (a check during it is < 0)
        poll_until(lambda: checks, 2.0)
        assert checks and checks[0] - activated < 1.0
        assert manager.status()["clf"]["probation"] is not None
    finally:
        run.stop()
