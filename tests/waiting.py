"""Waiting in tests: for a condition, or for time to pass, said which.

A test that waits for something to happen (a message to arrive, a thread to
start, a file to appear, a reply) waits on that condition with a deadline,
never a fixed sleep: a fixed sleep is too short on a slow or busy machine and
wasted time on a fast one. Where an :class:`threading.Event` or a condition
variable says it, wait on that; otherwise :func:`wait_until` (fails the test
at the deadline) or :func:`poll_until` (gives back the last answer, for a
test that asserts on it itself) ask the condition every ``interval``.

A test that needs time itself to pass (nothing more arrives within 2 s, a
rate measured over a second, the monotonic clock moves on while the wall
clock jumps) says so with :func:`let_time_pass` and why.

Every helper runs in the calling thread; the predicates run there too.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def poll_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Ask ``predicate`` until it answers something true or ``timeout``
    seconds have passed; returns its last answer (false on a timeout). It
    is asked at least once, and once more at the deadline. An exception it
    raises (an assertion that the process under test still runs) ends the
    wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            return value
        time.sleep(min(interval, left))


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str | Callable[[], str] = "the condition",
               interval: float = 0.02) -> Any:
    """:func:`poll_until`, failing the test when ``predicate`` is still false
    after ``timeout`` seconds; returns its (true) answer. ``what`` names the
    condition in the failure (a callable is asked only then, for a message
    that shows the state at the deadline)."""
    value = poll_until(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting until {what() if callable(what) else what}")
    return value


def let_time_pass(seconds: float, why: str) -> None:
    """Sleep ``seconds`` on purpose: the test needs that much time to pass,
    not something to happen (``why`` says what, for the reader)."""
    time.sleep(seconds)
