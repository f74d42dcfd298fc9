"""The Predictor: raw named tensors in, every output out, for any model.

Transport-neutral: REST and gRPC turn their request into numpy arrays keyed
by the signature's input names, call :meth:`Predictor.predict` (or, to do
more under the same model version, :meth:`Predictor.session`), and turn the
outputs back. Every refusal is a :class:`~edge_agent.serving.errors.ServingError`
with TF Serving's status code and, where TF Serving has one, its wording.

Following TF Serving's ServableHandle rule, a model version is acquired from
the model manager for one request and released after it; nothing here keeps
a model between requests, so a hot swap never fails a request.

Batching: a ``batcher`` (the ``[batching]`` section's
:class:`edge_agent.serving.batching.RequestBatcher`) may be handed in; when it
is, :meth:`Session.run` asks it (``batcher.run_timed(model, inputs)``, called
while the model is held) instead of calling the runtime itself. The
version's inference time (Prometheus' ``edge_agent_model_inference_seconds``)
counts the model run only, never the wait for a batch: the batcher says how
much of the merged run was this request's.

Thread-safety: every method may be called from any number of threads at
once; the Predictor keeps no per-request state.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Mapping, Protocol, Sequence

import numpy as np

from edge_agent.errors import EdgeAgentError, ModelNotAvailable
from edge_agent.serving.errors import ServingError
from edge_agent.serving.signature import SIGNATURE_NAME, Signature, TensorInfo, signature_of

if TYPE_CHECKING:
    from edge_agent.models.servable import LoadedModel


class Models(Protocol):
    """What the Predictor calls on the model manager
    (:class:`edge_agent.models.manager.ModelManager` is one)."""

    def status(self) -> dict[str, Any]: ...

    def model_stats(self) -> dict[str, dict[str, Any]]: ...

    def acquire(self, name: str, label: str | None = None,
                version: int | None = None) -> ContextManager["LoadedModel"]: ...


class Batcher(Protocol):
    def run_timed(self, model: "LoadedModel", inputs: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], float]:
        """The outputs, and the seconds of model run that were this request's
        (not the time it waited for its batch)."""
        ...


@dataclass(frozen=True)
class PredictResult:
    """The version that answered and its outputs by name (the model's order)."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class VersionStatus:
    """One version as TF Serving's GetModelStatus reports it."""

    version: int
    state: str  # AVAILABLE (loaded) or END (installed, not loaded)
    error_code: str = "OK"
    error_message: str = ""


def _names(names: Sequence[str] | set[str]) -> str:
    return ",".join(sorted(names))


def check_signature_name(signature_name: str | None) -> None:
    """Only ``serving_default`` (or none: the default) exists here."""
    if signature_name not in (None, "", SIGNATURE_NAME):
        raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.')


def cast_input(info: TensorInfo, value: Any) -> np.ndarray:
    """``value`` as an array of ``info``'s dtype and shape, cast only where
    no value changes (ints to floats that hold them exactly, float64 to
    float32 within its range, as TF Serving's JSON parser allows); anything
    else is INVALID_ARGUMENT naming the input."""
    want = info.dtype
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ServingError("INVALID_ARGUMENT", f"input {info.name!r}: not a tensor ({exc})") from None
    kind = array.dtype.kind
    if want == "string":
        if kind not in "USO":
            raise ServingError("INVALID_ARGUMENT",
                               f"input {info.name!r}: expects string but {array.dtype.name} is provided")
        array = as_text(info.name, array)
    elif array.dtype.name != want:
        target = np.dtype(want)
        ok = False
        if kind == "O" or kind in "USb" or (want == "bool"):
            ok = False
        elif np.can_cast(array.dtype, target, "safe"):
            ok = True
        elif kind in "iu" and target.kind in "iuf":
            cast = array.astype(target)
            ok = bool(np.array_equal(cast.astype(array.dtype), array))
        elif kind == "f" and target.kind == "f":
            finite = array[np.isfinite(array)]
            info_t = np.finfo(target)
            ok = finite.size == 0 or bool(np.all((finite >= info_t.min) & (finite <= info_t.max)))
        if not ok:
            raise ServingError("INVALID_ARGUMENT",
                               f"input {info.name!r}: expects {want} but {array.dtype.name} is provided"
                               + (" (not without loss)" if kind in "iuf" and target.kind in "iuf" else ""))
        array = array.astype(target)
    if not info.accepts(array.shape):
        raise ServingError("INVALID_ARGUMENT",
                           f"input {info.name!r}: shape {list(array.shape)} does not match the signature's "
                           f"{info.shape} (-1: any size)")
    return array


def as_text(name: str, array: np.ndarray) -> np.ndarray:
    """A string input's values as ``str`` (an object array), the way the
    runtimes take strings: ONNX string tensors hold text (onnxruntime would
    store a ``bytes`` value's repr, ``"b'...'"``, and answer from that).
    Bytes (REST's ``{"b64": ...}``, gRPC's ``DT_STRING``) are decoded as
    UTF-8; bytes that are not UTF-8 text, or a value that is not a string,
    are INVALID_ARGUMENT naming the input, for REST and gRPC alike."""
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, value in enumerate(array.reshape(-1).tolist()):
        if isinstance(value, str):
            flat[i] = value
        elif isinstance(value, bytes):
            try:
                flat[i] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input {name!r}: string value {i} is not UTF-8 text ({value[:16]!r}): the model's string "
                    "inputs take text, not raw bytes") from None
        else:
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: expects string but value {i} is "
                                                   f"{type(value).__name__} ({value!r:.40})")
    return out


