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

import threading
from dataclasses import dataclass
from typing import Sequence

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


@dataclass(frozen=True)
class Prepared:
    """A frame's input tensor made ahead of inference (in the capture
    thread), tagged with the preprocessing it was made for: ``key`` is the
    :attr:`Preprocessor.key` (preprocessing spec and input spec). A model
    uses the tensor only when its own key is the same; after a hot swap to a
    model with other preprocessing, the frame is preprocessed again."""

    key: tuple[Preprocessing, TensorSpec]
    tensor: np.ndarray
    transform: Transform


class Preprocessor:
    """Callable ``frame -> (tensor, transform)`` for one model input.

    Thread-safe (the geometry cache is only added to; each thread has its
    own scratch buffer). Float inputs get ``(pixel/255 - mean) / std``;
    int8/uint8 inputs with quantization get the same float values quantized
    with the input's scale/zero-point, in the same pass (the runtime passes
    a tensor already of the input's type through); uint8 inputs without
    quantization get raw pixels.

    Per frame it makes one new full-size array, the tensor itself: the
    colour order, the normalisation (and quantization) and the layout are
    one multiply-add per channel plane written straight into it. What does
    not change between frames (the geometry for a frame size, the folded
    constants) is computed once.
    """

    def __init__(self, spec: Preprocessing, inp: TensorSpec) -> None:
        self.spec = spec
        self.input = inp
        self.key = (spec, inp)
        self.width, self.height = spec.size
        channels = self._channels = 1 if spec.color == "gray" else 3
        self._raw_pixels = inp.dtype in ("uint8", "int8") and inp.quantization is None
        mean = np.asarray(spec.mean[:channels], dtype=np.float64)
        std = np.asarray(spec.std[:channels], dtype=np.float64)
        # (p / 255 - mean) / std == p * a + b, one fused multiply-add per pixel.
        a, b = 1.0 / (255.0 * std), -mean / std
        q = inp.quantization if inp.dtype in ("uint8", "int8") else None
        self._quant: tuple[int, int] | None = None
        if q is not None:
            # round((p * a + b) / scale) + zp == round(p * a' + b'): quantized in the same pass.
            a, b = a / q.scale, b / q.scale + q.zero_point
            info = np.iinfo(np.dtype(inp.dtype))
            self._quant = (info.min, info.max)
        self._a = a.astype(np.float32)
        self._b = b.astype(np.float32)
        self._out_dtype = np.dtype(inp.dtype) if (self._raw_pixels or q is not None) else np.dtype(np.float32)
        self._rank = len(inp.shape)
        # Source channel (BGR frame) of each output channel.
        self._order = (2, 1, 0) if spec.color == "rgb" else (0, 1, 2)
        self._geometry: dict[tuple[int, int], tuple] = {}
        self._scratch = threading.local()

    def geometry(self, frame_w: int, frame_h: int) -> tuple[tuple[int, int], tuple[int, int, int, int], Transform]:
        """Where the frame goes: (resized w, h), the crop or pad (x, y) offsets
        and the inverse transform. Exposed for tests and the HTTP API.
        Computed once per frame size."""
        cached = self._geometry.get((frame_w, frame_h))
        if cached is None:
            cached = self._geometry_of(frame_w, frame_h)
            if len(self._geometry) < 64:
                self._geometry[(frame_w, frame_h)] = cached
        return cached

    def _geometry_of(self, frame_w: int, frame_h: int) -> tuple[tuple[int, int], tuple[int, int, int, int], Transform]:
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

    def prepare(self, frame: np.ndarray) -> Prepared:
        """The tensor for ``frame``, tagged with this preprocessing."""
        tensor, transform = self(frame)
        return Prepared(self.key, tensor, transform)

    def tensor_for(self, frame: np.ndarray, prepared: "Prepared | None") -> tuple[np.ndarray, Transform]:
        """The input for ``frame``: ``prepared`` when it was made for this
        preprocessing (its tag), else made here (a hot swap to a model with
        other preprocessing left the capture thread's one behind)."""
        if prepared is not None and (prepared.key is self.key or prepared.key == self.key):
            return prepared.tensor, prepared.transform
        return self(frame)

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
        if self.spec.color == "gray":
            planes: Sequence[np.ndarray] = (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY),)
        else:
            split = cv2.split(img)
            planes = [split[c] for c in self._order]
        H, W = self.height, self.width
        nchw = self.spec.layout == "nchw"
        shape = (self._channels, H, W) if nchw else (H, W, self._channels)
        out = np.empty(((1,) if self._rank == 4 else ()) + shape, dtype=self._out_dtype)
        body = out[0] if self._rank == 4 else out
        if self._raw_pixels:
            # uint8: the pixels as they are; int8 without a scale: centred on 0.
            for c, plane in enumerate(planes):
                dst = body[c] if nchw else body[..., c]
                if self._out_dtype == np.uint8:
                    dst[...] = plane
                else:
                    np.subtract(plane, 128, out=dst, dtype=np.int16, casting="unsafe")
            return out, transform
        if self._quant is None:
            work = body  # float32: written in place
        else:
            work = getattr(self._scratch, "buf", None)
            if work is None or work.shape != shape:
                work = self._scratch.buf = np.empty(shape, np.float32)  # reused, one per thread
        for c, plane in enumerate(planes):
            dst = work[c] if nchw else work[..., c]
            np.multiply(plane, self._a[c], out=dst, dtype=np.float32, casting="unsafe")
            np.add(dst, self._b[c], out=dst)
        if self._quant is not None:
            np.rint(work, out=work)
            np.clip(work, self._quant[0], self._quant[1], out=work)
            body[...] = work
        return out, transform
