"""Prometheus metrics of the HTTP API's ``GET /metrics``.

The request counters and latencies are kept here (the HTTP API counts each
answer, and so does the gRPC API through :meth:`Metrics.observe_grpc` when
the agent serves both: one :class:`Metrics` for the agent); everything else is read at scrape time, so the cameras' frames pay
nothing: the model manager's status and per-model stats, and an
:class:`AgentStats` from a callable the agent hands over (its device id, its
sources' counters, its broker connection).

Thread-safety: prometheus_client's metrics and registry are thread-safe; a
scrape calls the collaborators from the connection's thread, which they
allow (the agent replaces its worker list rather than mutating it, and the
manager locks its own state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from edge_agent import __version__


@dataclass(frozen=True)
class SourceStats:
    """One source's counters, as a scrape reports them."""

    name: str
    frames: int
    """Frames inferred since the source started."""
    errors: int
    """Frames that failed."""
    captured: int
    """Frames read from the source."""
    skipped: int
    """Frames dropped because a newer one arrived first."""
    up: bool
    """The source delivers frames (not failed, not ended)."""


@dataclass(frozen=True)
class AgentStats:
    """What a scrape reads of the agent besides its models."""

    device_id: str
    sources: Sequence[SourceStats]
    mqtt_connected: bool | None
    """None when the agent runs without a broker (no metric then)."""


class ModelStats(Protocol):
    """The model manager's reads a scrape makes (edge_agent.models.manager.ModelManager is one)."""

    def status(self) -> dict[str, Any]: ...

    def model_stats(self) -> dict[str, dict[str, Any]]: ...

    def inference_histogram(self, name: str) -> tuple[int, list[tuple[float, int]], float] | None: ...


UNKNOWN_MODEL = "unknown"
"""The ``model`` label of requests naming a model that is not configured: a
client chooses the name, and a label per name would let any client add
series without bound (configured names are checked by the config, and
``unknown`` may be one of them: then its requests and the unknown ones share it)."""

PREDICT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Prometheus metrics: request counters and latencies kept here, the rest
    read from the manager and ``stats()`` at scrape time (no per-frame work).

    Every label value is bounded: models by the configuration, endpoints and
    status codes by the API; a request's own words (an unknown model's name)
    never become one."""

    def __init__(self, models: ModelStats, stats: Callable[[], AgentStats]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client import ProcessCollector

        self._known = frozenset(models.model_stats())  # the configured models: the manager serves exactly these
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_AgentCollector(models, stats))
        self.requests = Counter("edge_agent_http_requests", "HTTP API requests by endpoint and status code.",
                                ["endpoint", "code"], registry=self.registry)
        self.predict_seconds = Histogram(
            "edge_agent_http_predict_seconds", "Predict request time (decode, preprocess, inference, postprocess).",
            ["model"], registry=self.registry, buckets=PREDICT_BUCKETS_S,
        )
        self.grpc_requests = Counter("edge_agent_grpc_requests", "gRPC API calls by method and status code.",
                                     ["method", "code"], registry=self.registry)
        self.grpc_predict_seconds = Histogram(
            "edge_agent_grpc_predict_seconds", "gRPC Predict call time (tensors in, inference, tensors out).",
            ["model"], registry=self.registry, buckets=PREDICT_BUCKETS_S,
        )

    def model_label(self, name: str) -> str:
        """The ``model`` label of a request for ``name``: itself when configured, else ``unknown``."""
        return name if name in self._known else UNKNOWN_MODEL

    def observe_predict(self, name: str, seconds: float) -> None:
        """One predict request for model ``name`` (as the client spelt it) answered in ``seconds``."""
        self.predict_seconds.labels(self.model_label(name)).observe(seconds)

    def observe_grpc(self, method: str, model: str | None, code: str, seconds: float) -> None:
        """One gRPC call answered: ``method`` (``Predict``, ``GetModelMetadata``,
        ``GetModelStatus``: the services' own, a bounded set), the status code's
        name (``OK``, ``NOT_FOUND``, ...), and for ``Predict`` its time under the
        model's label (``unknown`` for a name that is not configured)."""
        self.grpc_requests.labels(method, code).inc()
        if method == "Predict":
            self.grpc_predict_seconds.labels(self.model_label(model or "")).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _AgentCollector:
    """Reads the agent's and the models' own counters when Prometheus scrapes."""

    def __init__(self, models: ModelStats, stats: Callable[[], AgentStats]) -> None:
        self.models = models
        self.stats = stats

    def describe(self) -> list[Any]:
        return []  # metric names depend on the configuration; collected on each scrape

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                           InfoMetricFamily)

        agent = self.stats()
        info = InfoMetricFamily("edge_agent", "The agent's version and device id.")
        info.add_metric([], {"version": __version__, "device_id": agent.device_id})
        yield info

        frames = CounterMetricFamily("edge_agent_source_frames", "Frames inferred per source.", labels=["source"])
        errors = CounterMetricFamily("edge_agent_source_errors", "Frames that failed per source.", labels=["source"])
        captured = CounterMetricFamily("edge_agent_source_captured_frames", "Frames read from the source.",
                                       labels=["source"])
        skipped = CounterMetricFamily("edge_agent_source_skipped_frames",
                                      "Frames dropped because a newer one arrived first.", labels=["source"])
        up = GaugeMetricFamily("edge_agent_source_up", "1 while the source delivers frames.", labels=["source"])
        for s in agent.sources:
            frames.add_metric([s.name], s.frames)
            errors.add_metric([s.name], s.errors)
            captured.add_metric([s.name], s.captured)
            skipped.add_metric([s.name], s.skipped)
            up.add_metric([s.name], 1.0 if s.up else 0.0)
        yield from (frames, errors, captured, skipped, up)

        active = GaugeMetricFamily("edge_agent_model_active_version", "The version that serves (0: none).",
                                   labels=["model"])
        loaded = GaugeMetricFamily("edge_agent_model_loaded_versions", "Versions loaded in memory.", labels=["model"])
        inferences = CounterMetricFamily("edge_agent_model_inferences", "Inferences of the serving version.",
                                         labels=["model", "version"])
        failures = CounterMetricFamily("edge_agent_model_errors", "Failed inferences of the serving version.",
                                       labels=["model", "version"])
        seconds = HistogramMetricFamily("edge_agent_model_inference_seconds",
                                        "Inference time of the serving version (the runtime call; a batch's "
                                        "time shared among its items).", labels=["model", "version"])
        status = self.models.status()
        for name, stats in self.models.model_stats().items():
            active.add_metric([name], float(stats["version"] or 0))
            loaded.add_metric([name], float(len(status.get(name, {}).get("loaded", []))))
            if stats["version"] is None:
                continue
            v = str(stats["version"])
            inferences.add_metric([name, v], stats["frames"])
            failures.add_metric([name, v], stats["errors"])
            histogram = self.models.inference_histogram(name)
            if histogram is not None:  # (a version that started serving since model_stats has its own label)
                version, buckets, total = histogram
                seconds.add_metric([name, str(version)], [(_le(b), c) for b, c in buckets], total)
        yield from (active, loaded, inferences, failures, seconds)

        if agent.mqtt_connected is not None:
            connected = GaugeMetricFamily("edge_agent_mqtt_connected", "1 while connected to the broker.")
            connected.add_metric([], 1.0 if agent.mqtt_connected else 0.0)
            yield connected


def _le(bound: float) -> str:
    """A bucket's ``le`` as prometheus_client writes its own histograms' (``0.5``, ``1.0``, ``+Inf``)."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)
