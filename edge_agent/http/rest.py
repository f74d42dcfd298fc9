"""TF Serving's JSON tensor encoding (its ``api_rest.md``), both ways.

Request: the row format (``instances``: a list of values, or of objects by
input name) and the columnar format (``inputs``: a value, or an object by
input name) become numpy arrays by the signature's input names, typed as
the signature says with TF Serving's JSON rules: a float takes any JSON
number, an int only an integer, a bool only ``true``/``false``, a string a
JSON string or ``{"b64": ...}``. Answer: ``predictions`` (row format: per
instance a value, or an object by output name when the model has several
outputs) or ``outputs`` (columnar: the whole tensor, or an object).

Pure functions: nothing here knows a model or the HTTP server. Every
refusal is a :class:`~edge_agent.serving.errors.ServingError`
(``INVALID_ARGUMENT``) in TF Serving's wording, naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from edge_agent.serving.errors import ServingError
from edge_agent.serving.signature import TF_DTYPES, TensorInfo

#: a signature dtype -> TF Serving's word for it in its JSON errors (DT_FLOAT: float)
_TF_TYPE_WORD = {name: tf[3:].lower() for name, tf in TF_DTYPES.items()}


def invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def is_b64(value: Any) -> bool:
    """``{"b64": "<string>"}`` and nothing else: TF Serving's binary value."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value: dict[str, str]) -> bytes:
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise invalid("Unable to base64 decode") from None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "Null"


def type_error(value: Any, dtype: str) -> ServingError:
    text = json.dumps(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return invalid(f"JSON Value: {text} Type: {_json_type(value)} is not of expected type: {_TF_TYPE_WORD[dtype]}")


def _first_wrong(value: Any, ok: Any) -> Any:
    """The first leaf of nested lists that ``ok`` refuses (None when all pass)."""
    stack = [value]
    while stack:
        v = stack.pop(0)
        if isinstance(v, list):
            stack[:0] = v
        elif not ok(v):
            return v
    return None


def to_array(value: Any, info: TensorInfo) -> np.ndarray:
    """One JSON value (a scalar or nested lists) as an array of ``info``'s dtype."""
    dtype = info.dtype
    if dtype == "string":
        return _strings(value)
    if is_b64(value) or isinstance(value, dict):
        raise type_error(value, dtype)
    try:
        array = np.asarray(value)
    except ValueError:
        raise invalid(_not_a_tensor(value, info.name)) from None
    kind = array.dtype.kind
    target = np.dtype(dtype)
    if target.kind == "f":
        good = kind in "iuf"
        check = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    elif target.kind == "b":
        good = kind == "b"
        check = lambda v: isinstance(v, bool)  # noqa: E731
    else:
        good = kind in "iu"
        check = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not good:
        wrong = _first_wrong(value, check)
        if wrong is None and array.dtype == object:
            raise invalid(f"input {info.name!r}: the lists are not all of one size (a tensor is rectangular)")
        raise type_error(wrong if wrong is not None else value, dtype)
    if target.kind in "iu":
        limits = np.iinfo(target)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise invalid(f"input {info.name!r}: a value is out of the range of {dtype}")
    elif target.kind == "f" and kind == "f" and target != array.dtype:
        finite = array[np.isfinite(array)]
        if finite.size and np.abs(finite).max() > np.finfo(target).max:
            raise invalid(f"Cannot convert JSON value: {float(np.abs(finite).max())} to "
                          f"{_TF_TYPE_WORD[dtype]} without loss of precision.")
    return array.astype(target)


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return depth


def _not_a_tensor(value: Any, name: str) -> str:
    """Why nested lists numpy refused are not a tensor: too deep, or ragged."""
    depth = _depth(value)
    if depth > 32:
        return f"input {name!r}: the lists nest {depth} levels deep: too many dimensions for a tensor"
    return f"input {name!r}: the lists are not all of one size (a tensor is rectangular)"


def _strings(value: Any) -> np.ndarray:
    def leaf(v: Any) -> Any:
        if isinstance(v, list):
            return [leaf(x) for x in v]
        if is_b64(v):
            return decode_b64(v)  # bytes: the serving core decodes them as UTF-8 or refuses them
        if isinstance(v, str):
            return v
        raise type_error(v, "string")

    nested = leaf(value)
    try:
        array = np.array(nested, dtype=object)
    except ValueError:
        raise invalid("the lists are not all of one size (a tensor is rectangular)") from None
    return array


# -- the answer --------------------------------------------------------------------


def _json_value(array: np.ndarray, name: str) -> Any:
    if array.dtype == object or array.dtype.kind in "SU":
        def leaf(v: Any) -> Any:
            if isinstance(v, bytes):
                try:
                    return v.decode("utf-8") if not name.endswith("_bytes") else {"b64": base64.b64encode(v).decode()}
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(v).decode()}
            return v
        return np.vectorize(leaf, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def row_answer(outputs: dict[str, np.ndarray]) -> list[Any]:
    """``predictions``: per instance the one output's value, or an object by
    output name. Every output must have the same batch size (dimension 0)."""
    names = list(outputs)
    batch = None
    for name, out in outputs.items():
        if out.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information (a row answer needs a batch dimension; "
                          "ask in the columnar format, \"inputs\")")
        if batch is None:
            batch = out.shape[0]
        elif out.shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {out.shape[0]} expecting: {batch} "
                          "(ask in the columnar format, \"inputs\")")
    if len(names) == 1:
        return _json_value(outputs[names[0]], names[0])
    values = {name: _json_value(out, name) for name, out in outputs.items()}
    return [{name: values[name][i] for name in names} for i in range(batch or 0)]


def columnar_answer(outputs: dict[str, np.ndarray]) -> Any:
    """``outputs``: the one output's tensor, or an object by output name."""
    if len(outputs) == 1:
        ((name, out),) = outputs.items()
        return _json_value(out, name)
    return {name: _json_value(out, name) for name, out in outputs.items()}


def tensor_info_json(info: TensorInfo) -> dict[str, Any]:
    """A TensorInfo as TF Serving's metadata writes it (dims as strings, -1 dynamic)."""
    return {
        "dtype": TF_DTYPES[info.dtype],
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in info.shape], "unknown_rank": False},
        "name": info.name,
    }
