"""The quantization report: ``report.json``, a terminal table and an HTML page
with bar charts (inline SVG, no plotting library needed)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from quantize.evaluate import Metrics, NoiseFloor


_METRIC_TITLES = {"top1": "Top-1 agreement with fp32", "map50": "Detection agreement with fp32 (mAP@0.5)"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(metrics: Sequence[Metrics]) -> str:
    """A readable table, fp32 first; ratios are against fp32. Detectors show
    mAP@0.5, recall and precision against fp32's boxes where classifiers
    show top-1, top-5 and accuracy."""
    base = metrics[0]
    width = max(22, *(len(m.label) for m in metrics))
    if base.agreement_metric == "map50":
        cols = [("mAP50 vs fp32", lambda m: m.detection_map50), ("recall50", lambda m: m.detection_recall50),
                ("precision50", lambda m: m.detection_precision50)]
    else:
        cols = [("agree top1", lambda m: m.agreement_top1), ("fp32 in top5", lambda m: m.fp32_top1_in_top5),
                ("accuracy", lambda m: m.accuracy)]
    head = f"{'artifact':<{width}} " + " ".join(f"{name:>{max(9, len(name))}}" for name, _ in cols)
    head += f" {'size MB':>8} {'size x':>7} {'gzip MB':>8} {'latency ms':>10} {'speed x':>8}"
    lines = [head, "-" * len(head)]
    for m in metrics:
        values = " ".join(f"{_pct(get(m)):>{max(9, len(name))}}" for name, get in cols)
        lines.append(
            f"{m.label:<{width}} {values} "
            f"{m.size_bytes / 1e6:>8.2f} {m.size_bytes / base.size_bytes:>7.2f} {m.compressed_bytes / 1e6:>8.2f} "
            f"{m.latency_ms:>10.2f} {base.latency_ms / m.latency_ms:>8.2f}"
        )
    return "\n".join(lines)


def mixed_lines(details: dict[str, Any]) -> list[str]:
    """One line per runtime where mixed precision kept something in float:
    what, the agreement it bought on the calibration pictures, and what it
    cost in latency against the fully int8 model."""
    lines = []
    for runtime, info in details.items():
        if not isinstance(info, dict):
            continue
        mp = info.get("mixed_precision") if runtime == "onnx" else info
        if not isinstance(mp, dict) or not mp.get("float_nodes"):
            continue
        if runtime == "onnx":
            kept = f"{len(mp['float_nodes'])} of {mp.get('candidates', '?')} tensors in float"
            if mp.get("float_macs_share") is not None:
                kept += f" ({100 * mp['float_macs_share']:.0f}% of the multiply-adds)"
            start = info.get("agreement_on_calibration_full_int8")
            reached, met = mp.get("agreement_on_calibration"), mp.get("met")
        else:
            kept = f"{len(mp['float_nodes'])} layer(s) in float"
            trials = mp.get("trials") or []
            start = trials[0]["agreement"] if trials and trials[0]["float_nodes"] == 0 else None
            reached, met = mp.get("agreement_on_calibration"), mp.get("target_met_on_calibration")
        line = f"mixed precision, int8 {runtime}: {kept}; agreement on the calibration pictures "
        line += f"{_pct(start)} -> {_pct(reached)} (target {'met' if met else 'not met'})"
        cost = mp.get("latency")
        if cost:
            line += (f"; latency {cost['full_int8_ms']:.2f} -> {cost['mixed_ms']:.2f} ms "
                     f"({cost['cost_ms']:+.2f} ms, {cost['threads']} thread(s))")
        lines.append(line)
    return lines


def floor_text(floor: dict[str, Any]) -> str:
    """fp32's noise floor (``NoiseFloor.to_dict()``, as in report.json) in words."""
    draws = ", ".join(_pct(d) for d in floor["draws"])
    return (
        f"fp32 against itself with +-{floor['amp_grey_levels']} grey level of pixel noise: "
        f"{_pct(floor['agreement'])} {'mAP@0.5 against its own boxes' if floor.get('metric') == 'map50' else 'agreement'} "
        f"({len(floor['draws'])} draws: {draws}); it keeps its "
        f"{'boxes' if floor.get('metric') == 'map50' else 'top-1'} in every draw on {floor['stable_samples']} of "
        f"{floor['samples']} pictures"
    )


