"""The probation verdict is a pure function of the settings, the watch and
the version's counters: tested with tables."""

from __future__ import annotations

import pytest

from edge_agent.config import ModelConfig
from edge_agent.models.probation import judge
from edge_agent.models.state import Watch

CFG = ModelConfig(name="clf", probation_frames=100, probation_s=60.0, probation_max_errors=2, max_latency_factor=2.0)

CASES = [
    # baseline ms, frames0, errors0, frames, errors, times (ms), seconds -> passed (None: goes on)
    (None, 0, 0, 5, 0, [10.0] * 5, 1.0, None),
    (None, 0, 0, 5, 2, [10.0] * 5, 1.0, False),  # probation_max_errors
    (None, 50, 3, 55, 4, [10.0] * 5, 1.0, None),  # counted from the watch: 1 error since
    (None, 0, 0, 100, 0, [10.0] * 100, 1.0, True),  # probation_frames
    (None, 0, 0, 3, 0, [10.0] * 3, 60.0, True),  # or probation_s
    (None, 0, 0, 50, 0, [100.0] * 50, 1.0, None),  # no baseline: latency is not judged
    (10.0, 0, 0, 50, 0, [25.0] * 50, 1.0, False),  # more than 2x the baseline
    (10.0, 0, 0, 9, 0, [25.0] * 9, 1.0, None),  # ... only after 10 frames
    (10.0, 0, 0, 50, 0, [19.0] * 50, 1.0, None),  # within 2x
    (0.2, 0, 0, 50, 0, [0.9] * 50, 1.0, None),  # 4.5x, but within the 1 ms slack
    (10.0, 0, 0, 50, 0, [10.0] * 40 + [25.0] * 10, 1.0, None),  # only recent frames count ...
    (10.0, 40, 0, 50, 0, [10.0] * 40 + [25.0] * 10, 1.0, False),  # ... those since the watch
]


@pytest.mark.parametrize("baseline,frames0,errors0,frames,errors,times,seconds,passed", CASES)
def test_judge_table(baseline, frames0, errors0, frames, errors, times, seconds, passed) -> None:
    watch = Watch(started=100.0, baseline_ms=baseline, frames0=frames0, errors0=errors0)
    verdict = judge(CFG, watch, (frames, errors, times), now=100.0 + seconds)
    assert (None if verdict is None else verdict.passed) == passed
    if verdict is not None:
        assert (verdict.frames, verdict.errors) == (frames - frames0, errors - errors0)
        assert verdict.passed == (verdict.reason is None)
