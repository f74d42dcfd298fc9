"""The version policy: a pure function from a snapshot of the store to a plan.

TF Serving separates *which versions should be loaded* (the AspiredVersionPolicy)
from the mechanics of loading them. Here the same split: :func:`plan` looks at
what is installed, what the state file says and the model's policy, and
returns which version serves by default and which versions must be loaded.
It does no I/O, so it is tested with tables (tests/test_policy.py).

Policies (``[[models]]`` keys):

* ``version_policy = "latest"``, ``latest = N`` (default 1): the active version
  serves; the N-1 installed versions just below it stay loaded too (instant
  rollback, requests by version). With no active version yet (first start, or
  the active one is gone), the newest installed version that has not failed.
  A version installed without being activated is never served on its own.
* ``version_policy = "specific"``, ``versions = [..]``: only these versions
  may serve and all of them that are installed are loaded; the active version
  if it is among them, else the newest of them.

Labelled versions (``stable``, ``canary``, ...) are always loaded. Versions
recorded as failed are never chosen by the policy (an operator may still
activate one explicitly).

How a version is swapped in is decided here too, by :func:`swap_mode`, from
numbers the manager measures (free memory, the version's size on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

SwapSetting = Literal["auto", "availability", "resource"]
SwapMode = Literal["availability", "resource"]

# A runtime holds the weights (once or twice while it optimises the graph)
# plus arenas: 3x the bundle plus 64 MB of headroom is safe.
SWAP_SIZE_FACTOR = 3
SWAP_HEADROOM_BYTES = 64 << 20


@dataclass(frozen=True)
class Snapshot:
    installed: Sequence[int]
    active: int | None = None
    labels: dict[str, int] = field(default_factory=dict)
    failed: Sequence[int] = ()


@dataclass(frozen=True)
class Policy:
    kind: Literal["latest", "specific"] = "latest"
    latest: int = 1
    versions: Sequence[int] = ()

    def allows(self, version: int) -> bool:
        return self.kind == "latest" or version in self.versions


@dataclass(frozen=True)
class Plan:
    serving: int | None
    load: tuple[int, ...]
    # versions the plan would have used but the policy excludes (for status)
    excluded: tuple[int, ...] = ()


def plan(policy: Policy, snap: Snapshot) -> Plan:
    installed = sorted(set(snap.installed))
    failed = set(snap.failed)
    labelled = {v for v in snap.labels.values() if v in installed}
    if policy.kind == "specific":
        allowed = [v for v in installed if v in set(policy.versions)]
        if snap.active in allowed:
            serving: int | None = snap.active
        else:
            good = [v for v in allowed if v not in failed]
            serving = good[-1] if good else None
        load = set(allowed) | labelled
        excluded = tuple(v for v in installed if v not in set(policy.versions))
        return Plan(serving, tuple(sorted(load)), excluded)

    if snap.active in installed:
        serving = snap.active
    else:
        good = [v for v in installed if v not in failed]
        serving = good[-1] if good else None
    load = set(labelled)
    if serving is not None:
        below = [v for v in installed if v < serving and v not in failed]
        load |= {serving, *below[len(below) - (policy.latest - 1):]} if policy.latest > 1 else {serving}
    return Plan(serving, tuple(sorted(load)))


def fallbacks(policy: Policy, snap: Snapshot, last_good: int | None) -> list[int]:
    """Versions to try, in order, when the planned serving version cannot be
    loaded: the last good one, then the others newest first (never failed ones)."""
    first = plan(policy, snap).serving
    order: list[int] = []
    if last_good is not None and last_good in snap.installed:
        order.append(last_good)
    for v in sorted(set(snap.installed), reverse=True):
        if v not in snap.failed and policy.allows(v):
            order.append(v)
    seen: set[int] = set() if first is None else {first}
    out = []
    for v in order:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def swap_mode(setting: SwapSetting, *, serving: bool, free_bytes: int | None = None,
              model_bytes: int | None = None) -> SwapMode:
    """How to swap a version in (the ``swap`` key of a model):

    * ``availability``: load the new version beside the one serving, then
      switch; no frame waits, both are in memory for a moment;
    * ``resource``: unload the one serving first, then load; frames wait.

    With nothing ``serving`` there is nothing to unload: availability. A
    setting other than ``auto`` is followed as it is. ``auto``: resource when
    ``free_bytes`` (free memory, measured now) cannot hold the new version
    beside the old, estimated as :data:`SWAP_SIZE_FACTOR` times
    ``model_bytes`` (the version's files) plus :data:`SWAP_HEADROOM_BYTES`;
    both numbers are needed then, and only then.
    """
    if not serving:
        return "availability"
    if setting != "auto":
        return setting
    if free_bytes is None or model_bytes is None:
        raise ValueError('swap = "auto" is decided from free_bytes and model_bytes')
    short = free_bytes < SWAP_SIZE_FACTOR * model_bytes + SWAP_HEADROOM_BYTES
    return "resource" if short else "availability"
