"""The version policy is a pure function of a snapshot: tested with tables."""

from __future__ import annotations

import pytest

from edge_agent.models.policy import Plan, Policy, Snapshot, fallbacks, plan, swap_mode

LATEST1 = Policy()
LATEST3 = Policy(latest=3)
SPEC = Policy(kind="specific", versions=(2, 4))

CASES = [
    # policy, installed, active, labels, failed -> serving, loaded
    (LATEST1, [], None, {}, [], None, ()),
    (LATEST1, [1], None, {}, [], 1, (1,)),
    (LATEST1, [1, 2, 3], None, {}, [], 3, (3,)),  # first start: the newest
    (LATEST1, [1, 2, 3], 2, {}, [], 2, (2,)),  # an installed, not activated v3 is not served
    (LATEST1, [1, 2, 3], None, {}, [3], 2, (2,)),  # a failed version is never picked on its own
    (LATEST1, [1, 2, 3], 3, {}, [3], 3, (3,)),  # ... but an explicit activation stands
    (LATEST1, [1, 2, 3], 7, {}, [], 3, (3,)),  # active version gone: newest
    (LATEST1, [1, 2, 3], 3, {"canary": 1}, [], 3, (1, 3)),  # labelled versions are loaded
    (LATEST1, [1, 2, 3], 3, {"canary": 9}, [], 3, (3,)),  # a label at a missing version is ignored
    (LATEST3, [1, 2, 3, 4], 4, {}, [], 4, (2, 3, 4)),  # latest 3: active and the two below
    (LATEST3, [1, 2, 3, 4], 2, {}, [], 2, (1, 2)),
    (LATEST3, [1, 2, 3, 4], 4, {}, [3], 4, (1, 2, 4)),  # failed ones are skipped
    (SPEC, [1, 2, 3, 4], None, {}, [], 4, (2, 4)),
    (SPEC, [1, 2, 3, 4], 2, {}, [], 2, (2, 4)),
    (SPEC, [1, 2, 3, 4], 3, {}, [], 4, (2, 4)),  # active outside the list: newest allowed
    (SPEC, [1, 2, 3], None, {}, [], 2, (2,)),  # v4 not installed
    (SPEC, [1, 3], None, {}, [], None, ()),  # nothing allowed is installed
    (SPEC, [1, 2, 3, 4], None, {}, [4], 2, (2, 4)),
    (SPEC, [1, 2, 3, 4], 4, {"old": 1}, [], 4, (1, 2, 4)),
]


@pytest.mark.parametrize("pol,installed,active,labels,failed,serving,loaded", CASES)
def test_plan_table(pol, installed, active, labels, failed, serving, loaded) -> None:
    got = plan(pol, Snapshot(installed=installed, active=active, labels=labels, failed=failed))
    assert (got.serving, got.load) == (serving, loaded)


def test_specific_reports_excluded_versions() -> None:
    assert plan(SPEC, Snapshot(installed=[1, 2, 3])).excluded == (1, 3)


FALLBACKS = [
    (LATEST1, [1, 2, 3], 3, 1, [], [1, 2]),  # last good first, then newest first
    (LATEST1, [1, 2, 3], 3, None, [], [2, 1]),
    (LATEST1, [1, 2, 3], 3, 2, [1], [2]),
    (SPEC, [1, 2, 3, 4], 4, None, [], [2]),
]


@pytest.mark.parametrize("pol,installed,active,last_good,failed,order", FALLBACKS)
def test_fallback_order(pol, installed, active, last_good, failed, order) -> None:
    snap = Snapshot(installed=installed, active=active, failed=failed)
    assert fallbacks(pol, snap, last_good) == order


def test_plan_is_pure() -> None:
    snap = Snapshot(installed=[1, 2], active=1, labels={"a": 2})
    assert plan(LATEST1, snap) == plan(LATEST1, snap) == Plan(1, (1, 2))
    assert snap.labels == {"a": 2}


MB = 1 << 20
SWAPS = [
    # setting, serving, free bytes, model bytes -> mode
    ("auto", False, None, None, "availability"),  # nothing serves: nothing to unload, nothing measured
    ("resource", False, None, None, "availability"),
    ("availability", True, None, None, "availability"),  # a fixed setting is followed as it is
    ("resource", True, None, None, "resource"),
    ("resource", True, 8 << 30, 10 * MB, "resource"),  # ... even with memory to spare
    ("auto", True, 8 << 30, 10 * MB, "availability"),
    ("auto", True, 32 * MB, 0, "resource"),  # less than the 64 MB of headroom
    ("auto", True, 3 * 10 * MB + 64 * MB, 10 * MB, "availability"),  # exactly enough: 3x the bundle + 64 MB
    ("auto", True, 3 * 10 * MB + 64 * MB - 1, 10 * MB, "resource"),
    ("auto", True, 200 * MB, 50 * MB, "resource"),  # 214 MB needed
]


@pytest.mark.parametrize("setting,serving,free,size,mode", SWAPS)
def test_swap_mode_table(setting, serving, free, size, mode) -> None:
    assert swap_mode(setting, serving=serving, free_bytes=free, model_bytes=size) == mode


def test_auto_swap_needs_the_measurements() -> None:
    with pytest.raises(ValueError):
        swap_mode("auto", serving=True, free_bytes=8 << 30)
