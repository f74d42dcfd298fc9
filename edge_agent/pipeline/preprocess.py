"""Frame -> input tensor, exactly as the manifest says.

This is the one implementation of preprocessing: the agent, the quantizer's
calibration and evaluation, and the HTTP API all call :class:`Preprocessor`,
so a model sees the same tensor for the same picture wherever it runs.

Frames are BGR ``uint8`` arrays of shape (H, W, 3), as OpenCV delivers them.
Besides the tensor, the preprocessor returns the :class:`Transform` that maps
a point in model-input pixels back to source-frame pixels, which detection
postprocessing uses to report boxes in the frame's own coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.bundles.manifest import Preprocessing, TensorSpec


@dataclass(frozen=True)
class Transform:
    """``frame_x = x * sx + ox``, ``frame_y = y * sy + oy`` for a point (x, y)
    in model-input pixels."""

    sx: float = 1.0
    sy: float = 1.0
    ox: float = 0.0
    oy: float = 0.0

    def box_to_frame(self, box: np.ndarray) -> np.ndarray:
        """Map [..., 4] boxes (x0, y0, x1, y1) to frame pixels."""
        out = np.array(box, dtype=np.float32, copy=True)
        out[..., 0::2] = out[..., 0::2] * self.sx + self.ox
        out[..., 1::2] = out[..., 1::2] * self.sy + self.oy
        return out


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with little aliasing at a low cost: shrink by the largest whole
    factor with pixel averaging (OpenCV's fast integer INTER_AREA path), then
    bilinear for the remaining factor below 2. A general INTER_AREA costs
    ~10x more per frame for about the same picture."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    k = int(min(w / width, h / height))
    if k >= 2:
        img = cv2.resize(img, (w // k, h // k), interpolation=cv2.INTER_AREA)
        if img.shape[1] == width and img.shape[0] == height:
            return img
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)


class Preprocessor:
    """Callable ``frame -> (tensor, transform)`` for one model input.

    Thread-safe (no mutable state after construction). Float inputs get
    ``(pixel/255 - mean) / std``; int8/uint8 inputs with quantization get the
    same float values quantized with the input's scale/zero-point (the
    runtime does that step); uint8 inputs without quantization get raw pixels.
    """

    def __init__(self, spec: Preprocessing, inp: TensorSpec) -> None:
        self.spec = spec
        self.input = inp
        self.width, self.height = spec.size
        channels = 1 if spec.color == "gray" else 3
        self._raw_pixels = inp.dtype in ("uint8", "int8") and inp.quantization is None
        mean = np.asarray(spec.mean[:channels], dtype=np.float32)
        std = np.asarray(spec.std[:channels], dtype=np.float32)
        # (p / 255 - mean) / std == p * a + b, one fused multiply-add per pixel.
        self._a = (1.0 / (255.0 * std)).astype(np.float32)
        self._b = (-mean / std).astype(np.float32)
        self._out_dtype = np.float32 if not self._raw_pixels else np.dtype(inp.dtype)
        self._rank = len(inp.shape)

    def geometry(self, frame_w: int, frame_h: int) -> tuple[tuple[int, int], tuple[int, int, int, int], Transform]:
        """Where the frame goes: (resized w, h), the crop or pad (x, y) offsets
        and the inverse transform. Exposed for tests and the HTTP API."""
        W, H = self.width, self.height
        mode = self.spec.resize
        if mode == "stretch":
            return (W, H), (0, 0, 0, 0), Transform(frame_w / W, frame_h / H, 0.0, 0.0)
        if mode == "crop":
            target_w, target_h = W / self.spec.crop_fraction, H / self.spec.crop_fraction
            scale = max(target_w / frame_w, target_h / frame_h)
            rw, rh = max(W, round(frame_w * scale)), max(H, round(frame_h * scale))
            cx, cy = (rw - W) // 2, (rh - H) // 2
            sx, sy = frame_w / rw, frame_h / rh
            return (rw, rh), (cx, cy, 0, 0), Transform(sx, sy, cx * sx, cy * sy)
        scale = min(W / frame_w, H / frame_h)
        rw, rh = max(1, round(frame_w * scale)), max(1, round(frame_h * scale))
        px, py = (W - rw) // 2, (H - rh) // 2
        sx, sy = frame_w / rw, frame_h / rh
        return (rw, rh), (0, 0, px, py), Transform(sx, sy, -px * sx, -py * sy)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, Transform]:
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        fh, fw = frame.shape[:2]
        (rw, rh), (cx, cy, px, py), transform = self.geometry(fw, fh)
        img = _resize(frame, rw, rh)
        if self.spec.resize == "crop":
            img = img[cy : cy + self.height, cx : cx + self.width]
        elif self.spec.resize == "letterbox" and (px or py or rw != self.width or rh != self.height):
            img = cv2.copyMakeBorder(
                img,
                py,
                self.height - rh - py,
                px,
                self.width - rw - px,
                cv2.BORDER_CONSTANT,
                value=(self.spec.pad_value,) * 3,
            )
        if self.spec.color == "rgb":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif self.spec.color == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
        if self._raw_pixels:
            # uint8: the pixels as they are; int8 without a scale: centred on 0.
            x = img.astype(self._out_dtype) if self._out_dtype == np.uint8 else (img.astype(np.int16) - 128).astype(np.int8)
        else:
            x = img.astype(np.float32) * self._a + self._b
        if self.spec.layout == "nchw":
            x = x.transpose(2, 0, 1)
        if self._rank == 4:
            x = x[None]
        return np.ascontiguousarray(x), transform
