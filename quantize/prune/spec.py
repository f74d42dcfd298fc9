"""A ``--prune`` value (``magnitude:S`` or ``channels:R``), parsed and
checked, and applied to a model with the method's defaults.

A frozen value object, safe to share between threads; :meth:`PruneSpec.apply`
changes the model it is given, in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx

from quantize.errors import QuantizeInputError
from quantize.prune.channels import prune_channels
from quantize.prune.magnitude import prune_magnitude
from quantize.prune.report import PruneReport, check_fraction


@dataclass(frozen=True)
class PruneSpec:
    """A ``--prune`` value, checked on construction: ``magnitude:S`` or ``channels:R``.

    ``S`` is the per-layer sparsity in [0, 1); ``R`` the fraction of output
    channels to remove in [0, 1).
    """

    method: Literal["magnitude", "channels"]
    amount: float

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "channels"):
            raise QuantizeInputError(
                f"--prune: unknown method {self.method!r}; use magnitude:S or channels:R"
            )
        check_fraction(f"--prune {self.method}", self.amount)

    @classmethod
    def parse(cls, text: str) -> "PruneSpec":
        """``"magnitude:0.5"`` -> ``PruneSpec("magnitude", 0.5)``."""
        method, sep, value = text.strip().partition(":")
        if not sep:
            raise QuantizeInputError(f"--prune {text!r}: expected magnitude:S or channels:R, e.g. channels:0.25")
        try:
            amount = float(value)
        except ValueError:
            raise QuantizeInputError(f"--prune {text!r}: {value!r} is not a number") from None
        return cls(method.strip().lower(), amount)  # type: ignore[arg-type]

    def apply(self, model: onnx.ModelProto, *, calibration=None) -> PruneReport:
        """Prune ``model`` in place with the method's defaults (``calibration``: see :func:`prune_channels`)."""
        if self.method == "magnitude":
            return prune_magnitude(model, self.amount)
        return prune_channels(model, self.amount, calibration=calibration)

    def __str__(self) -> str:
        return f"{self.method}:{self.amount:g}"
