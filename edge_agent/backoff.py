"""Retry delays: exponential back-off with a cap and optional jitter.

The one implementation for code that retries something that failed: a
source reopening its camera, stream or program
(:mod:`edge_agent.sources.base`) and a bundle download
(:mod:`edge_agent.comms.download`). A neutral module, so neither imports
the other's package for it; it imports nothing of the agent.
"""

from __future__ import annotations

import random


class Backoff:
    """``initial`` seconds, doubling up to ``maximum``; ``reset()`` after a
    success. An ``initial`` above ``maximum`` waits ``maximum`` from the start.

    With ``jitter`` (0 <= jitter < 1) each delay is scaled by a random factor
    in ``[1 - jitter, 1]`` (``random.uniform``), so devices that lost the
    same server at the same moment do not all retry in step; the doubling
    and the cap apply before it. ``jitter = 0`` (the default) gives the
    exact sequence.

    Not thread-safe: one retrying thread owns one.
    """

    def __init__(self, initial: float, maximum: float, *, jitter: float = 0.0) -> None:
        if initial < 0 or maximum < 0:
            raise ValueError(f"back-off delays must not be negative (got {initial}, {maximum})")
        if not 0 <= jitter < 1:
            raise ValueError(f"back-off jitter must be in [0, 1) (got {jitter})")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._next = min(initial, maximum)

    def next(self) -> float:
        """The delay to wait now; the one after it doubles (up to ``maximum``)."""
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        if self.jitter:
            delay *= random.uniform(1.0 - self.jitter, 1.0)
        return delay

    def reset(self) -> None:
        """After a success: the next delay is ``initial`` again."""
        self._next = min(self.initial, self.maximum)
