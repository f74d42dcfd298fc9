"""TensorFlow's ``TensorProto`` <-> numpy, as TF Serving reads and writes it.

In: a tensor given either as ``tensor_content`` (the raw little-endian bytes,
row-major, what ``tf.make_tensor_proto`` writes for a numpy array) or in the
typed ``*_val`` field of its dtype (what hand-written clients fill). The
services hand ``DT_STRING`` values on as bytes; the serving core decodes
them as UTF-8 for the model, or refuses them, as it does REST's
``{"b64": ...}`` (:func:`edge_agent.serving.predict.as_text`). As in
TensorFlow's ``make_ndarray``, a typed field with fewer values than the shape
holds repeats its last value (``float_val: 0`` with shape ``[2, 3]`` is six
zeros); more values than the shape holds is an error. The array a tensor
expands to is bounded (``max_bytes``: the server's message limit), so a
few bytes of ``tensor_shape`` cannot make the device allocate gigabytes.
``DT_STRING`` comes as
``string_val`` and becomes a numpy object array of ``bytes``.

Out: numeric tensors as ``tensor_content`` (one copy of the array's bytes,
no per-element work), strings as ``string_val``; ``tf.make_ndarray`` reads
both.

Pure functions over the generated messages; no gRPC import, safe from any
thread. Errors are :class:`TensorError` (the caller answers INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from edge_agent.grpc.protos import tensor_pb2, tensor_shape_pb2, types_pb2
from edge_agent.serving.signature import TF_DTYPES

DT = types_pb2.DataType

#: TensorFlow dtype -> numpy dtype, for the dtypes TF Serving's clients send.
NUMPY_OF: dict[int, np.dtype] = {
    DT.DT_FLOAT: np.dtype(np.float32),
    DT.DT_DOUBLE: np.dtype(np.float64),
    DT.DT_HALF: np.dtype(np.float16),
    DT.DT_INT8: np.dtype(np.int8),
    DT.DT_INT16: np.dtype(np.int16),
    DT.DT_INT32: np.dtype(np.int32),
    DT.DT_INT64: np.dtype(np.int64),
    DT.DT_UINT8: np.dtype(np.uint8),
    DT.DT_UINT16: np.dtype(np.uint16),
    DT.DT_UINT32: np.dtype(np.uint32),
    DT.DT_UINT64: np.dtype(np.uint64),
    DT.DT_BOOL: np.dtype(np.bool_),
    DT.DT_COMPLEX64: np.dtype(np.complex64),
    DT.DT_COMPLEX128: np.dtype(np.complex128),
    DT.DT_STRING: np.dtype(object),
}
#: numpy dtype name -> TensorFlow dtype: the signature's dtypes (one table with REST's metadata), and the
#: others a model's output may have.
DTYPE_OF_NAME: dict[str, int] = {
    **{name: DT.Value(tf) for name, tf in TF_DTYPES.items()},
    "uint16": DT.DT_UINT16, "uint32": DT.DT_UINT32, "uint64": DT.DT_UINT64,
    "complex64": DT.DT_COMPLEX64, "complex128": DT.DT_COMPLEX128,
    "object": DT.DT_STRING, "bytes": DT.DT_STRING, "str": DT.DT_STRING,
}
# The typed field each dtype's values travel in (TensorFlow's tensor.proto).
_VAL_FIELD = {
    DT.DT_FLOAT: "float_val", DT.DT_DOUBLE: "double_val", DT.DT_HALF: "half_val",
    DT.DT_INT8: "int_val", DT.DT_INT16: "int_val", DT.DT_INT32: "int_val", DT.DT_UINT8: "int_val",
    DT.DT_UINT16: "int_val", DT.DT_INT64: "int64_val", DT.DT_UINT32: "uint32_val", DT.DT_UINT64: "uint64_val",
    DT.DT_BOOL: "bool_val", DT.DT_COMPLEX64: "scomplex_val", DT.DT_COMPLEX128: "dcomplex_val",
    DT.DT_STRING: "string_val",
}
_LITTLE = sys.byteorder == "little"


class TensorError(ValueError):
    """A TensorProto that cannot be read; the message names what is wrong."""


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` for 1, or the number when TensorFlow has no such dtype."""
    try:
        return DT.Name(dtype)
    except ValueError:
        return str(dtype)


