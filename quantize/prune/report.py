"""What a pruning pass reports: the layers it changed, the layers and
channel groups it left alone (with the reason), and the parameter counts
before and after; :meth:`PruneReport.to_dict` is the ``prune`` section of
``report.json``.

Also the range check both passes apply to their amount
(:func:`check_fraction`), whose value the report records.

Value objects: build one per pass, read them from any thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from quantize.errors import QuantizeInputError


@dataclass(frozen=True)
class LayerPrune:
    """One layer a pruning pass changed: its weight before and after.

    ``params_*`` count the elements of the layer's weight tensor (not its
    bias: the model totals in :class:`PruneReport` count everything);
    ``nonzero_*`` the ones that are not exactly zero.
    """

    name: str
    op_type: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int

    @property
    def sparsity_before(self) -> float:
        return 1.0 - self.nonzero_before / self.params_before if self.params_before else 0.0

    @property
    def sparsity_after(self) -> float:
        return 1.0 - self.nonzero_after / self.params_after if self.params_after else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "weight": self.weight,
            "shape_before": list(self.shape_before),
            "shape_after": list(self.shape_after),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "sparsity_before": round(self.sparsity_before, 6),
            "sparsity_after": round(self.sparsity_after, 6),
        }


@dataclass(frozen=True)
class SkippedLayer:
    """A layer (or, for channel pruning, a channel group named by its sources) left alone, and why."""

    name: str
    op_type: str
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "reason": self.reason}


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that were pruned together: produced by ``sources``, read by ``sinks``."""

    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    channels_before: int
    channels_after: int
    residual: bool
    #: how the channels were chosen and the loss repaired: "l1" (smallest
    #: filters, nothing repaired), "l1+constant" (their constant part folded
    #: into the readers' biases) or "least_squares" (calibration data, readers re-fitted)
    rule: str = "l1"

    def to_dict(self) -> dict:
        return {
            "sources": list(self.sources),
            "sinks": list(self.sinks),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "residual": self.residual,
            "rule": self.rule,
        }


@dataclass
class PruneReport:
    """What a pruning pass did to a model.

    ``params_*`` / ``nonzero_*`` count every initializer element of the whole
    model (weights, biases, everything), so ``params_after < params_before``
    only for channel pruning and ``nonzero_after < nonzero_before`` for both.
    """

    method: Literal["magnitude", "channels"]
    amount: float
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    layers: list[LayerPrune] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    groups: list[ChannelGroup] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.method}:{self.amount:g}"

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters of the result that are exactly zero."""
        return 1.0 - self.nonzero_after / self.params_after if self.params_after else 0.0

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "method": self.method,
            "amount": self.amount,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": round(self.params_after / self.params_before, 6) if self.params_before else 1.0,
            "nonzero_before": self.nonzero_before,
            "nonzero_after": self.nonzero_after,
            "sparsity": round(self.sparsity, 6),
            "layers": [layer.to_dict() for layer in self.layers],
            "groups": [group.to_dict() for group in self.groups],
            "skipped": [skip.to_dict() for skip in self.skipped],
        }


def check_fraction(what: str, value: float) -> None:
    """Refuse ``value`` unless it is a fraction in [0, 1) (:class:`QuantizeInputError`, naming ``what``)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise QuantizeInputError(f"{what}: {value!r} must be a fraction in [0, 1)")
