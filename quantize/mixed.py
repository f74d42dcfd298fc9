"""Automatic mixed precision: keep a cheap set of nodes in float that brings
the int8 model's agreement with fp32 up to the target.

1. **Sensitivity.** For every candidate, keep everything else in float,
   quantize just that one, and measure how far the outputs move away from
   fp32 over a calibration subset (the task's divergence: KL divergence of
   the softmax for a classifier, noise-to-signal of the raw outputs for a
   detector; :mod:`quantize.agreement`). Measuring
   each candidate in isolation ranks better than leaving one out of a fully
   quantized model, where errors mask and cancel each other (on MobileNetV2
   leave-one-out ranked the most damaging tensor last).
2. **Order.** :func:`cost_aware` divides each score by what floating the
   candidate costs (the multiply-accumulates it moves to float kernels,
   plus a fixed price per island); :func:`closed_prefixes` turns the order
   into growing float sets that keep float regions whole.
3. **Search.** :func:`search_stable` tries the sets in order and takes the
   first whose agreement (the task's: top-1 or mAP@0.5 against fp32;
   measured on calibration data, never on the evaluation set) reaches the
   target and holds it for the next set too.
   :func:`search` (doubling, then bisection for the fewest top-ranked nodes)
   is the older rule; it tends to stop on a set that reached the target by
   luck.

Everything model-specific is passed in as functions, so the same search
serves any backend that can build a model with a given float set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from quantize.agreement import kl_divergence, top1_agreement

log = logging.getLogger(__name__)

Build = Callable[[Sequence[str]], Path]
Outputs = Callable[[Path], Any]
Compare = Callable[[Any, Any], float]  # (reference, candidate) -> a number


@dataclass
class MixedPrecisionResult:
    float_nodes: list[str]
    agreement: float
    target: float
    met: bool
    ranking: list[tuple[str, float]] = field(default_factory=list)
    tried: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "float_nodes": self.float_nodes,
            "agreement_on_calibration": round(self.agreement, 4),
            "target": self.target,
            "met": self.met,
            "tried": [{"float_nodes": k, "agreement": round(a, 4)} for k, a in self.tried],
            "most_sensitive": [{"candidate": n, "score": round(g, 6)} for n, g in self.ranking[:10]],
        }


divergence = kl_divergence


def rank_sensitivity(
    candidates: Sequence[str],
    build: Build,
    outputs: Outputs,
    reference: Any,
    *,
    progress: Callable[[int], None] | None = None,
    mode: str = "isolated",
    divergence: Compare = kl_divergence,
) -> list[tuple[str, float]]:
    """Candidates, most harmful first, with their score.

    ``isolated``: the divergence from fp32 when only that candidate is
    quantized (``build`` gets every other candidate as the float set).
    ``leave_one_out``: how much the divergence of the fully quantized model
    drops when only that candidate is kept in float. ``divergence``
    compares ``reference`` with a candidate's ``outputs``.
    """
    scores = []
    base = divergence(reference, outputs(build([]))) if mode == "leave_one_out" else 0.0
    for node in candidates:
        if mode == "isolated":
            score = divergence(reference, outputs(build([c for c in candidates if c != node])))
        else:
            score = base - divergence(reference, outputs(build([node])))
        scores.append((node, score))
        if progress:
            progress(1)
    return sorted(scores, key=lambda item: -item[1])


def smallest_prefix(limit: int, agree: Callable[[int], float], target: float) -> tuple[int, bool]:
    """The smallest k in [0, limit] with ``agree(k) >= target``: doubling k,
    then bisecting between the last miss and the first hit. ``agree`` should
    cache. Returns (k, True), or (the best k tried, False) when none reaches
    the target (on a tie, the fewest float nodes)."""
    tried: dict[int, float] = {}

    def score(k: int) -> float:
        tried[k] = agree(k)
        return tried[k]

    if score(0) >= target:
        return 0, True
    lo, hi = 0, 1
    while hi < limit and score(hi) < target:
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    if hi > lo and score(hi) >= target:
        while hi - lo > 1:  # agree(lo) < target <= agree(hi)
            mid = (lo + hi) // 2
            if score(mid) >= target:
                hi = mid
            else:
                lo = mid
        return hi, True
    return max(tried, key=lambda k: (tried[k], -k)), False


def search(
    ranking: Sequence[tuple[str, float]],
    build: Build,
    outputs: Outputs,
    reference: Any,
    target: float,
    *,
    max_nodes: int | None = None,
    agreement: Compare = top1_agreement,
) -> MixedPrecisionResult:
    """The fewest top-ranked nodes in float whose agreement reaches target."""
    order = [n for n, _ in ranking]
    limit = min(max_nodes or len(order), len(order))
    cache: dict[int, float] = {}

    def agree(k: int) -> float:
        if k not in cache:
            cache[k] = agreement(reference, outputs(build(order[:k])))
            log.info("mixed precision: %d node(s) in float -> agreement %.3f", k, cache[k])
        return cache[k]

    k, met = smallest_prefix(limit, agree, target)
    return MixedPrecisionResult(order[:k], cache[k], target, met, list(ranking), sorted(cache.items()))


def first_stable(limit: int, agree: Callable[[int], float], target: float, *, confirm: int = 1) -> tuple[int, bool]:
    """Scanning k = 0, 1, ..., limit: the first k with ``agree(k) >= target``
    that ``agree(k + 1)``, ... ``agree(k + confirm)`` hold as well (fewer at
    the end of the range). Returns (k, True), or (the best k, False) when
    none qualifies (on a tie, the smallest)."""
    tried: dict[int, float] = {}
    start: int | None = None
    for k in range(limit + 1):
        tried[k] = agree(k)
        if tried[k] >= target:
            start = k if start is None else start
            if k - start >= confirm or k == limit:
                return start, True
        else:
            start = None
    return max(tried, key=lambda k: (tried[k], -k)), False


def cost_aware(
    ranking: Sequence[tuple[str, float]], cost: Mapping[str, float], overhead: float
) -> list[tuple[str, float]]:
    """The ranking re-ordered by harm per cost, ``score / (cost + overhead)``,
    highest first (stable for equal ratios). ``cost``: what keeping the
    candidate in float costs (e.g. the multiply-accumulates it moves from
    integer to float kernels); ``overhead`` > 0 is the fixed price of any
    float island, so free candidates are not ranked on their score alone."""
    return sorted(ranking, key=lambda item: -item[1] / (cost.get(item[0], 0.0) + overhead))


def closed_prefixes(order: Sequence[str], compute: Callable[[str], set[str]], limit: int) -> list[list[str]]:
    """For k = 0..limit, the first k candidates of ``order`` plus every other
    candidate that puts no further node into float (``compute(c)`` within
    the nodes the first k already put there): quantizing a tensor between
    two float nodes only costs accuracy and a Q/DQ pair, so float regions
    are kept whole. Consecutive duplicates are dropped."""
    nodes = {c: compute(c) for c in order}
    sets: list[list[str]] = []
    for k in range(limit + 1):
        chosen = list(order[:k])
        floating = set().union(*(nodes[c] for c in chosen)) if chosen else set()
        extra = [c for c in order[k:] if nodes[c] and nodes[c] <= floating]
        candidate = chosen + extra
        if not sets or set(candidate) != set(sets[-1]):
            sets.append(candidate)
    return sets


def search_stable(
    sets: Sequence[Sequence[str]],
    build: Build,
    outputs: Outputs,
    reference: Any,
    target: float,
    *,
    ranking: Sequence[tuple[str, float]] = (),
    confirm: int = 1,
    agreement: Compare = top1_agreement,
) -> MixedPrecisionResult:
    """The first float set of ``sets`` (growing) whose agreement reaches
    ``target`` and stays there for the next ``confirm`` sets as well.

    Agreement on a few hundred pictures moves by a point or two from one
    set to the next (a near tie flips either way), so the first set that
    happens to touch the target is often a lucky one and falls short on
    other pictures; asking the following set(s) to hold the target too
    filters those out. Sets are tried in order, so this costs one
    measurement per set up to the answer (plus ``confirm``). When no set
    qualifies, the one with the best agreement (fewest float nodes on a tie)
    is returned with ``met=False``. ``agreement`` compares ``reference``
    with a set's ``outputs`` (default: top-1 agreement)."""
    cache: dict[int, float] = {}

    def agree(i: int) -> float:
        if i not in cache:
            cache[i] = agreement(reference, outputs(build(list(sets[i]))))
            log.info("mixed precision: %d node(s) in float -> agreement %.3f", len(sets[i]), cache[i])
        return cache[i]

    i, met = first_stable(len(sets) - 1, agree, target, confirm=confirm)
    tried = [(len(sets[j]), cache[j]) for j in sorted(cache)]
    return MixedPrecisionResult(list(sets[i]), cache[i], target, met, list(ranking), tried)