class Session:
    """One acquired model version, for one request: its signature and the
    model itself (REST decodes pictures with ``model.preprocess``). Made
    by :meth:`Predictor.session`; not to be kept past its ``with`` block."""

    def __init__(self, predictor: "Predictor", model: "LoadedModel") -> None:
        self._predictor = predictor
        self.model = model
        self.signature: Signature = signature_of(model)

    @property
    def version(self) -> int:
        return int(self.model.version)

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs checked against the signature (names, dtypes, shapes)."""
        sig = self.signature.inputs
        if set(inputs) != set(sig):
            sent, want = set(inputs), set(sig)
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input size does not match signature: {len(sent)}!={len(want)} len({{{_names(sent)}}}) != "
                f"len({{{_names(want)}}}). Sent extra: {{{_names(sent - want)}}}. "
                f"Missing but required: {{{_names(want - sent)}}}.",
            )
        return {name: cast_input(info, inputs[name]) for name, info in sig.items()}

    def predict(self, inputs: Mapping[str, Any], *, signature_name: str | None = None,
                output_filter: Sequence[str] | None = None) -> PredictResult:
        """Validate ``inputs``, run them, and give back the outputs
        (only those in ``output_filter`` when given)."""
        check_signature_name(signature_name)
        wanted = list(self.signature.outputs)
        if output_filter:
            unknown = [o for o in output_filter if o not in self.signature.outputs]
            if unknown:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in the "
                    f"set {{{_names(wanted)}}}.")
            wanted = list(dict.fromkeys(output_filter))
        feeds = self.validate(inputs)
        outputs = self.run(feeds)
        return PredictResult(model=self.model.name, version=self.version,
                             outputs={name: outputs[name] for name in wanted})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Already validated inputs through the runtime (or the batcher),
        counted in the version's stats per batch element, as frames are: the
        time of the model run (a merged run's time shared by rows), never the
        wait for a batch."""
        model = self.model
        try:
            batcher = self._predictor.batcher
            if batcher is not None:
                outputs, seconds = batcher.run_timed(model, feeds)
            else:
                t0 = time.perf_counter()
                outputs = model.runtime.run(feeds)
                seconds = time.perf_counter() - t0
        except ServingError:
            model.stats.error()
            raise
        except EdgeAgentError as exc:
            model.stats.error()
            raise ServingError("INTERNAL", f"inference failed: {exc}") from None
        first = next(iter(feeds.values()), None)
        n = int(first.shape[0]) if first is not None and first.ndim else 1
        n = max(1, n)
        model.stats.ok(seconds * 1000.0 / n, count=n)
        return outputs