def floor_line(floor: NoiseFloor, metrics: Sequence[Metrics], min_agreement: float) -> str:
    """One or two lines on fp32's agreement with itself under invisible
    noise (and a warning when the gate sits at or above it)."""
    stable = ", ".join(
        f"{m.label} {_pct(m.agreement_stable)}" for m in metrics[1:] if m.agreement_stable is not None
    )
    line = f"{floor_text(floor.to_dict())}; agreement on those: {stable or '-'}"
    own = 1 - floor.agreement
    if 1 - min_agreement < 2 * own:
        line += (
            f"\nnote: fp32 disagrees with itself on {_pct(own)} of these pictures under invisible noise, and the "
            f"gate ({min_agreement:.1%}) leaves room for less than twice that: it measures how many pictures are "
            "near ties (between two classes, or boxes near the score threshold) as much as the quantization; more "
            "distinct or clearer pictures give a gate that measures the quantization"
        )
    return line


def _bars(title: str, items: Sequence[tuple[str, float]], fmt: str, *, limit: float | None = None) -> str:
    width, row = 520, 26
    top = max([v for _, v in items] + [limit or 0, 1e-9])
    height = row * len(items) + 30
    parts = [f'<svg width="{width + 200}" height="{height}" role="img" aria-label="{html.escape(title)}">']
    parts.append(f'<text x="0" y="16" font-weight="bold">{html.escape(title)}</text>')
    for i, (name, value) in enumerate(items):
        y = 26 + i * row
        w = max(1, int(width * value / top))
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(name)}</text>')
        parts.append(f'<rect x="170" y="{y}" width="{w}" height="18" fill="#4a7fb5"/>')
        parts.append(f'<text x="{175 + w}" y="{y + 14}">{fmt.format(value)}</text>')
    if limit is not None:
        x = 170 + int(width * limit / top)
        parts.append(f'<line x1="{x}" y1="22" x2="{x}" y2="{height}" stroke="#c33" stroke-dasharray="4"/>')
    parts.append("</svg>")
    return "".join(parts)


def html_page(report: dict[str, Any], metrics: Sequence[Metrics]) -> str:
    charts = [
        _bars(_METRIC_TITLES[metrics[0].agreement_metric], [(m.label, m.agreement or 0) for m in metrics], "{:.1%}",
              limit=report["gate"]["min_agreement"]),
        _bars("Median latency (ms, 1 thread)", [(m.label, m.latency_ms) for m in metrics], "{:.2f}"),
        _bars("Model size (MB)", [(m.label, m.size_bytes / 1e6) for m in metrics], "{:.2f}"),
    ]
    if all(m.accuracy is not None for m in metrics):
        charts.insert(1, _bars("Accuracy (labelled evaluation set)", [(m.label, m.accuracy or 0) for m in metrics], "{:.1%}"))
    gate = report["gate"]
    floor = report["evaluation"].get("fp32_noise_floor")
    floor_html = "" if not floor else (
        f"<p>{html.escape(floor_text(floor))}. A gate above this measures the pictures, not the quantization.</p>"
    )
    status = "passed" if gate["passed"] else "FAILED"
    return f"""<!doctype html><meta charset="utf-8"><title>edge-agent quantize: {html.escape(report['model']['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}} pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>
<h1>{html.escape(report['model']['name'])} v{report['model']['version']}: quantization report</h1>
<p>Quality gate (min {html.escape(_METRIC_TITLES[metrics[0].agreement_metric].lower())} {gate['min_agreement']:.1%}): <b>{status}</b>.
Calibration: {report['calibration']['samples']} pictures from {html.escape(report['calibration']['source'])};
evaluation: {report['evaluation']['samples']} other pictures from {html.escape(report['evaluation']['source'])}.</p>
{floor_html}
{''.join(f'<p>{c}</p>' for c in charts)}
<pre>{html.escape(table(metrics))}</pre>
<pre>{html.escape(json.dumps(report, indent=2))}</pre>
"""


def write(out_dir: Path, report: dict[str, Any], metrics: Sequence[Metrics]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(html_page(report, metrics), encoding="utf-8")
    return json_path, html_path
