"""The fast part of the fault suite: small sizes of the scenarios of
``benchmarks/faults.py`` (the same code, imported), each against the real
agent (``python -m edge_agent run``), the real MobileNetV2 and a real
mosquitto on loopback. The full sizes and their figures are in
docs/reliability.md.

* R1: the broker SIGKILLed and restarted 3 times while results (QoS 1) and
  telemetry flow: no ``seq`` lost, fresh results after each restart;
* R2: ``kill -9`` at 5 random moments of deploys by URL and by MQTT
  transfer: a valid version serves after each restart, ``models list``
  agrees with the state file, nothing left in ``.staging``;
* R3: every kind of bad bundle over MQTT refused with its own code, v1
  serving without a pause, nothing left on disk;
* R4: a burst of 1,000 fuzzed commands: every message answered exactly once
  (or counted as shed), a ping answered within 2 s after it;
* R5: the program of a pipe source killed: results resume;
* R7: unsigned, wrongly signed, tampered, stale and replayed commands
  (also after a restart) with ``[commands] trusted_keys``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ only while importing the benchmark: left on sys.path, its
# quantize.py would hide the quantize package from the tests collected after.
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import faults  # noqa: E402
finally:
    sys.path.remove(str(REPO / "benchmarks"))

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ctx(assets, tmp_path_factory: pytest.TempPathFactory) -> faults.Ctx:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (scripts/test.sh installs it with apt)")
    return faults.Ctx(tmp_path_factory.mktemp("faults"))


@pytest.fixture(autouse=True)
def _stop_leftovers():
    """A scenario that fails half-way leaves no broker or agent running."""
    yield
    faults.cleanup()


def passed(result: dict) -> None:
    assert result["verdict"] == "pass", "\n".join(result["failures"])


def test_r1_broker_killed_and_restarted_loses_no_result_or_telemetry(ctx: faults.Ctx) -> None:
    r = faults.r1_broker_restarts(ctx, restarts=3, down_s=1.5, up_s=3.0)
    passed(r)
    assert r["results"]["missing"] == 0 and r["telemetry"]["missing"] == 0
    assert r["results"]["unique"] >= 50 and r["telemetry"]["unique"] >= 5
    assert all(row["first_fresh_result_s"] is not None for row in r["per_restart"])
    assert r["replayed_total"] > 0, "nothing was spooled while the broker was down"


@pytest.mark.slow
def test_r2_kill9_during_deploys_leaves_a_valid_version_serving(ctx: faults.Ctx) -> None:
    """After each kill: a valid version serves (the new one only once it has
    passed its probation), ``models list`` agrees with the state file and
    ``.staging`` is empty; at the end ``.transfers`` holds no more than the
    agent keeps for a resume. Not asserted here, reported by the benchmark
    (docs/reliability.md): a reply lost when the kill falls between a
    deploy's end and its reply leaving the process (a window of
    milliseconds)."""
    r = faults.r2_kill_during_deploys(ctx, kills=5, seed=4)
    # The kills fall at moments drawn from the duration of an uninterrupted
    # deploy measured first on this machine, however fast: with seed 4 three
    # of them at 8-12% of it, before the deploy's reply. (With seed 3, at 63%
    # and more, every kill came after the reply: that first deploy, the
    # calibration, is slower than the ones after it.)
    assert any(not row["replied_before_kill"] for row in r["runs"]), f"no kill fell inside a deploy: {r['runs']}"
    problems = [p for row in r["runs"] for p in row["problems"]]
    assert r["runs_ok"] == 5, problems
    assert r["partial_downloads_at_end"]["folders"] <= faults.KEEP_FOR_RESUME, r["partial_downloads_at_end"]
    # a deploy cut short by the crash is answered once the agent is back
    late = r["interrupted_deploys_replied_after_restart"]
    assert set(late) <= {"interrupted", "ok", "never"}, r["runs"]
    assert late.get("never", 0) <= 1, r["runs"]  # the race of a few ms in the docstring, not more


@pytest.mark.slow
def test_r3_every_bad_bundle_is_refused_with_its_code_while_v1_serves(ctx: faults.Ctx) -> None:
    r = faults.r3_bad_bundles(ctx, bomb_mb=96, max_unpacked_mb=64)
    passed(r)
    assert r["kinds"] == len(faults.BAD_KINDS) == r["refused_as_expected"]
    assert r["paths_left"] == 0
    assert r["max_result_gap_s"] <= faults.PAUSE_S


def test_r4_a_burst_of_fuzzed_commands_is_answered_and_the_output_goes_on(ctx: faults.Ctx) -> None:
    r = faults.r4_fuzz(ctx, fuzz=1000, bursts=1, burst_share=1.0, seed=5)
    passed(r)
    assert r["missing_replies"] == 0 and r["extra_replies"] == 0
    assert r["pings"][0]["seconds"] <= 2.0
    assert r["pings"][0]["ok_after_s"] is not None


def test_r5_the_pipe_program_killed_results_resume(ctx: faults.Ctx) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (scripts/setup.sh dev installs it with apt)")
    r = faults.r5_camera_faults(ctx, repeats=2, parts=("pipe",))
    passed(r)
    assert all(s <= 15 for s in r["pipe_killed_resume_s"])


def test_r7_only_properly_signed_commands_run_once(ctx: faults.Ctx) -> None:
    r = faults.r7_security(ctx, parts=("signed",))
    passed(r)
    got = {row["case"]: row["got"] for row in r["rows"]}
    assert got["unsigned"] == "signature_missing"
    assert got["replay of 'activate v2' after an agent restart"] == "v1 serves"