class Predictor:
    """Predict, metadata and status over the model manager, for any model.

    ``models``: the manager (or a double with its ``status``,
    ``model_stats`` and ``acquire``); ``batcher``: optional, see the module
    docstring.
    """

    def __init__(self, models: Models, *, batcher: Batcher | None = None) -> None:
        self.models = models
        self.batcher = batcher
        self._names = frozenset(models.model_stats())  # the configured models: the manager serves exactly these

    # -- resolving ---------------------------------------------------------

    def _not_found(self, name: str, version: int | None) -> ServingError:
        what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        detail = f"model {name!r} has no version {version} loaded" if version is not None \
            else f"model {name!r} is not served here"
        return ServingError("NOT_FOUND", f"Servable not found for request: {what}: {detail}")

    def _label_version(self, name: str, label: str) -> int:
        labels = self.models.status()[name]["labels"]
        if label not in labels:
            raise ServingError("NOT_FOUND", f"Unrecognized servable version label: {label}: "
                                            f"model {name!r} has no version labelled {label!r}")
        return int(labels[label])

    @contextmanager
    def session(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[Session]:
        """The version of ``name`` a request names (the serving one by
        default; ``version`` or ``label`` pick another), held for the
        ``with`` block. NOT_FOUND for an unknown model, version or label;
        UNAVAILABLE while the model has no version loaded at all."""
        if name not in self._names:
            raise self._not_found(name, version)
        if label is not None and version is None:
            version = self._label_version(name, label)
        with ExitStack() as stack:
            try:
                model = stack.enter_context(self.models.acquire(name, version=version))
            except ModelNotAvailable as exc:
                if version is not None:
                    raise self._not_found(name, version) from None
                raise ServingError("UNAVAILABLE", str(exc)) from None
            yield Session(self, model)

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> tuple[int, Signature]:
        """The version a request would be answered by, and its signature."""
        with self.session(name, version, label) as s:
            return s.version, s.signature

    # -- predict -------------------------------------------------------------

    def predict(self, name: str, inputs: Mapping[str, Any], *, version: int | None = None,
                label: str | None = None, signature_name: str | None = None,
                output_filter: Sequence[str] | None = None) -> PredictResult:
        """Run ``inputs`` (arrays by the signature's input names; a
        dynamic dimension takes any size, e.g. a batch) and give back the
        outputs by name, in the model's own dtypes (dequantized to float32
        where the model quantizes)."""
        check_signature_name(signature_name)
        with self.session(name, version, label) as s:
            return s.predict(inputs, signature_name=signature_name, output_filter=output_filter)

    # -- status ----------------------------------------------------------------

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """Every installed version, newest first (only ``version``, or the
        one ``label`` names, when given), as GetModelStatus reports them, for
        REST and gRPC alike. NOT_FOUND for an unknown model, version or label.
        Reads the store only: a version need not be loaded to be reported."""
        if name not in self._names:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        if label is not None and version is None:
            version = self._label_version(name, label)
        st = self.models.status()[name]
        if version is not None and version not in st["versions"]:
            raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        versions = [version] if version is not None else sorted(st["versions"], reverse=True)
        out = []
        for v in versions:
            failed = st["failed"].get(str(v))
            if v in st["loaded"]:
                out.append(VersionStatus(v, "AVAILABLE"))
            elif failed:
                out.append(VersionStatus(v, "END", "FAILED_PRECONDITION", str(failed)))
            else:
                out.append(VersionStatus(v, "END"))
        return out
