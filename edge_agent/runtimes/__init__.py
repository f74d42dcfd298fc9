"""Inference runtimes behind one small protocol.

Construction is cheap and touches no file; :meth:`Runtime.load` does the heavy
work (session/interpreter creation) and one warm-up inference so the first
real frame is not slow; :meth:`Runtime.infer` runs one input tensor;
:meth:`Runtime.close` releases it. Backends are imported only when a model of
their kind is used, so a device serving ONNX never imports LiteRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


from edge_agent.bundles.manifest import TensorSpec
from edge_agent.errors import BundleError
from edge_agent.runtimes.base import Runtime, prepare_input, quantize

__all__ = ["Runtime", "prepare_input", "quantize", "create_runtime", "describe_model", "runtime_class",
           "runtime_for_file", "limit_malloc_arenas", "release_memory"]

RUNTIME_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX=2`` would).

    glibc gives threads their own arenas, up to 8 per core. The agent loads
    each new model version on a fresh thread, so without a cap the freed
    memory of old versions is scattered over more arenas and RSS wanders
    further (benchmarks/hotswap.py, mode "churn", measures it: with the cap
    RSS levels off about 15 MB above the first swap and stays there over
    800 swaps).
    Called once at start, before the agent's threads exist; a no-op where
    libc is not glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Give freed heap memory back to the operating system.

    A closed model's weights and arenas are freed, but glibc keeps freed
    pages in its arenas for reuse, so without this the process's RSS after a
    swap stays at its peak: on a 1 GB device every swap would look like a
    leak. ``malloc_trim(0)`` returns them (ctypes drops the GIL for the
    call, so frames keep flowing); a no-op where libc is not glibc. No
    ``gc.collect()``: a session is freed by reference counting, and a full
    collection would hold the GIL for tens of milliseconds mid-stream.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def runtime_for_file(path: Path) -> str:
    try:
        return RUNTIME_SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise BundleError(
            f"model {path}: unsupported file type {path.suffix!r} (expected .onnx or .tflite)",
            code="unsupported_model",
        ) from None


def runtime_class(runtime: str) -> type[Runtime]:
    if runtime == "onnx":
        from edge_agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime
    if runtime == "tflite":
        from edge_agent.runtimes.litert import LiteRTRuntime

        return LiteRTRuntime
    raise BundleError(f"unknown runtime {runtime!r}", code="unsupported_model")


def describe_model(path: Path, runtime: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read a model file's input and output specs with its own runtime."""
    return runtime_class(runtime).describe(path)  # type: ignore[attr-defined]


def create_runtime(
    runtime: str,
    model_path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    threads: int = 2,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Runtime:
    return runtime_class(runtime)(model_path, inputs, outputs, threads=threads, providers=providers)
