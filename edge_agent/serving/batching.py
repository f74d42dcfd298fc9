"""Batching of predict requests, as TF Serving's batching does it.

The ``[batching]`` section (TF Serving's parameter names) turns it on for
every predict request, HTTP and gRPC alike: the Predictor hands each
request's validated inputs, together with the model version the request
holds, to :meth:`RequestBatcher.run` instead of calling the runtime.

Concurrent requests to **the same loaded version** whose inputs have the
same names, dtypes and shapes apart from the first (batch) dimension are
concatenated along that dimension, run in **one** inference, and the
outputs split back, each request getting its own rows. A batch holds at
most ``max_batch_size`` rows; its first request waits at most
``batch_timeout_micros`` for others (a batch that fills runs at once). At
most ``num_batch_threads`` merged inferences run at a time, and a batch
stays open (takes more requests) while it waits for one, even past its
timeout, so a busy model gets fuller batches. Batches count among the
``max_enqueued_batches`` of their queue (one queue per version and input
shapes, the open batch included) until they have run, and a request
finding them all taken is refused with ``UNAVAILABLE`` and TF Serving's
words, so a flood is answered quickly instead of piling up.

Requests that are not merged, run directly on the caller's thread:
a model whose inputs or outputs lack a dynamic first dimension (nothing to
split along); a request of more than ``max_batch_size`` rows (TF Serving
refuses it, "Task size N is larger than maximum input batch size M"; here
it runs alone, as it would without batching), or of none.

A hot swap never mixes versions: a request is queued with the version it
acquired (and holds until answered), so a batch runs on exactly one
version, the one every request in it asked for.

Unlike the camera micro-batcher (:mod:`edge_agent.pipeline.batching`),
which knows how many sources may submit and stops waiting once each has,
requests come in any number and any size: batches are counted in rows and
keyed by input shapes, and the queue is bounded. What it shares with it is
the shape: no thread of its own; the first request of a batch (its leader)
waits for the batch to fill, runs it, and hands every request its part or
the error.

Thread-safety: :meth:`RequestBatcher.run` may be called from any number of
threads; the queues are read and written under one condition, inference
runs outside it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Mapping

import numpy as np

from edge_agent.serving.errors import ServingError

if TYPE_CHECKING:
    from edge_agent.config import BatchingConfig
    from edge_agent.models.servable import LoadedModel


QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"  # TF Serving's words


@dataclass(eq=False)
class _Task:
    inputs: Mapping[str, np.ndarray]
    rows: int
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    infer_s: float = 0.0
    """This request's share of the merged inference's time (its rows' part)."""


@dataclass(eq=False)
class _Batch:
    deadline: float
    tasks: list[_Task] = field(default_factory=list)
    rows: int = 0
    closed: bool = False
    done: bool = False


@dataclass(eq=False)
class _Queue:
    """One model version and input shape's batches: the open one, and how
    many (open or closed) have not finished."""

    open: _Batch | None = None
    batches: int = 0


class RequestBatcher:
    """Merges concurrent predict requests (see the module docstring).

    Built from the ``[batching]`` section; holds no model and no thread, so
    there is nothing to close. ``batches`` and ``rows`` count the merged
    inferences run and the rows in them (tests, benchmarks).
    """

    def __init__(self, config: "BatchingConfig") -> None:
        self.max_batch_size = config.max_batch_size
        self.timeout_s = config.batch_timeout_micros / 1e6
        self.max_enqueued_batches = config.max_enqueued_batches
        self._slots = threading.BoundedSemaphore(config.num_batch_threads)
        self._cond = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self.batches = 0
        self.rows = 0

    # -- the request's side ------------------------------------------------

    def run(self, model: "LoadedModel", inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` (validated against the model's signature) run through
        ``model`` (held by the caller until this returns), merged with other
        requests where it can be; every output by name, this request's rows
        only. Raises what the inference raised, or ServingError UNAVAILABLE
        when the model's queue is full."""
        return self.run_timed(model, inputs)[0]

    def run_timed(self, model: "LoadedModel", inputs: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], float]:
        """As :meth:`run`, with the seconds of model run that are this
        request's: the merged inference's time times its share of the rows.
        The time spent waiting for the batch to fill or for a batch thread is
        not in it (it is queueing, not inference)."""
        rows = self._rows(model, inputs)
        if rows is None or rows == 0 or rows > self.max_batch_size:
            t0 = time.perf_counter()
            outputs = model.runtime.run(inputs)
            return outputs, time.perf_counter() - t0
        key = (id(model), tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())))
        task = _Task(inputs, rows)
        with self._cond:
            batch, leader = self._enqueue(key, task)
            while not leader and not batch.done:
                self._cond.wait()
        if leader:
            try:
                with self._slots:  # a batch stays open while it waits for a thread, as in TF Serving
                    with self._cond:
                        self._gather(key, batch)
                    self._infer(model, batch)
            finally:
                with self._cond:
                    self._finish(key, batch)
        if task.error is not None:
            raise task.error
        assert task.outputs is not None
        return task.outputs, task.infer_s

    def _rows(self, model: "LoadedModel", inputs: Mapping[str, np.ndarray]) -> int | None:
        """The rows the request carries, or None when it cannot be merged:
        the model has a tensor without a dynamic first dimension, or the
        inputs disagree on their first dimension."""
        manifest = model.manifest
        if not all(t.shape and t.shape[0] is None for t in (*manifest.inputs, *manifest.outputs)):
            return None
        sizes = {a.shape[0] if a.ndim else None for a in inputs.values()}
        if len(sizes) != 1 or None in sizes:
            return None
        return int(sizes.pop())

    def _enqueue(self, key: Hashable, task: _Task) -> tuple[_Batch, bool]:
        """(Holding the condition.) Add ``task`` to its queue's open batch,
        or open one (the task then leads it); closes a batch that would
        overflow, or that fills."""
        queue = self._queues.setdefault(key, _Queue())
        batch, leader = queue.open, False
        if batch is not None and batch.rows + task.rows > self.max_batch_size:
            self._close(queue, batch)
            batch = None
        if batch is None:
            if queue.batches >= self.max_enqueued_batches:
                raise ServingError("UNAVAILABLE", QUEUE_FULL)
            batch = queue.open = _Batch(deadline=time.monotonic() + self.timeout_s)
            queue.batches += 1
            leader = True
        batch.tasks.append(task)
        batch.rows += task.rows
        if batch.rows >= self.max_batch_size:
            self._close(queue, batch)
        return batch, leader

    def _close(self, queue: _Queue, batch: _Batch) -> None:
        batch.closed = True
        if queue.open is batch:
            queue.open = None
        self._cond.notify_all()  # its leader stops waiting

    def _gather(self, key: Hashable, batch: _Batch) -> None:
        """(Holding the condition; the leader, holding a batch thread.) Wait
        until the batch is full or its first request has waited
        ``batch_timeout_micros``; close it."""
        while not batch.closed:
            left = batch.deadline - time.monotonic()
            if left <= 0:
                self._close(self._queues[key], batch)
                break
            self._cond.wait(left)

    def _finish(self, key: Hashable, batch: _Batch) -> None:
        """(Holding the condition.) The batch's requests may go."""
        batch.done = True
        self.batches += 1
        self.rows += batch.rows
        queue = self._queues[key]
        queue.batches -= 1
        if queue.batches == 0 and queue.open is None:
            del self._queues[key]  # (the version may be unloaded next: no id of it is kept)
        self._cond.notify_all()

    # -- the merged inference ---------------------------------------------

    def _infer(self, model: "LoadedModel", batch: _Batch) -> None:
        """One inference for the batch; each task gets its rows of every
        output, or the error. Never raises."""
        tasks = batch.tasks
        try:
            if len(tasks) == 1:
                t0 = time.perf_counter()
                tasks[0].outputs = model.runtime.run(tasks[0].inputs)
                tasks[0].infer_s = time.perf_counter() - t0
            else:
                merged = {name: np.concatenate([t.inputs[name] for t in tasks]) for name in tasks[0].inputs}
                t0 = time.perf_counter()
                outputs = model.runtime.run(merged)
                elapsed = time.perf_counter() - t0
                for name, out in outputs.items():
                    if out.ndim == 0 or out.shape[0] != batch.rows:
                        raise ServingError("INTERNAL", f"output {name!r} has shape {list(out.shape)} for a batch "
                                                       f"of {batch.rows} rows: it cannot be split between requests")
                start = 0
                for t in tasks:
                    t.outputs = {name: out[start:start + t.rows] for name, out in outputs.items()}
                    t.infer_s = elapsed * t.rows / batch.rows
                    start += t.rows
        except BaseException as exc:  # every request of the batch gets the error (a bug too)
            for t in tasks:
                t.error = exc

    def stats(self) -> dict[str, Any]:
        """Merged inferences run and rows in them so far."""
        return {"batches": self.batches, "rows": self.rows}


def request_batcher(config: "BatchingConfig") -> RequestBatcher | None:
    """The batcher the ``[batching]`` section asks for (None: off)."""
    return RequestBatcher(config) if config.enabled else None
