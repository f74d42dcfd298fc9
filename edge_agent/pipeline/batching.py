"""Micro-batching: sources served by the same model share one inference.

A model whose input has a dynamic batch dimension and ``batch_size > 1`` in
its ``[[models]]`` table gets one :class:`Batcher` per version label its
sources are served by (normally one: the active version). Each source's
worker submits its frame with :meth:`Batcher.run` and waits for its own
result. The first frame to arrive leads the batch: it waits until
``batch_size`` frames are there, or as many as there are sources attached,
or ``batch_wait_ms`` has passed since it arrived, whichever comes first;
then it acquires the model **once** for the whole batch (so one batch is
served by one version, and a hot swap or a probation sees it as that many
frames of that version), runs the frames through it in one inference, and
hands each worker its own result (or the error). Frames that arrive while a
batch is in inference form the next batch, with a leader of their own.
There is no batching thread: the leading worker does the work.

Thread-safety: everything shared (the pending frames, who is collecting,
the attached count) is read and written under the batcher's condition; the
inference itself runs outside it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from edge_agent.config import ModelConfig
    from edge_agent.models.manager import ModelManager
    from edge_agent.models.servable import Inference, LoadedModel
    from edge_agent.sources import Frame


class _Item:
    __slots__ = ("frame", "top_k", "threshold", "done", "result", "error", "model")

    def __init__(self, frame: "Frame", top_k: int | None, threshold: float | None) -> None:
        self.frame = frame
        self.top_k = top_k
        self.threshold = threshold
        self.done = False
        self.result: Inference | None = None
        self.error: BaseException | None = None
        self.model: LoadedModel | None = None  # the version that served it


class Batcher:
    """One batching point for one model (and version label)."""

    def __init__(self, models: "ModelManager", name: str, label: str | None, size: int, wait_s: float) -> None:
        self.models = models
        self.name = name
        self.label = label
        self.size = size
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._collecting = False
        self._attached = 0
        self.batches = 0  # batches run, and frames in them (telemetry, tests)
        self.frames = 0

    def attach(self) -> None:
        """A worker that will submit frames (the leader stops waiting once every attached worker submitted)."""
        with self._cond:
            self._attached += 1

    def detach(self) -> None:
        with self._cond:
            self._attached = max(0, self._attached - 1)
            self._cond.notify_all()

    def run(self, frame: "Frame", top_k: int | None, threshold: float | None) -> tuple["Inference", "LoadedModel"]:
        """This frame's inference, batched with other sources' frames.
        Returns it and the model (version) that served it; raises what the
        frame's inference raised."""
        item = _Item(frame, top_k, threshold)
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()
            while not item.done:
                if not self._collecting and item in self._pending:
                    batch = self._collect(item)
                    self._cond.release()
                    try:
                        self._infer(batch)
                    finally:
                        self._cond.acquire()
                    for it in batch:
                        it.done = True
                    self._cond.notify_all()
                else:
                    self._cond.wait()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        assert item.model is not None
        return item.result, item.model

    def _collect(self, lead: _Item) -> list[_Item]:
        """(Holding the condition.) Wait for the batch to fill, or up to the
        max wait since ``lead`` arrived; take it from the pending frames."""
        self._collecting = True
        try:
            deadline = time.monotonic() + self.wait_s
            while len(self._pending) < min(self.size, max(1, self._attached)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            others = [it for it in self._pending if it is not lead][: self.size - 1]
            batch = [lead, *others]
            taken = set(map(id, batch))
            self._pending = [it for it in self._pending if id(it) not in taken]
            return batch
        finally:
            self._collecting = False
            self._cond.notify_all()  # the frames left over elect a leader of their own

    def _infer(self, batch: list[_Item]) -> None:
        """One acquire, one inference for the batch; every item gets its
        result or the error. Never raises."""
        try:
            with self.models.acquire(self.name, self.label) as model:
                outs = model.process_batch(
                    [(it.frame.image, it.frame.prepared, it.top_k, it.threshold) for it in batch]
                )
                for it, out in zip(batch, outs):
                    it.model = model
                    if isinstance(out, BaseException):
                        it.error = out
                    else:
                        it.result = out
        except BaseException as exc:  # the acquire failed (no model), or a bug: every frame of the batch says so
            for it in batch:
                if it.result is None and it.error is None:
                    it.error = exc
        self.batches += 1
        self.frames += len(batch)


class Batching:
    """The batchers of an agent: one per (model, label), made on first use,
    for the models configured with ``batch_size > 1``. Any thread."""

    def __init__(self, models: "ModelManager", configs: Sequence["ModelConfig"]) -> None:
        self.models = models
        self._configs = {c.name: c for c in configs if c.batch_size > 1}
        self._lock = threading.Lock()
        self._batchers: dict[tuple[str, str | None], Batcher] = {}

    def __bool__(self) -> bool:
        return bool(self._configs)

    def get(self, name: str, label: str | None) -> Batcher | None:
        cfg = self._configs.get(name)
        if cfg is None:
            return None
        with self._lock:
            batcher = self._batchers.get((name, label))
            if batcher is None:
                batcher = self._batchers[(name, label)] = Batcher(
                    self.models, name, label, cfg.batch_size, cfg.batch_wait_ms / 1000.0
                )
            return batcher

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {f"{n}" + (f"@{l}" if l else ""): {"batches": b.batches, "frames": b.frames}
                    for (n, l), b in self._batchers.items()}
