"""The one back-off of the agent: the delays sources reopen with and a bundle
download retries with."""

from __future__ import annotations

import random

import pytest

from edge_agent.backoff import Backoff


def test_doubles_up_to_the_cap_and_starts_again_after_a_success() -> None:
    """A camera that keeps failing is retried 0.5 s, 1 s, 2 s ... then every 30 s, and from 0.5 s again once it delivered."""
    b = Backoff(0.5, 30.0)
    assert [b.next() for _ in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    b.reset()
    assert [b.next() for _ in range(2)] == [0.5, 1.0]


def test_jitter_scales_each_capped_delay_by_a_random_factor() -> None:
    """A download's n-th retry waits min(max, first * 2**(n-1)) times a factor in [0.5, 1], the same draws as random.uniform."""
    for first, cap in ((1.0, 60.0), (0.01, 0.05), (5.0, 1.0), (0.0, 60.0)):
        random.seed(7)
        b = Backoff(first, cap, jitter=0.5)
        got = [b.next() for _ in range(8)]
        random.seed(7)
        want = [min(cap, first * 2 ** (n - 1)) * random.uniform(0.5, 1.0) for n in range(1, 9)]
        assert got == want, (first, cap)


@pytest.mark.parametrize("args", [(-1.0, 1.0), (1.0, -1.0)])
def test_negative_delays_are_refused(args: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(*args)


@pytest.mark.parametrize("jitter", [-0.1, 1.0])
def test_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, jitter=jitter)
