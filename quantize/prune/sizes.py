"""Sizes of models: parameter counts (all elements and the nonzero ones) and
what an OTA download of a model, a file or an unpacked bundle costs once
compressed (:func:`compressed_size`, the number ``report.json`` compares).

Pure functions; safe from any thread.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.errors import QuantizeInputError


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """``(elements, nonzero elements)`` over every initializer of the main graph."""
    total = nonzero = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def compressed_size(source: str | os.PathLike | bytes | onnx.ModelProto) -> int:
    """Bytes an OTA download of ``source`` costs, gzip level 9.

    * ``bytes`` or a ``ModelProto``: the gzip of those bytes (the serialized model);
    * a ``.tar.gz``/``.tgz`` file: its size (it already is the download);
    * any other file: the gzip of its content;
    * a folder (an unpacked bundle): the size of a ``.tar.gz`` of it, built
      in memory with sorted names and zeroed times so the number is
      reproducible.
    """
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(gzip.compress(bytes(source), compresslevel=9, mtime=0))
    path = Path(source)
    if path.is_dir():
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w") as tar:
                for item in sorted(path.rglob("*")):
                    info = tar.gettarinfo(str(item), arcname=str(item.relative_to(path)))
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if item.is_file():
                        with open(item, "rb") as fh:
                            tar.addfile(info, fh)
                    elif item.is_dir():
                        tar.addfile(info)
        return len(buf.getvalue())
    if not path.is_file():
        raise QuantizeInputError(f"{path}: no such file or folder")
    if path.name.endswith((".tar.gz", ".tgz")):
        return path.stat().st_size
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def count_elements(arrays: Iterable[np.ndarray]) -> tuple[int, int]:
    """``(elements, nonzero elements)`` over ``arrays``."""
    arrays = list(arrays)
    return sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)
