"""``edge-agent quantize``: FP32 ONNX in; int8 ONNX and int8 TFLite bundles
and a measured report out.

Steps: resolve the model and its preprocessing (from a bundle's manifest or
the command-line options) -> make the input static -> optionally prune ->
calibrate on real pictures -> int8 ONNX (ORT static QDQ, per-channel) ->
mixed precision when agreement falls short -> int8 TFLite (onnx2tf, in its
own environment) -> evaluate everything on pictures disjoint from the
calibration set -> quality gate -> bundles (with ``report.json``), signed
when a key is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from edge_agent import __version__
from edge_agent.bundles import is_archive, open_bundle
from edge_agent.bundles.manifest import Preprocessing, TensorSpec
from edge_agent.bundles.pack import default_preprocessing, pack
from edge_agent.errors import BundleError
from edge_agent.runtimes import describe_model
from quantize import report as report_mod
from quantize.agreement import Judge, judge_for, map_output_names
from quantize.data import SampleSet, TensorReader, load_samples, preprocess_all
from quantize.errors import QualityGateFailed, QuantizeError, QuantizeInputError
from quantize.evaluate import Artifact, Runner, evaluate, latency_cost
from quantize.mixed import MixedPrecisionResult, closed_prefixes, cost_aware, rank_sensitivity, search_stable
from quantize.onnx_int8 import OnnxInt8Quantizer, dequantize_weights, fix_input_shape, input_shape, load_onnx
from quantize.qdq import QdqEditor, node_macs

log = logging.getLogger(__name__)

# The fixed price of a float island in the mixed-precision order, as a share
# of the model's multiply-accumulates (a Q/DQ pair and a kernel switch).
ISLAND_OVERHEAD = 0.01

_METRIC_WORDS = {"top1": "top-1 agreement with fp32", "map50": "detection agreement with fp32 (mAP@0.5 against fp32's boxes)"}

# The calibration method when none is given, per task. Detectors: measured on
# the registry's YOLOv5s (docs/benchmarks.md), int8 ONNX keeps mAP@0.5
# 96.7 % of fp32's boxes with percentile ranges against 92.1 % with MinMax
# (and entropy): the SiLU activations' rare large values stretch a MinMax
# range over the small ones that decide the boxes.
DEFAULT_METHOD = {"classify": "minmax", "detect": "percentile"}

# A progress factory: (label, total) -> context manager yielding update(n).
Progress = Callable[[str, int], "contextlib.AbstractContextManager[Callable[[int], None]]"]


@contextlib.contextmanager
def _no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class QuantizeOptions:
    model: Path
    calibration: Path
    out: Path
    evaluation: Path | None = None
    name: str | None = None
    version: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: Path | None = None
    task: str | None = None
    method: str | None = None  # None: DEFAULT_METHOD of the model's task
    per_channel: bool = True
    min_agreement: float = 0.95
    mixed_precision: bool = True
    targets: tuple[str, ...] = ("onnx", "tflite")
    prune: str | None = None
    sign_key: Path | None = None
    calibration_limit: int | None = 300
    search_samples: int = 32
    threads: int = 1
    bias_correction: bool = True
    float_residual: bool = True
    equalize: bool = True


@dataclass
class _Source:
    fp32: Path  # static-shape fp32 ONNX in the work dir
    name: str
    version: int
    preprocessing: Preprocessing
    input: TensorSpec
    labels_path: Path | None
    labels: list[str] | None
    task: str
    postprocessing: dict[str, Any]
    dequantized_weights: int = 0


def _resolve(opts: QuantizeOptions, work: Path) -> _Source:
    """The fp32 model (static input), its preprocessing, labels and identity."""
    path = Path(opts.model).expanduser()
    overrides = {k: v for k, v in opts.preprocessing.items() if v is not None}
    if path.is_dir() or is_archive(path):
        with open_bundle(path, workdir=work) as bundle:
            m = bundle.manifest
            if m.runtime != "onnx":
                raise QuantizeInputError(f"{path}: the quantizer takes an fp32 ONNX bundle, this one is {m.runtime}")
            model_file = work / "source.onnx"
            shutil.copyfile(bundle.model_path, model_file)
            labels_path = None
            if m.labels:
                labels_path = work / "labels.txt"
                shutil.copyfile(bundle.root / m.labels, labels_path)
            pre = m.preprocessing.model_copy(update=overrides)
            name, version = m.name, m.version + 1
            task, post = m.task, m.postprocessing.model_dump()
    else:
        model_file = path
        labels_path = Path(opts.labels).expanduser() if opts.labels else None
        name, version, task, post = path.stem.replace(" ", "_"), 1, opts.task or "classify", {}
        pre = None
    model = load_onnx(model_file)
    input_name, dims = input_shape(model)
    try:
        inputs, _ = describe_model(model_file, "onnx")
    except Exception as exc:
        raise QuantizeInputError(f"{model_file}: ONNX Runtime cannot load it ({exc})") from None
    if pre is None:
        try:
            pre = default_preprocessing(inputs[0], **overrides)
        except BundleError as exc:
            raise QuantizeInputError(str(exc)) from None
    w, h = pre.size
    channels = 1 if pre.color == "gray" else 3
    static = [1, channels, h, w] if pre.layout == "nchw" else [1, h, w, channels]
    if any(d is not None and d != s for d, s in zip(dims, static)):
        raise QuantizeInputError(f"{model_file}: input {input_name!r} has shape {dims}, the preprocessing gives {static}")
    fixed = work / "fp32.onnx"
    model = fix_input_shape(model, static)
    folded = dequantize_weights(model)
    if folded:
        log.info("%s: %d weight(s) stored as int8 (weight-only quantized) expanded to float32", model_file.name, folded)
    onnx.save(model, str(fixed))
    labels = labels_path.read_text(encoding="utf-8").splitlines() if labels_path else None
    spec = TensorSpec(name=input_name, shape=static, dtype="float32")
    return _Source(
        fixed,
        opts.name or name,
        opts.version or version,
        pre,
        spec,
        labels_path,
        labels,
        opts.task or task,
        post,
        folded,
    )


def _split(calibration: SampleSet, evaluation: SampleSet | None) -> tuple[SampleSet, SampleSet]:
    """Without an evaluation set, every fifth calibration picture is held out."""
    if evaluation is not None:
        return calibration, evaluation
    if len(calibration) < 5:
        raise QuantizeInputError(
            f"{calibration.source}: {len(calibration)} picture(s) cannot be split into calibration and "
            "evaluation; give at least 5, or an evaluation set with --eval"
        )
    held = [s for i, s in enumerate(calibration.samples) if i % 5 == 4]
    kept = [s for i, s in enumerate(calibration.samples) if i % 5 != 4]
    return (
        SampleSet(kept, calibration.source, calibration.skipped),
        SampleSet(held, f"{calibration.source} (every 5th picture, held out)"),
    )


def _onnx_int8(
    src: _Source,
    base: Path,
    calib: np.ndarray,
    reference_all: Any,
    opts: QuantizeOptions,
    work: Path,
    progress: Progress,
    judge: Judge,
) -> tuple[Path, dict[str, Any], OnnxInt8Quantizer]:
    """``reference_all``: what ``judge`` collects from the fp32 (``base``)
    model on ``calib``, given when mixed precision is on. Also returns the
    quantizer, whose fp32 models (equalized: ``prepared``; and
    bias-corrected: ``source``) serve the TFLite converter."""
    quantizer = _calibrated_quantizer(src, base, calib, opts, work)
    full = quantizer.quantize(work / "int8_full.onnx")
    path, info = _onnx_mixed(src, base, quantizer, full, calib, reference_all, opts, work, progress, judge)
    return path, info, quantizer


def _calibrated_quantizer(
    src: _Source, base: Path, calib: np.ndarray, opts: QuantizeOptions, work: Path
) -> OnnxInt8Quantizer:
    quantizer = OnnxInt8Quantizer(
        base,
        work / "ort",
        method=opts.method,
        per_channel=opts.per_channel,
        bias_correction=opts.bias_correction,
        float_residual=opts.float_residual,
        equalize=opts.equalize,
    )
    quantizer.workdir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    quantizer.prepare()
    quantizer.calibrate(TensorReader(src.input.name, calib))
    quantizer.notes["calibration_s"] = round(time.perf_counter() - t0, 1)
    return quantizer


def _onnx_mixed(
    src: _Source,
    base: Path,
    quantizer: OnnxInt8Quantizer,
    full: Path,
    calib: np.ndarray,
    reference_all: Any,
    opts: QuantizeOptions,
    work: Path,
    progress: Progress,
    judge: Judge,
) -> tuple[Path, dict[str, Any]]:
    info: dict[str, Any] = {
        "method": opts.method,
        "per_channel": opts.per_channel,
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8",
        **quantizer.notes,
    }
    if reference_all is None:
        return quantizer.finalize(full, work / "int8_final.onnx"), info
    step = max(1, len(calib) // opts.search_samples)
    subset = calib[::step][: opts.search_samples]
    fp32 = onnx.load(str(quantizer.prepared))
    editor = QdqEditor(onnx.load(str(full)), fp32)

    def build(ids: Sequence[str]) -> Path:
        path = work / "candidate.onnx"
        onnx.save(editor.with_float(list(ids)), str(path))
        return path

    def outputs_on(x: np.ndarray, raw: bool = False) -> Callable[[Path], Any]:
        def run(path: Path) -> Any:
            runner = Runner(Artifact("candidate", path, src.preprocessing), threads=2)
            try:
                return judge.raw(runner, x) if raw else judge.collect(runner, x)
            finally:
                runner.close()

        return run

    full_agreement = judge.agreement(reference_all, outputs_on(calib)(full))
    info["agreement_on_calibration_full_int8"] = round(full_agreement, 4)
    if full_agreement >= opts.min_agreement:
        info["mixed_precision"] = {"needed": False}
        return quantizer.finalize(full, work / "int8_final.onnx"), info
    ids = [c.id for c in editor.candidates]
    t0 = time.perf_counter()
    reference = outputs_on(subset, raw=True)(base)
    with progress("sensitivity", len(ids)) as tick:
        ranking = rank_sensitivity(ids, build, outputs_on(subset, raw=True), reference, progress=tick,
                                   mode="isolated", divergence=judge.divergence)
    # Cheap float islands first: harm per multiply-accumulate moved to float
    # kernels (plus a fixed price per island), each prefix closed over the
    # tensors its float nodes already enclose, the first set that holds the
    # target twice in a row.
    macs = node_macs(fp32)
    total_macs = sum(macs.values()) or 1.0
    cost = {cid: sum(macs.get(n, 0.0) for n in editor.float_compute(cid)) for cid in ids}
    order = [cid for cid, _ in cost_aware(ranking, cost, ISLAND_OVERHEAD * total_macs)]
    sets = closed_prefixes(order, editor.float_compute, len(order))
    result: MixedPrecisionResult = search_stable(
        sets, build, outputs_on(calib), reference_all, opts.min_agreement, ranking=ranking, agreement=judge.agreement
    )
    float_compute = set().union(*(editor.float_compute(cid) for cid in result.float_nodes)) if result.float_nodes else set()
    mixed = work / "int8_mixed.onnx"
    onnx.save(editor.with_float(result.float_nodes), str(mixed))
    cost = latency_cost(Artifact("full int8", full, src.preprocessing), Artifact("mixed", mixed, src.preprocessing),
                        calib[0], threads=opts.threads)
    consumers = {c.id: c.consumers for c in editor.candidates}
    info["mixed_precision"] = {
        "needed": True,
        "search_s": round(time.perf_counter() - t0, 1),
        **result.to_dict(),
        "float_nodes_consumers": sorted({n for cid in result.float_nodes for n in consumers[cid]}),
        "float_compute_nodes": sorted(float_compute),
        "float_macs_share": round(sum(macs.get(n, 0.0) for n in float_compute) / total_macs, 4),
        "candidates": len(ids),
        "latency": cost,
    }
    return quantizer.finalize(mixed), info


def _tflite_int8(
    src: _Source,
    base: Path,
    calib_samples: SampleSet,
    reference_all: Any,
    opts: QuantizeOptions,
    work: Path,
    judge: Judge,
) -> tuple[Path | None, dict[str, Any]]:
    """``reference_all``: what ``judge`` collects from the fp32 (``base``)
    model on the calibration pictures, given when mixed precision is on."""
    from quantize import tflite

    try:
        env = tflite.find_converter_env()
    except QuantizeError as exc:
        log.warning("%s", exc)
        return None, {"skipped": str(exc)}
    nhwc = src.preprocessing.model_copy(update={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "layout": "nhwc"})
    w, h = src.preprocessing.size
    channels = 1 if src.preprocessing.color == "gray" else 3
    spec = TensorSpec(name=src.input.name, shape=[1, h, w, channels], dtype="float32")
    calib = preprocess_all(calib_samples.samples, nhwc, spec)
    tfl_pre = src.preprocessing.model_copy(update={"layout": "nhwc"})
    mean, std = src.preprocessing.mean[:channels], src.preprocessing.std[:channels]
    out = work / "model_int8.tflite"
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(per_channel=opts.per_channel, env=env, progress=lambda msg: log.info("onnx2tf: %s", msg))
    if reference_all is not None:
        tfl_tensors = preprocess_all(calib_samples.samples, tfl_pre, spec)

        def agreement(path: Path) -> float:
            runner = Runner(Artifact("tflite", path, tfl_pre), threads=2)
            try:
                got = judge.collect(runner, tfl_tensors)
            finally:
                runner.close()
            return judge.agreement(reference_all, got)

        artifact = tflite.convert_int8_mixed(
            base, calib, mean, std, out, evaluate=agreement, target=opts.min_agreement, rule="stable",
            score=judge.sensitivity_score, **kwargs
        )
    else:
        artifact = tflite.convert_int8(base, calib, mean, std, out, **kwargs)
    info = {
        "conversion_s": round(time.perf_counter() - t0, 1),
        "ops": list(artifact.ops),
        "float_nodes": list(artifact.float_nodes),
    }
    if artifact.trials:
        info["agreement_on_calibration"] = artifact.agreement
        info["target_met_on_calibration"] = artifact.target_met
        info["trials"] = [{"float_nodes": k, "agreement": round(a, 4)} for k, a in artifact.trials]
    if artifact.full_int8_path is not None and reference_all is not None:
        info["latency"] = latency_cost(Artifact("full int8", artifact.full_int8_path, tfl_pre),
                                       Artifact("mixed", artifact.path, tfl_pre), tfl_tensors[0], threads=opts.threads)
        artifact.full_int8_path.unlink(missing_ok=True)
    return artifact.path, info


def run(opts: QuantizeOptions, *, progress: Progress = _no_progress, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Do the whole job; returns the report. Raises QualityGateFailed (exit
    1) after writing the report when an artifact misses the agreement target."""
    out = Path(opts.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise QuantizeInputError(f"{out} exists and is not empty; choose another --out")
    unknown = set(opts.targets) - {"onnx", "tflite"}
    if unknown:
        raise QuantizeInputError(f"unknown target(s) {sorted(unknown)} (use onnx, tflite)")
    with tempfile.TemporaryDirectory(prefix="edge-quantize-") as tmp:
        work = Path(tmp)
        src = _resolve(opts, work)
        if opts.method is None:
            opts = dataclasses.replace(opts, method=DEFAULT_METHOD.get(src.task, "minmax"))
        fp32_outputs = describe_model(src.fp32, "onnx")[1]
        judge = judge_for(src.task, src.postprocessing, src.labels, fp32_outputs)
        calib_set = load_samples(opts.calibration, labels=src.labels, limit=None)
        eval_set = load_samples(opts.evaluation, labels=src.labels) if opts.evaluation else None
        calib_set, eval_set = _split(calib_set, eval_set)
        if opts.calibration_limit and len(calib_set) > opts.calibration_limit:
            step = len(calib_set) / opts.calibration_limit
            calib_set = SampleSet([calib_set.samples[int(i * step)] for i in range(opts.calibration_limit)], calib_set.source, calib_set.skipped)
        echo(f"calibration: {len(calib_set)} pictures ({len(calib_set.skipped)} unreadable skipped); evaluation: {len(eval_set)} pictures")

        with progress("calibration data", len(calib_set)) as tick:
            calib = preprocess_all(calib_set.samples, src.preprocessing, src.input, tick)

        base = src.fp32
        prune_info = None
        if opts.prune:
            from quantize.prune import PruneSpec

            try:
                spec = PruneSpec.parse(opts.prune)
            except (ValueError, QuantizeError) as exc:
                raise QuantizeInputError(f"--prune {opts.prune}: {exc}") from None
            model = onnx.load(str(base))
            echo(f"pruning {spec} ...")
            # Channel pruning picks channels and re-fits the next layer on the
            # calibration pictures (least squares, no training); magnitude
            # pruning ignores the data.
            prune_info = spec.apply(model, calibration=TensorReader(src.input.name, calib)).to_dict()
            base = work / "fp32_pruned.onnx"
            onnx.save(model, str(base))

        artifacts = [Artifact("fp32", src.fp32, src.preprocessing)]
        if opts.prune:
            artifacts.append(Artifact(f"fp32 pruned {opts.prune}", base, src.preprocessing))
        infos: dict[str, Any] = {}
        reference_calib = None  # fp32 outputs on the calibration pictures, for mixed precision
        corrected: OnnxInt8Quantizer | None = None  # its fp32 models serve the TFLite converter
        if opts.mixed_precision:
            runner = Runner(Artifact("fp32", base, src.preprocessing), threads=2)
            try:
                reference_calib = judge.collect(runner, calib)
            finally:
                runner.close()
        if "onnx" in opts.targets:
            echo("int8 ONNX: calibrating and quantizing ...")
            path, infos["onnx"], corrected = _onnx_int8(src, base, calib, reference_calib, opts, work, progress, judge)
            artifacts.append(Artifact("int8 onnx", path, src.preprocessing, infos["onnx"]))
        if "tflite" in opts.targets:
            echo("int8 TFLite: converting with onnx2tf ...")
            # The converter gets the fp32 model as the ONNX quantizer left it:
            # equalized (the same function in fp32) and, unless layers may be
            # kept in float (a float layer must not carry a correction for
            # rounding it no longer does), bias-corrected.
            if corrected is None:
                # No ONNX target: run only the steps whose model the converter takes.
                wanted = dataclasses.replace(opts, bias_correction=opts.bias_correction and not opts.mixed_precision)
                if wanted.equalize or wanted.bias_correction:
                    corrected = _calibrated_quantizer(src, base, calib, wanted, work)
            tfl_base = base
            if corrected is not None and (opts.equalize or opts.bias_correction):
                tfl_base = corrected.prepared if opts.mixed_precision else corrected.source
                if tfl_base == corrected.pre_processed:  # nothing changed it: keep the user's file
                    tfl_base = base
            path, infos["tflite"] = _tflite_int8(src, tfl_base, calib_set, reference_calib, opts, work, judge)
            if tfl_base != base and corrected is not None:
                steps = [name for name, on in (("equalized", corrected.prepared != corrected.pre_processed),
                                              ("bias-corrected", tfl_base == corrected.source != corrected.prepared)) if on]
                infos["tflite"]["converted_from"] = f"fp32, {' and '.join(steps)} by the ONNX quantizer"
            if path is not None:
                artifacts.append(Artifact("int8 tflite", path, src.preprocessing.model_copy(update={"layout": "nhwc"}), infos["tflite"]))

        @contextlib.contextmanager
        def eval_progress() -> Iterator[Callable[[str, int], None]]:
            with progress("evaluation", len(eval_set) * len(artifacts)) as tick:
                yield lambda label, n: tick(n)

        with eval_progress() as tick:
            metrics, floor = evaluate(artifacts, eval_set.samples, threads=opts.threads, progress=tick, judge=judge)

        int8 = [m for m in metrics if m.label.startswith("int8")]
        failing = [m.label for m in int8 if (m.agreement or 0) < opts.min_agreement]
        report: dict[str, Any] = {
            "tool": f"edge-agent {__version__}",
            "created_at": time.time(),
            "model": {"name": src.name, "version": src.version, "source": str(opts.model), "input": src.input.model_dump(),
                      "source_bytes": _source_size(opts.model), "weights_expanded_from_int8": src.dequantized_weights},
            "calibration": {"source": calib_set.source, "samples": len(calib_set), "skipped": calib_set.skipped, "method": opts.method},
            "evaluation": {"source": eval_set.source, "samples": len(eval_set), "labelled": eval_set.labelled,
                           "fp32_noise_floor": floor.to_dict() if floor is not None else None},
            "gate": {"min_agreement": opts.min_agreement, "metric": judge.metric, "passed": not failing and bool(int8),
                     "failing": failing},
            "artifacts": [m.to_dict() for m in metrics],
            "details": infos,
            "prune": prune_info,
        }
        echo(report_mod.table(metrics))
        for line in report_mod.mixed_lines(infos):
            echo(line)
        if floor is not None:
            echo(report_mod.floor_line(floor, metrics, opts.min_agreement))
        out.mkdir(parents=True, exist_ok=True)
        if not failing and int8:
            report["bundles"] = _package(src, artifacts, report, opts, out, work, fp32_outputs)
        json_path, html_path = report_mod.write(out, report, metrics)
        echo(f"report: {json_path} and {html_path}")
        if not int8:
            raise QuantizeError("no int8 artifact was produced (see the messages above)")
        if failing:
            raise QualityGateFailed(
                f"quality gate failed: {_METRIC_WORDS[judge.metric]} below {opts.min_agreement:.1%} for {', '.join(failing)}; "
                "no bundle was written (the report says why)"
            )
        return report


def _source_size(path: Path) -> int | None:
    """The size of the model file the user gave (not of a bundle folder)."""
    p = Path(path).expanduser()
    return p.stat().st_size if p.is_file() else None


def _package(src: _Source, artifacts: Sequence[Artifact], report: dict[str, Any], opts: QuantizeOptions, out: Path, work: Path,
             fp32_outputs: Sequence[TensorSpec]) -> list[str]:
    import json

    report_file = work / "report.json"
    report_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written = []
    for art in artifacts:
        if not art.label.startswith("int8"):
            continue
        runtime = art.runtime
        suffix = "onnx" if runtime == "onnx" else "tflite"
        # A converter may rename the outputs the decoder's parameters name.
        postprocessing = map_output_names(src.postprocessing, fp32_outputs, describe_model(art.path, runtime)[1])
        model_file = work / f"{src.name}_int8.{suffix}"
        shutil.copyfile(art.path, model_file)
        path = pack(
            model_file,
            name=src.name,
            version=src.version,
            out=out / f"{src.name}-v{src.version}-int8-{suffix}",
            preprocessing=art.preprocessing.model_dump(),
            labels=src.labels_path,
            task=src.task,
            postprocessing=postprocessing,
            metadata={"quantization": {"precision": "int8", **art.notes}, "source_model": str(opts.model)},
            extra_files={"report.json": report_file},
            sign_key=opts.sign_key,
        )
        written.append(str(path))
    return written
