#!/usr/bin/env python3
"""What ``edge-agent quantize`` does to real models: agreement, size, speed.

Everything goes through the real job, :func:`quantize.pipeline.run` (what the
``edge-agent quantize`` command runs), and the numbers are read from the
``report.json`` it writes (also when its quality gate fails: the report is
written before :class:`quantize.errors.QualityGateFailed` is raised).

Data (built once, cached under ``<cache>/quantize-bench/``): 18 of the real
photos of ``testassets`` (photos of things; the textures,
microscopy and text pages are left out, since fp32's own top-1 on them is a
near tie) split into two *disjoint* sets of photos, 12 camera-like views of
each made by :func:`quantize.data.make_views` (the photo, its mirror image,
and seeded random crops at 55-90 % scale, half of them mirrored), written as
JPEG quality 95:

``evaluation``
    chelsea coffee dog eagle rocket horses china kite camera: 9 photos, 108 views.
``calibration``
    astronaut motorcycle_left motorcycle_right giraffe person flower coins
    clock_motion scream: 9 photos, 108 views.

Runs, MobileNetV2 (ImageNet, fp32 ONNX packed into a bundle with its
preprocessing: crop 0.875, ImageNet mean/std, labels):

``plain``
    ``mixed_precision=False``: the quantizer's full-int8 model: ONNX
    Runtime static QDQ, per-channel int8 weights, MinMax calibration, with
    the quantizer's own steps (stream equalization, bias correction, float
    residual Adds and outputs, compact file; see docs/quantize.md).
``mixed``
    ``mixed_precision=True``, ``min_agreement`` 0.97: the quantizer keeps a
    cheap set of sensitive tensors in float (harm per float MAC, whole float
    islands) until agreement on the *calibration* views reaches the target
    and holds it for the next set; agreement is then measured on the
    evaluation views.
``pruned``
    the same as ``mixed`` with ``prune="channels:0.25"``: the fp32 model
    with 25 % of the prunable conv channels removed (no fine-tuning), then
    quantized. Its artifacts are measured against the unpruned fp32 model.

and Fashion-MNIST (``fashion_mnist/cnn.onnx``, calibrated on
``calibration.npz``, evaluated on the 2,000 labelled images of
``test.npz``, mean 0.2860 std 0.3530): accuracy fp32 against int8.

Per artifact and run: top-1 agreement with fp32, fp32 top-1 within the
artifact's top-5, accuracy (labelled sets), file and gzip size and their
ratio to fp32, median latency at one thread (30 runs after warm-up, as the
quantizer measures it) and the speed-up fp32/artifact. The TFLite artifact
is compared with the fp32 *ONNX* model (no fp32 TFLite is made). Stage
timings come from the job's own progress and messages.

The job times each model once, one after the other; on a shared machine a
burst of load can land on one of them. So every model file the job evaluates
is also copied aside (the job's ``evaluate`` call is wrapped; nothing else
changes) and, after the MobileNetV2 runs, all of them are timed again
through the agent's runtimes at one thread, interleaved: ``--latency-rounds``
rounds (default 10), each timing every model (30 runs after 3 warm-up runs,
median) on one evaluation view; the speed-up is the median over rounds of
fp32 time / model time within the round.

The int8 TFLite target needs the onnx2tf environment
(``scripts/setup_onnx2tf.sh``); without it the job skips that target and the
report (``details.tflite.skipped``) says why: so does this benchmark.

Run it from the repository root (several minutes: the mixed-precision search
quantizes the model once per candidate tensor)::

    .venv/bin/python benchmarks/quantize.py
    .venv/bin/python benchmarks/quantize.py --targets onnx --skip-prune
    .venv/bin/python benchmarks/quantize.py --skip-fmnist --json-only

Assets come from the cache (``$EDGE_AGENT_CACHE`` or ``~/.cache/edge-agent``,
or ``--cache DIR``) and are built there by ``testassets`` when
missing. A JSON object is printed on stdout (machine, parameters, every run's
artifacts, details and stage timings, and a summary against the issue's
targets), then a readable table (not with ``--json-only``); progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench import PREPROCESSING, emit, keeping_artifacts, loadavg, machine_info as _machine_info, pack_mobilenet  # noqa: E402

# This file is named like the ``quantize`` package: when run as a script its
# own folder is sys.path[0] and would shadow the package, so drop it (the
# helper module above is already imported).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import testassets  # noqa: E402
from testassets.fashion_mnist import (FASHION_MNIST_LABELS_PATH, FASHION_MNIST_MEAN,  # noqa: E402
                                      FASHION_MNIST_STD)

from quantize.data import Sample, make_views  # noqa: E402
from quantize.errors import QualityGateFailed  # noqa: E402
from quantize.evaluate import Artifact, interleaved_latency  # noqa: E402
from quantize.pipeline import QuantizeOptions, run as run_quantize  # noqa: E402
from quantize.report import floor_text  # noqa: E402

# Photos of things an ImageNet classifier is meant for, split into two
# disjoint sets. Textures, microscopy and text pages are left out of both:
# fp32's own top-1 on them is a near tie, and top-1 agreement on near ties
# measures noise, not quantization.
EVAL_PHOTOS = ("chelsea", "coffee", "dog", "eagle", "rocket", "horses", "china", "kite", "camera")
CALIBRATION_PHOTOS = (
    "astronaut", "motorcycle_left", "motorcycle_right", "giraffe", "person", "flower", "coins", "clock_motion", "scream",
)
VIEWS_PER_PHOTO = 12
JPEG_QUALITY = 95
PRUNE_SPEC = "channels:0.25"
FMNIST_MEAN = FASHION_MNIST_MEAN
FMNIST_STD = FASHION_MNIST_STD
FMNIST_LABELS = FASHION_MNIST_LABELS_PATH

# The issue's targets (issue 3, "Show").
TARGET_AGREEMENT = 0.97  # top-1 agreement after mixed precision
TARGET_SPEEDUP = 1.8  # fp32 latency / int8 latency, 1 thread, gate met
TARGET_SIZE_RATIO = 0.27  # int8 size / fp32 size
TARGET_FMNIST_DROP = 0.5  # accuracy points
PLAIN_REFERENCE = 0.84  # the issue's figure for plain ORT static QDQ per-channel


def progress(message: str) -> None:
    print(f"[quantize-bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    try:
        import onnx

        onnx_version = onnx.__version__
    except ImportError:  # pragma: no cover
        onnx_version = None
    return _machine_info(onnx=onnx_version)


# ------------------------------------------------------------------ data


def photo_split(photos_dir: Path) -> tuple[list[str], list[str]]:
    """(calibration photo names, evaluation photo names): disjoint."""
    names = sorted(p.stem for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    missing = [n for n in EVAL_PHOTOS + CALIBRATION_PHOTOS if n not in names]
    if missing:
        raise SystemExit(f"{photos_dir}: photo(s) missing: {', '.join(missing)}")
    return list(CALIBRATION_PHOTOS), list(EVAL_PHOTOS)


def build_views(photos_dir: Path, root: Path, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    """The calibration and evaluation view folders under ``root`` (reused
    when ``root/views.json`` matches these parameters)."""
    calibration, evaluation = photo_split(photos_dir)
    params = {
        "seed": seed,
        "views_per_photo": VIEWS_PER_PHOTO,
        "jpeg_quality": JPEG_QUALITY,
        "calibration_photos": calibration,
        "evaluation_photos": evaluation,
        "photo_sizes": {n: (photos_dir / f"{n}.jpg").stat().st_size for n in calibration + evaluation},
    }
    stamp = root / "views.json"
    cal_dir, eval_dir = root / "calibration", root / "evaluation"
    if stamp.is_file():
        try:
            cached = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            cached = None
        if cached == params and all(
            d.is_dir() and len(list(d.glob("*.jpg"))) == VIEWS_PER_PHOTO * len(names)
            for d, names in ((cal_dir, calibration), (eval_dir, evaluation))
        ):
            progress(f"views: reusing {root}")
            return cal_dir, eval_dir, params
    progress(f"views: writing {VIEWS_PER_PHOTO} views of each photo to {root}")
    root.mkdir(parents=True, exist_ok=True)
    for folder, names in ((cal_dir, calibration), (eval_dir, evaluation)):
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        for name in names:
            image = cv2.imread(str(photos_dir / f"{name}.jpg"), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"{photos_dir / name}.jpg: not readable")
            # A seed per photo that does not depend on which other photos exist.
            views = make_views(image, VIEWS_PER_PHOTO, seed=seed * 1_000_003 + zlib.crc32(name.encode()))
            for i, view in enumerate(views):
                ok = cv2.imwrite(str(staging / f"{name}_{i}.jpg"), view, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise SystemExit(f"cannot write {staging / name}_{i}.jpg")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    stamp.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return cal_dir, eval_dir, params


# ------------------------------------------------------------------ one job


class Timeline:
    """Collects the job's messages and progress stages with their times, and
    turns them into stage durations."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.t0 = time.perf_counter()
        self.messages: list[tuple[float, str]] = []
        self.stages: dict[str, list[float]] = {}  # label -> [start, end]

    def echo(self, text: str) -> None:
        now = time.perf_counter()
        self.messages.append((now, text))
        for line in str(text).splitlines():
            print(f"[quantize-bench] {self.tag} | {line}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        start = time.perf_counter()
        self.stages[label] = [start, start]
        done = 0
        last = start
        progress(f"{self.tag} | {label}: 0/{total}")

        def update(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if now - last >= 10.0:  # a line every 10 s at most
                last = now
                progress(f"{self.tag} | {label}: {done}/{total} ({now - start:.0f} s)")

        try:
            yield update
        finally:
            self.stages[label][1] = end = time.perf_counter()
            progress(f"{self.tag} | {label}: {done}/{total} done in {end - start:.1f} s")

    def first(self, prefix: str) -> float | None:
        return next((t for t, text in self.messages if str(text).startswith(prefix)), None)

    def durations(self, end: float, pruned: bool) -> dict[str, float | None]:
        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 2) if a is not None and b is not None else None

        cal = self.stages.get("calibration data")
        ev = self.stages.get("evaluation")
        sens = self.stages.get("sensitivity")
        onnx_at = self.first("int8 ONNX")
        tfl_at = self.first("int8 TFLite")
        eval_at = ev[0] if ev else None
        after_cal = cal[1] if cal else None
        first_target = onnx_at or tfl_at or eval_at
        return {
            "total_s": round(end - self.t0, 2),
            "load_inputs_s": span(self.t0, cal[0] if cal else None),
            "preprocess_calibration_s": span(*cal) if cal else None,
            "prune_s": span(after_cal, first_target) if pruned else None,
            "int8_onnx_s": span(onnx_at, tfl_at or eval_at),
            "sensitivity_ranking_s": span(*sens) if sens else None,
            "int8_tflite_s": span(tfl_at, eval_at),
            "evaluation_s": span(*ev) if ev else None,
            "report_and_bundles_s": span(ev[1] if ev else None, end),
        }


def run_job(tag: str, opts: QuantizeOptions, keep: Path | None = None) -> dict[str, Any]:
    """Run the quantize job; return its report.json (read back from disk),
    whether the gate failed, any other error, stage timings and (with
    ``keep``) copies of the evaluated model files."""
    progress(f"{tag}: running quantize (targets {', '.join(opts.targets)}, mixed precision "
             f"{'on' if opts.mixed_precision else 'off'}{', prune ' + opts.prune if opts.prune else ''})")
    tl = Timeline(tag)
    error: dict[str, Any] | None = None
    gate_error = None
    kept: list[Artifact] = []
    try:
        with keeping_artifacts(keep, kept) if keep else contextlib.nullcontext():
            run_quantize(opts, progress=tl.progress, echo=tl.echo)
    except QualityGateFailed as exc:
        gate_error = str(exc)
        progress(f"{tag}: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded in the output, the other runs go on
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        progress(f"{tag}: FAILED {type(exc).__name__}: {exc}")
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    end = time.perf_counter()
    report_file = Path(opts.out) / "report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else None
    return {
        "report": report,
        "gate_failed": gate_error,
        "error": error,
        "stages": tl.durations(end, bool(opts.prune)),
        "out": str(opts.out),
        "kept": kept,
    }


# ------------------------------------------------------------------ summaries


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize_job(job: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one job: per artifact, ratios against fp32."""
    report = job["report"]
    out: dict[str, Any] = {"stages_s": job["stages"]}
    if job["error"]:
        out["error"] = {k: v for k, v in job["error"].items()}
    if report is None:
        out["report"] = None
        return out
    arts = report["artifacts"]
    base = arts[0]
    artifacts: dict[str, Any] = {}
    for a in arts:
        artifacts[a["label"]] = {
            "runtime": a["runtime"],
            "agreement_top1": a["agreement_top1"],
            "agreement_top1_stable": a.get("agreement_top1_stable"),
            "fp32_top1_in_top5": a["fp32_top1_in_top5"],
            "accuracy": a["accuracy"],
            "size_bytes": a["size_bytes"],
            "compressed_bytes": a["compressed_bytes"],
            "size_ratio": _r(a["size_bytes"] / base["size_bytes"]),
            "compressed_ratio": _r(a["compressed_bytes"] / base["compressed_bytes"]),
            "latency_ms": a["latency_ms"],
            "speedup_vs_fp32": _r(base["latency_ms"] / a["latency_ms"], 3) if a["latency_ms"] else None,
            "samples": a["samples"],
        }
    details = report.get("details") or {}
    onnx_d = details.get("onnx")
    tfl_d = details.get("tflite")
    out.update(
        {
            "gate": report["gate"],
            "calibration": {k: report["calibration"][k] for k in ("source", "samples", "method")}
            | {"skipped": len(report["calibration"].get("skipped") or [])},
            "evaluation": report["evaluation"],
            "artifacts": artifacts,
            "onnx": summarize_onnx(onnx_d) if onnx_d is not None else None,
            "tflite": summarize_tflite(tfl_d) if tfl_d is not None else None,
            "bundles": report.get("bundles"),
        }
    )
    if report.get("prune"):
        p = report["prune"]
        out["prune"] = {
            k: p.get(k)
            for k in ("spec", "params_before", "params_after", "params_ratio", "sparsity")
        } | {
            "groups_pruned": len(p.get("groups") or []),
            "layers_changed": len(p.get("layers") or []),
            "groups_skipped": len(p.get("skipped") or []),
            "rules": sorted({g.get("rule", "?") for g in p.get("groups") or []}),
        }
    return out


def summarize_onnx(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("method", "per_channel", "format", "calibration_s", "agreement_on_calibration_full_int8",
            "equalized_streams", "bias_correction", "float_residual_adds", "float_outputs")
    out = {k: d.get(k) for k in keys}
    mp = d.get("mixed_precision")
    if mp is not None:
        out["mixed_precision"] = {
            "needed": mp.get("needed"),
            "candidates": mp.get("candidates"),
            "float_tensors": len(mp.get("float_nodes") or []),
            "float_nodes": mp.get("float_nodes"),
            "float_nodes_consumers": mp.get("float_nodes_consumers"),
            "float_compute_nodes": mp.get("float_compute_nodes"),
            "float_macs_share": mp.get("float_macs_share"),
            "agreement_on_calibration": mp.get("agreement_on_calibration"),
            "target": mp.get("target"),
            "met_on_calibration": mp.get("met"),
            "search_s": mp.get("search_s"),
            "tried": mp.get("tried"),
            "latency": mp.get("latency"),
        }
    return out


def summarize_tflite(d: dict[str, Any]) -> dict[str, Any]:
    if "skipped" in d:
        return {"skipped": d["skipped"]}
    out = {k: v for k, v in d.items() if k not in ("ops",)}
    if "float_nodes" in d:
        out["float_tensors"] = len(d["float_nodes"] or [])
    if "ops" in d:
        out["ops"] = sorted(set(d["ops"]))
    return out


def latency_check(kept: dict[str, list[Artifact]], photo: Path, rounds: int, runs: int) -> dict[str, Any]:
    """Median latency (1 thread) of every evaluated model of every run,
    interleaved: each round times every model once (``runs`` runs after 3
    warm-up runs, median), so load on the machine hits all of them alike.
    Speed-ups are against the fp32 model, per round, then the median."""
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    models: list[tuple[str, Artifact]] = []
    for tag, arts in kept.items():
        for art in arts:
            if art.label == "fp32":
                if not any(k == "fp32" for k, _ in models):
                    models.insert(0, ("fp32", art))
                continue
            models.append((f"{tag}/{art.label}", art))
    times = interleaved_latency(
        dict(models), lambda runner: runner.tensors([Sample(photo.name, image)])[0], rounds=rounds, runs=runs,
        on_round=lambda r, t: progress(f"latency round {r + 1}/{rounds}: "
                                       + ", ".join(f"{k} {v[-1]:.2f}" for k, v in t.items())),
    )
    base = times["fp32"]
    return {
        "photo": photo.name,
        "rounds": rounds,
        "runs_per_round": runs,
        "median_ms": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "round_medians_ms": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "speedup_vs_fp32": {
            k: round(statistics.median(a / b for a, b in zip(base, v)), 3) for k, v in times.items() if k != "fp32"
        },
        "loadavg": loadavg(),
    }


# ------------------------------------------------------------------ verdicts


def _art(run: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
    if not run or not run.get("artifacts"):
        return None
    return run["artifacts"].get(label)


def targets_summary(results: dict[str, Any], min_agreement: float) -> list[dict[str, Any]]:
    """Rows: (what, target, measured, met)."""
    rows: list[dict[str, Any]] = []
    mob = results.get("mobilenet_v2", {})
    plain, mixed, pruned = mob.get("plain"), mob.get("mixed"), mob.get("pruned")
    failing = set((mixed or {}).get("gate", {}).get("failing") or [])

    def row(what: str, target: str, value: float | None, fmt: str, met: bool | None, note: str = "") -> None:
        rows.append({
            "what": what,
            "target": target,
            "measured": value,
            "shown": "n/a" if value is None else fmt.format(value),
            "met": met,
            "note": note,
        })

    for runtime in ("onnx", "tflite"):
        label = f"int8 {runtime}"
        p, m = _art(plain, label), _art(mixed, label)
        skipped = (mixed or {}).get("tflite", {}) or {}
        why = skipped.get("skipped", "") if runtime == "tflite" else ""
        if p is not None:
            row(f"{label}: agreement, plain (no mixed precision)", f"reference {PLAIN_REFERENCE:.0%}",
                p["agreement_top1"], "{:.1%}", None)
            row(f"{label}: speed-up, plain", f"(>= {TARGET_SPEEDUP}x)", p["speedup_vs_fp32"], "{:.2f}x", None)
            check = (mob.get("latency_check") or {}).get("speedup_vs_fp32", {}).get(f"plain/{label}")
            if check is not None:
                row(f"{label}: speed-up, plain, interleaved re-measure", f"(>= {TARGET_SPEEDUP}x)", check, "{:.2f}x", None)
            row(f"{label}: size int8/fp32, plain", f"(<= {TARGET_SIZE_RATIO})", p["size_ratio"], "{:.3f}", None)
        if m is None:
            row(f"{label}: agreement after mixed precision", f">= {TARGET_AGREEMENT:.0%}", None, "", None,
                why or "no artifact")
            continue
        row(f"{label}: agreement after mixed precision", f">= {TARGET_AGREEMENT:.0%}", m["agreement_top1"], "{:.1%}",
            m["agreement_top1"] >= TARGET_AGREEMENT)
        row(f"{label}: fp32 top-1 in int8 top-5", "(report)", m["fp32_top1_in_top5"], "{:.1%}", None)
        gate = label not in failing  # this artifact reached --min-agreement
        row(f"{label}: speed-up fp32/int8, 1 thread", f">= {TARGET_SPEEDUP}x with gate met",
            m["speedup_vs_fp32"], "{:.2f}x", m["speedup_vs_fp32"] >= TARGET_SPEEDUP and gate,
            "" if gate else "agreement below the gate")
        check = (mob.get("latency_check") or {}).get("speedup_vs_fp32", {}).get(f"mixed/{label}")
        if check is not None:
            row(f"{label}: speed-up, interleaved re-measure", f">= {TARGET_SPEEDUP}x with gate met", check, "{:.2f}x",
                check >= TARGET_SPEEDUP and gate, "" if gate else "agreement below the gate")
        row(f"{label}: size int8/fp32", f"<= {TARGET_SIZE_RATIO}", m["size_ratio"], "{:.3f}",
            m["size_ratio"] <= TARGET_SIZE_RATIO)
    if mixed and mixed.get("onnx") and mixed["onnx"].get("mixed_precision"):
        mp = mixed["onnx"]["mixed_precision"]
        n = mp.get("float_tensors")
        row("int8 onnx: tensors kept in float", "fewest", n, "{}", None,
            f"of {mp.get('candidates')} candidates" if mp.get("candidates") else "")
    pf = _art(pruned, f"fp32 pruned {PRUNE_SPEC}")
    pi = _art(pruned, "int8 onnx")
    if pruned is not None and pruned.get("error") and pf is None:
        row(f"pruned {PRUNE_SPEC}", "(report)", None, "", None, pruned["error"]["message"][:80])
    pt = _art(pruned, "int8 tflite")
    lc = (mob.get("latency_check") or {}).get("speedup_vs_fp32", {})
    for name, label, a in ((f"fp32 pruned {PRUNE_SPEC}", f"fp32 pruned {PRUNE_SPEC}", pf),
                           ("pruned + int8 onnx", "int8 onnx", pi), ("pruned + int8 tflite", "int8 tflite", pt)):
        if a is None:
            continue
        row(f"{name}: agreement with fp32", "(report)", a["agreement_top1"], "{:.1%}", None)
        row(f"{name}: fp32 top-1 in its top-5", "(report)", a["fp32_top1_in_top5"], "{:.1%}", None)
        row(f"{name}: speed-up vs fp32", "(report)", a["speedup_vs_fp32"], "{:.2f}x", None)
        if f"pruned/{label}" in lc:
            row(f"{name}: speed-up, interleaved", "(report)", lc[f"pruned/{label}"], "{:.2f}x", None)
    fm = results.get("fashion_mnist")
    if fm and fm.get("artifacts"):
        base = fm["artifacts"]["fp32"]["accuracy"]
        row("Fashion-MNIST fp32 accuracy", "(report)", base, "{:.2%}", None)
        for runtime in ("onnx", "tflite"):
            a = fm["artifacts"].get(f"int8 {runtime}")
            if a is None:
                why = fm.get("first_attempt", {}).get("error", {}).get("message") or (fm.get("tflite") or {}).get("skipped")
                if runtime == "tflite" and why:
                    row("Fashion-MNIST drop, int8 tflite", f"<= {TARGET_FMNIST_DROP} point", None, "", None, why[:80])
                continue
            drop = round((base - a["accuracy"]) * 100, 2)
            row(f"Fashion-MNIST int8 {runtime} accuracy", "(report)", a["accuracy"], "{:.2%}", None)
            row(f"Fashion-MNIST drop, int8 {runtime}", f"<= {TARGET_FMNIST_DROP} point", drop, "{:+.2f} pt",
                drop <= TARGET_FMNIST_DROP)
    elif fm and fm.get("error"):
        row("Fashion-MNIST", "", None, "", None, fm["error"]["message"][:80])
    return rows


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    p = report["parameters"]
    lines = [
        f"edge-agent quantize on {m['cpu_usable']} CPU(s) {m['cpu_model']}, ONNX Runtime {m['onnxruntime']}; "
        f"MobileNetV2: {p['calibration_views']} calibration views of {len(p['calibration_photos'])} photos, "
        f"{p['evaluation_views']} evaluation views of {len(p['evaluation_photos'])} other photos",
        "",
    ]
    for section, runs in (("MobileNetV2", report["mobilenet_v2"]), ("Fashion-MNIST", {"fmnist": report.get("fashion_mnist")})):
        for name, run in runs.items():
            if not isinstance(run, dict) or "stages_s" not in run:
                continue
            head = f"{section} / {name}"
            if run.get("gate"):
                g = run["gate"]
                head += f"  (gate {g['min_agreement']:.0%}: {'passed' if g['passed'] else 'FAILED ' + ', '.join(g['failing'])})"
            lines.append(head)
            if run.get("error"):
                lines.append(f"  error: {run['error']['type']}: {run['error']['message']}")
            if run.get("first_attempt"):
                fa = run["first_attempt"]
                lines.append(
                    f"  with targets {','.join(fa['targets'])} the job failed: {fa['error']['type']}: "
                    f"{fa['error']['message']}; the numbers below are from a second run with the onnx target only"
                )
            if run.get("artifacts"):
                lines.append(
                    f"  {'artifact':<28} {'agree':>7} {'top5':>7} {'acc':>7} {'MB':>7} {'size x':>7} {'gzip x':>7} "
                    f"{'ms':>7} {'speed x':>7}"
                )
                for label, a in run["artifacts"].items():
                    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
                    lines.append(
                        f"  {label:<28} {pct(a['agreement_top1']):>7} {pct(a['fp32_top1_in_top5']):>7} "
                        f"{pct(a['accuracy']):>7} {a['size_bytes'] / 1e6:>7.2f} {a['size_ratio']:>7.3f} "
                        f"{a['compressed_ratio']:>7.3f} {a['latency_ms']:>7.2f} {a['speedup_vs_fp32']:>7.2f}"
                    )
            tfl = run.get("tflite")
            if tfl and tfl.get("skipped"):
                lines.append(f"  int8 tflite skipped: {tfl['skipped']}")
            mp = (run.get("onnx") or {}).get("mixed_precision")
            if mp:
                if mp.get("needed"):
                    lines.append(
                        f"  mixed precision: {mp['float_tensors']} of {mp['candidates']} tensors kept in float; "
                        f"agreement on calibration {100 * (run['onnx'].get('agreement_on_calibration_full_int8') or 0):.1f}% "
                        f"-> {100 * (mp['agreement_on_calibration'] or 0):.1f}% (target {mp['target']:.0%}, "
                        f"{'met' if mp['met_on_calibration'] else 'NOT met'}); search {mp['search_s']} s"
                    )
                else:
                    lines.append("  mixed precision: not needed (full int8 meets the target on calibration data)")
            if run.get("prune"):
                pr = run["prune"]
                lines.append(
                    f"  prune {pr['spec']}: parameters {pr['params_before']:,} -> {pr['params_after']:,} "
                    f"({pr['params_ratio']:.3f}), {pr['groups_pruned']} channel groups pruned, {pr['groups_skipped']} left alone"
                )
            st = run["stages_s"]
            lines.append("  stages: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in st.items() if v is not None))
            lines.append("")
    lc = report["mobilenet_v2"].get("latency_check")
    if lc and "median_ms" in lc:
        lines.append(
            f"MobileNetV2 latency, every model re-timed interleaved ({lc['rounds']} rounds x "
            f"{lc['runs_per_round']} runs, 1 thread, median; speed-up = median of per-round fp32/model)"
        )
        lines.append(f"  {'model':<36} {'ms':>7} {'speed x':>8}")
        for k, v in lc["median_ms"].items():
            sp = lc["speedup_vs_fp32"].get(k, 1.0)
            lines.append(f"  {k:<36} {v:>7.2f} {sp:>8.2f}")
        lines.append("")
    elif lc:
        lines.append(f"Latency re-measure: {lc.get('skipped')}")
        lines.append("")
    runs = {tag: run for tag, run in report["mobilenet_v2"].items() if isinstance(run, dict) and "artifacts" in run}
    floors = [run["evaluation"].get("fp32_noise_floor") for run in runs.values() if run.get("evaluation")]
    nf = next((f for f in floors if f), None)
    if nf:
        lines.append(f"{floor_text(nf)} (from the job's report)")
        lines.append(f"  {'model':<36} {'all views':>10} {'stable views':>13}")
        for tag, run in runs.items():
            for label, a in run["artifacts"].items():
                if label != "fp32" and a.get("agreement_top1_stable") is not None:
                    lines.append(f"  {tag + '/' + label:<36} {100 * a['agreement_top1']:>9.1f}% "
                                 f"{100 * a['agreement_top1_stable']:>12.1f}%")
        lines.append("")
    lines.append("Against the issue's targets")
    lines.append(f"  {'what':<52} {'target':<24} {'measured':>10}  verdict")
    for r in report["targets"]:
        verdict = {True: "met", False: "NOT MET", None: ""}[r["met"]]
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"  {r['what']:<52} {r['target']:<24} {r['shown']:>10}  {verdict}{note}")
    return "\n".join(lines)


# ------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="onnx,tflite",
                        help="artifacts to make, comma-separated: onnx, tflite (default both)")
    parser.add_argument("--min-agreement", type=float, default=TARGET_AGREEMENT,
                        help=f"the quantizer's --min-agreement for the mixed-precision runs (default {TARGET_AGREEMENT})")
    parser.add_argument("--skip-prune", action="store_true", help=f"leave out the {PRUNE_SPEC} run")
    parser.add_argument("--skip-fmnist", action="store_true", help="leave out Fashion-MNIST")
    parser.add_argument("--skip-plain", action="store_true", help="leave out the run without mixed precision")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo views (default 0)")
    parser.add_argument("--latency-rounds", type=int, default=10,
                        help="rounds of the interleaved re-timing of every MobileNetV2 model (0: none; default 10)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON object only, no table")
    parser.add_argument("--cache", type=Path, default=None,
                        help="asset cache (default: $EDGE_AGENT_CACHE or ~/.cache/edge-agent)")
    args = parser.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets or set(targets) - {"onnx", "tflite"}:
        parser.error("--targets: a comma-separated list of onnx, tflite")
    if not 0.0 < args.min_agreement <= 1.0:
        parser.error("--min-agreement must be in (0, 1]")

    logging.basicConfig(level=logging.WARNING, format="[quantize-bench] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # ORT's quantizer advice goes to the root logger
        handler.addFilter(lambda record: record.name != "root")

    cache = (args.cache if args.cache is not None else testassets.default_cache_dir()).expanduser().resolve()
    machine = machine_info()
    progress(f"assets from {cache} (built there when missing)")
    only = {"mobilenet_v2", "imagenet_labels", "photos"}
    if not args.skip_fmnist:
        only.add("fashion_mnist")
    assets = testassets.build(cache, only=only)
    photos_dir = assets["photos"]
    if photos_dir.is_file():
        photos_dir = photos_dir.parent
    cal_dir, eval_dir, view_params = build_views(photos_dir, cache / "quantize-bench", args.seed)

    results: dict[str, Any] = {"mobilenet_v2": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge-quantize-bench-") as tmp:
        work = Path(tmp)
        bundle = pack_mobilenet(assets, work / "bundle")

        def mobilenet(out: str, **kw: Any) -> QuantizeOptions:
            return QuantizeOptions(model=bundle, calibration=cal_dir, evaluation=eval_dir, out=work / out,
                                   targets=targets, min_agreement=args.min_agreement, **kw)

        jobs: list[tuple[str, QuantizeOptions]] = []
        if not args.skip_plain:
            jobs.append(("plain", mobilenet("plain", mixed_precision=False)))
        jobs.append(("mixed", mobilenet("mixed", mixed_precision=True)))
        if not args.skip_prune:
            jobs.append(("pruned", mobilenet("pruned", mixed_precision=True, prune=PRUNE_SPEC)))
        kept: dict[str, list[Artifact]] = {}
        for tag, opts in jobs:
            job = run_job(tag, opts, keep=work / "kept" / tag if args.latency_rounds > 0 else None)
            results["mobilenet_v2"][tag] = summarize_job(job)
            kept[tag] = job["kept"]
        if args.latency_rounds > 0:
            progress(f"latency: every model of every run, interleaved, {args.latency_rounds} rounds")
            try:
                results["mobilenet_v2"]["latency_check"] = latency_check(
                    kept, eval_dir / "chelsea_0.jpg", args.latency_rounds, 30)
            except Exception as exc:  # noqa: BLE001
                results["mobilenet_v2"]["latency_check"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}

        if not args.skip_fmnist:
            fm = assets["fashion_mnist"]
            fm_dir = fm if fm.is_dir() else fm.parent
            opts = QuantizeOptions(
                model=fm_dir / "cnn.onnx",
                calibration=fm_dir / "calibration.npz",
                evaluation=fm_dir / "test.npz",
                out=work / "fmnist",
                labels=FMNIST_LABELS,
                preprocessing={"mean": (FMNIST_MEAN,) * 3, "std": (FMNIST_STD,) * 3},
                targets=targets,
                min_agreement=args.min_agreement,
                mixed_precision=True,
            )
            job = run_job("fmnist", opts)
            fm_sum = summarize_job(job)
            if job["error"] and job["report"] is None and "tflite" in targets and len(targets) > 1:
                # Keep the int8 ONNX numbers when only the TFLite step broke.
                progress("fmnist: the job failed; running it again with the onnx target only")
                failed = fm_sum
                job = run_job("fmnist-onnx", dataclasses.replace(opts, out=work / "fmnist-onnx", targets=("onnx",)))
                fm_sum = summarize_job(job)
                fm_sum["first_attempt"] = {"targets": list(targets), "error": failed["error"]}
            arts = fm_sum.get("artifacts") or {}
            if "fp32" in arts:
                base = arts["fp32"]["accuracy"]
                fm_sum["accuracy"] = {label: a["accuracy"] for label, a in arts.items()}
                fm_sum["drop_points"] = {
                    label: round((base - a["accuracy"]) * 100, 2) for label, a in arts.items() if label != "fp32"
                }
            results["fashion_mnist"] = fm_sum

    machine["loadavg_at_end"] = loadavg()
    report: dict[str, Any] = {
        "benchmark": "quantize",
        "machine": machine,
        "parameters": {
            "targets": list(targets),
            "min_agreement": args.min_agreement,
            "method": "minmax",
            "per_channel": True,
            "threads": 1,
            "latency": "median of 30 runs after 3 warm-up runs, 1 thread (quantize.evaluate)",
            "prune": None if args.skip_prune else PRUNE_SPEC,
            "model": str(assets["mobilenet_v2"]),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in PREPROCESSING.items()},
            "views_dir": str(cal_dir.parent),
            "seed": args.seed,
            "views_per_photo": VIEWS_PER_PHOTO,
            "jpeg_quality": JPEG_QUALITY,
            "calibration_photos": view_params["calibration_photos"],
            "evaluation_photos": view_params["evaluation_photos"],
            "calibration_views": len(list(cal_dir.glob("*.jpg"))),
            "evaluation_views": len(list(eval_dir.glob("*.jpg"))),
            "fashion_mnist": None if args.skip_fmnist else {
                "mean": FMNIST_MEAN, "std": FMNIST_STD, "labels": str(FMNIST_LABELS)},
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
        **results,
    }
    report["targets"] = targets_summary(results, args.min_agreement)
    emit(report, table(report), json_only=args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
