"""Plain text for the terminal, shared by the command line and the
benchmarks: ages (:func:`format_age`), the rows of the outcome and status
tables (:func:`outcome_rows`, :func:`status_rows` under
:data:`OUTCOME_HEAD`, :data:`STATUS_HEAD`), and one line per message for
``fleet watch`` (:func:`describe_message`). Pure functions, any thread.
"""

from __future__ import annotations

import time
from typing import Any

from edge_agent.fleet.targets import DeviceInfo, Outcome


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def outcome_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        result = "ok" if o.ok else (o.code or "error")
        active = o.active
        rows.append([o.device, result, "-" if active is None else str(active),
                     "-" if o.seconds is None else f"{o.seconds:.1f}", "" if o.ok else o.message])
    return rows


def status_rows(devices: dict[str, DeviceInfo], *, now: float | None = None) -> list[list[str]]:
    """DEVICE STATE LAST-SEEN AGENT MODELS CPU MEM TEMP, one row per device."""
    now = time.time() if now is None else now
    rows = []
    for device, info in sorted(devices.items()):
        models = []
        for name, m in sorted(info.models.items()):
            if not isinstance(m, dict):
                continue
            labels = m.get("labels") if isinstance(m.get("labels"), dict) else {}
            marks = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            probation = " (probation)" if m.get("probation") else ""
            models.append(f"{name}:v{m.get('active', '-')}{probation}" + (f" [{marks}]" if marks else ""))
        tel = info.telemetry or {}

        def num(key: str, unit: str) -> str:
            value = tel.get(key)
            return f"{value:.0f}{unit}" if isinstance(value, (int, float)) else "-"

        seen = info.last_seen
        rows.append([
            device, info.state, format_age(now - seen) if seen else "-", str(info.status.get("agent_version", "-")),
            " ".join(models) or "-", num("cpu_percent", "%"), num("mem_percent", "%"), num("temp_c", "C"),
        ])
    return rows


STATUS_HEAD = ["DEVICE", "STATE", "SEEN", "AGENT", "MODELS", "CPU", "MEM", "TEMP"]
OUTCOME_HEAD = ["DEVICE", "RESULT", "ACTIVE", "SECONDS", "MESSAGE"]


def describe_message(kind: str, device: str, data: dict[str, Any]) -> str:
    """One line for ``fleet watch``."""
    stamp = data.get("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(stamp if isinstance(stamp, (int, float)) else time.time()))
    if kind == "telemetry":
        parts = [f"cpu {data['cpu_percent']:.0f}%" if isinstance(data.get("cpu_percent"), (int, float)) else None,
                 f"mem {data['mem_percent']:.0f}%" if isinstance(data.get("mem_percent"), (int, float)) else None,
                 f"temp {data['temp_c']:.0f}C" if isinstance(data.get("temp_c"), (int, float)) else None]
        for name, s in sorted((data.get("sources") or {}).items()):
            if isinstance(s, dict):
                lat = (s.get("latency_ms") or {}).get("p50") if isinstance(s.get("latency_ms"), dict) else None
                parts.append(f"{name} {s.get('fps', 0):.1f}fps" + (f" p50 {lat:.0f}ms" if isinstance(lat, (int, float)) else ""))
        return f"{clock} {device} telemetry #{data.get('seq', '?')} " + " ".join(p for p in parts if p)
    if kind == "status":
        return f"{clock} {device} status {data.get('state', 'unknown')}"
    extra = {k: v for k, v in data.items() if k not in ("ts", "id", "event")}
    detail = " ".join(f"{k}={v}" for k, v in extra.items() if not isinstance(v, (dict, list)))
    return f"{clock} {device} event {data.get('event', '?')} {detail}".rstrip()
