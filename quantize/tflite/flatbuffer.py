"""Reading a .tflite file in the main environment, without an interpreter
(so a model with Flex ops can be inspected too): its ops, their counts, its
input and output tensors with their quantization; and refusing the ops a
plain LiteRT on the device cannot run (TensorFlow Flex and other custom ops).

Pure functions; safe from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from quantize.errors import QuantizeError


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor: ``dtype`` in lower case (``"int8"``),
    ``quant`` its (scale, zero_point) when quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: tuple[float, int] | None


@dataclass(frozen=True)
class ModelInfo:
    """What a .tflite file holds: its ops (in order of first use, builtin
    names, custom ops by their custom code, e.g. ``FlexErf``), op counts and
    its input/output tensors."""

    ops: tuple[str, ...]
    op_counts: dict[str, int]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def read_model(path: Path) -> ModelInfo:
    """Parse a .tflite flatbuffer with LiteRT's schema (no interpreter, so a
    model with Flex ops can be inspected too)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - ai-edge-litert ships the schema
        raise QuantizeError(
            "reading .tflite files needs ai-edge-litert: pip install 'edge-agent[tflite]'",
            code="litert_missing",
        ) from None
    buf = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(buf, 0)
        builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = builtin.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM":
                custom = oc.CustomCode()
                name = custom.decode() if custom else "CUSTOM"
            codes.append(name)
        ops: list[str] = []
        counts: dict[str, int] = {}
        for s in range(model.SubgraphsLength()):
            sub = model.Subgraphs(s)
            for o in range(sub.OperatorsLength()):
                name = codes[sub.Operators(o).OpcodeIndex()]
                if name not in counts:
                    ops.append(name)
                counts[name] = counts.get(name, 0) + 1
        main = model.Subgraphs(0)

        def tensor(index: int) -> TensorInfo:
            t = main.Tensors(index)
            q = t.Quantization()
            quant = None
            if q is not None and q.ScaleLength() > 0 and q.ScaleAsNumpy()[0] != 0:
                quant = (float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0]) if q.ZeroPointLength() else 0)
            name = t.Name().decode() if t.Name() else str(index)
            return TensorInfo(name, tuple(int(d) for d in t.ShapeAsNumpy()), types.get(t.Type(), str(t.Type())), quant)

        inputs = tuple(tensor(int(i)) for i in main.InputsAsNumpy())
        outputs = tuple(tensor(int(i)) for i in main.OutputsAsNumpy())
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(f"{path}: not a readable .tflite model ({exc})", code="bad_tflite") from None
    return ModelInfo(tuple(ops), counts, inputs, outputs)


def list_ops(path: Path) -> list[str]:
    """The ops a .tflite model uses, in order of first use."""
    return list(read_model(path).ops)


def forbidden_ops(ops: Sequence[str]) -> list[str]:
    """The ops among ``ops`` that a plain LiteRT cannot run: TensorFlow
    (Flex) ops and any other custom op."""
    return [op for op in ops if op.startswith("Flex") or op == "CUSTOM" or not op.isupper() or op.startswith("BUILTIN_")]


def check_ops(ops: Sequence[str], what: str = "the TFLite model") -> None:
    """Refuse Flex/custom ops, naming them (:class:`QuantizeError`, code
    ``unsupported_ops``)."""
    bad = forbidden_ops(ops)
    if bad:
        raise QuantizeError(
            f"{what} needs ops the device's LiteRT cannot run: {', '.join(sorted(set(bad)))} "
            "(TensorFlow Flex/custom ops); refusing it",
            code="unsupported_ops",
        )
