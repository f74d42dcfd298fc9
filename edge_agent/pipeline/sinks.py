"""Where results go: the sink protocol and the log sink.

A sink is anything with ``emit(source, result)``; the worker hands every
published result to its sinks in order (see
:class:`~edge_agent.pipeline.stages.EmitToSinks`). Besides :class:`LogSink`
the agent adds the control plane's results sink (through its
store-and-forward outbox), and tests their own.

Thread-safety: ``emit`` is called from every source's worker thread; a sink
shared by several sources must allow that. :class:`LogSink` keeps no state
(``enabled`` reads one reference the agent replaces whole).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol


class Sink(Protocol):
    """Receives every result; must not block for long (it runs in the loop)."""

    def emit(self, source: str, result: dict[str, Any]) -> None: ...


class LogSink:
    """One readable log line per result, for the sources ``enabled(source)``
    says (the sources' ``log_results``; every source when not given)."""

    def __init__(self, logger: logging.Logger | None = None, enabled: Callable[[str], bool] | None = None) -> None:
        self.log = logger or logging.getLogger("edge_agent.results")
        self.enabled = enabled

    def emit(self, source: str, result: dict[str, Any]) -> None:
        if (self.enabled is not None and not self.enabled(source)) or not self.log.isEnabledFor(logging.INFO):
            return  # per frame: do not build a line nobody will see
        if "top" in result:
            what = ", ".join(f"{t['label']} {t['score']:.2f}" for t in result["top"][:3]) or "nothing above threshold"
        else:
            dets = result.get("detections", [])
            what = f"{len(dets)} detection(s)" + "".join(
                f"; {d['label']} {d['score']:.2f} at {[int(v) for v in d['box']]}" for d in dets[:3]
            )
        self.log.info(
            "%s frame %d: %s v%d %.1f ms: %s",
            source,
            result["frame"],
            result["model"],
            result["version"],
            result["latency_ms"],
            what,
        )