def shape_of(proto: tensor_shape_pb2.TensorShapeProto) -> tuple[int, ...]:
    if proto.unknown_rank:
        raise TensorError("tensor_shape has unknown_rank: a request tensor needs a known shape")
    dims = tuple(int(d.size) for d in proto.dim)
    if any(d < 0 for d in dims):
        raise TensorError(f"tensor_shape {list(dims)} has a negative dimension: a request tensor needs a known shape")
    return dims


def to_numpy(proto: tensor_pb2.TensorProto, max_bytes: int | None = None) -> np.ndarray:
    """The array a TensorProto holds. Raises :class:`TensorError`, also when
    that array would take more than ``max_bytes`` (None: no bound)."""
    dt = NUMPY_OF.get(proto.dtype)
    if dt is None:
        raise TensorError(f"dtype {dtype_name(proto.dtype)} is not supported (supported: "
                          + ", ".join(dtype_name(d) for d in NUMPY_OF) + ")")
    shape = shape_of(proto.tensor_shape)
    n = math.prod(shape)  # Python ints: a huge shape cannot overflow to a small count
    if max_bytes is not None and n * dt.itemsize > max_bytes:
        raise TensorError(f"tensor_shape {list(shape)} of {dtype_name(proto.dtype)} is {n * dt.itemsize} bytes "
                          f"as an array; at most {max_bytes} ([grpc] max_message_mb)")
    if proto.tensor_content and proto.dtype != DT.DT_STRING:
        content = proto.tensor_content
        if len(content) != n * dt.itemsize:
            raise TensorError(f"tensor_content has {len(content)} bytes; shape {list(shape)} of "
                              f"{dtype_name(proto.dtype)} needs {n * dt.itemsize}")
        return np.frombuffer(content, dtype=dt.newbyteorder("<")).reshape(shape)
    field = _VAL_FIELD[proto.dtype]
    values: Any = getattr(proto, field)
    count = len(values)
    if proto.dtype == DT.DT_STRING:
        flat = np.empty(count, dtype=object)
        flat[:] = list(values)
    elif proto.dtype == DT.DT_HALF:
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    elif proto.dtype in (DT.DT_COMPLEX64, DT.DT_COMPLEX128):
        if count % 2:
            raise TensorError(f"{field} has {count} values; complex numbers come as (real, imaginary) pairs")
        flat = np.asarray(values, dtype=np.float32 if proto.dtype == DT.DT_COMPLEX64 else np.float64).view(dt)
        count //= 2
    else:
        narrow = dt.kind in "iu" and dt.itemsize < 4
        flat = np.asarray(values, dtype=np.int64 if narrow else dt)
        if narrow:  # int8/int16/uint8/uint16 travel as int32: out of range is an error, not a wrap
            info = np.iinfo(dt)
            if count and (flat.min() < info.min or flat.max() > info.max):
                raise TensorError(f"{field} holds a value outside {dtype_name(proto.dtype)}'s range "
                                  f"[{info.min}, {info.max}]")
            flat = flat.astype(dt)
    if count == n:
        return flat.reshape(shape)
    if count == 0:
        if proto.dtype == DT.DT_STRING:
            flat = np.empty(n, dtype=object)
            flat[:] = [b""] * n
            return flat.reshape(shape)
        return np.zeros(shape, dtype=dt)
    if count > n:
        raise TensorError(f"{field} has {count} values; shape {list(shape)} holds {n}")
    # TensorFlow's make_ndarray: fewer values than elements repeat the last one
    return np.concatenate([flat, np.repeat(flat[-1:], n - count)]).reshape(shape)


def from_numpy(array: np.ndarray, out: tensor_pb2.TensorProto | None = None) -> tensor_pb2.TensorProto:
    """A TensorProto holding ``array`` (``out`` filled in place when given,
    e.g. a response's map entry). Raises :class:`TensorError` for a dtype
    TensorFlow has no name for."""
    proto = tensor_pb2.TensorProto() if out is None else out
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        proto.dtype = DT.DT_STRING
        proto.string_val.extend(_as_bytes(v) for v in array.reshape(-1).tolist())
    else:
        dtype = DTYPE_OF_NAME.get(array.dtype.name)
        if dtype is None:
            raise TensorError(f"numpy dtype {array.dtype.name} has no TensorFlow dtype")
        proto.dtype = dtype
        if not _LITTLE or array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape)
    return proto


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def shape_proto(dims: list[int] | tuple[int, ...] | None) -> tensor_shape_pb2.TensorShapeProto:
    """A signature's shape (``-1``: dynamic; ``None``: unknown rank) as TF Serving's metadata writes it."""
    if dims is None:
        return tensor_shape_pb2.TensorShapeProto(unknown_rank=True)
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in dims])
