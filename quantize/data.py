"""Calibration and evaluation data: real pictures in, model inputs out.

Data comes from a folder of images (optionally one sub-folder per class,
ImageFolder style, which gives labels), a video file (every frame, or every
``stride``-th), or an ``.npz`` with ``images`` (N,H,W[,C] uint8 pictures) and
optional ``labels`` (N,). Pictures are turned into model inputs by the agent's
own :class:`edge_agent.pipeline.preprocess.Preprocessor`, so calibration sees exactly
the tensors the device will.

A picture that cannot be decoded is skipped with a warning and counted; an
empty data set is a :class:`QuantizeInputError` (exit code 2).

The readers follow ``onnxruntime.quantization.CalibrationDataReader``
(``get_next()`` returns one ``{input_name: array}`` dict, then None), so a
user's existing reader works with this package and ours work with ORT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edge_agent.images import is_image, read_image
from edge_agent.bundles.manifest import Preprocessing, TensorSpec
from edge_agent.pipeline.preprocess import Preprocessor
from quantize.errors import QuantizeInputError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".mjpeg", ".m4v"}


@dataclass
class Sample:
    """One picture (BGR uint8, or grey) with its label index when known."""

    name: str
    image: np.ndarray
    label: int | None = None


@dataclass
class SampleSet:
    samples: list[Sample]
    source: str
    skipped: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def _label_index(name: str, labels: Sequence[str] | None) -> int:
    """A class folder's label: its position in the bundle's labels (names
    compared loosely: case, spaces, '_' and '/' ignored), or an integer name."""

    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    if labels:
        table = {norm(lbl): i for i, lbl in enumerate(labels)}
        if norm(name) in table:
            return table[norm(name)]
    if name.isdigit():
        return int(name)
    known = f" (labels: {', '.join(labels[:10])}{', ...' if labels and len(labels) > 10 else ''})" if labels else ""
    raise QuantizeInputError(f"class folder {name!r} matches no label and is not a class index{known}")


def _read_image(path: Path, skipped: list[str]) -> np.ndarray | None:
    image = read_image(path)
    if image is None:
        skipped.append(path.name)
        log.warning("skipping %s: not a readable image", path)
    return image


def load_samples(
    path: Path | str,
    *,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    stride: int = 1,
) -> SampleSet:
    """Load pictures from a folder, a video or an .npz (see the module doc)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise QuantizeInputError(f"{path}: no such file or folder")
    skipped: list[str] = []
    samples: list[Sample] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image(p))
        classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if files and classes:
            raise QuantizeInputError(f"{path}: mixes images and class folders; use one or the other")
        if classes:
            for folder in classes:
                index = _label_index(folder.name, labels)
                for f in sorted(p for p in folder.iterdir() if is_image(p)):
                    image = _read_image(f, skipped)
                    if image is not None:
                        samples.append(Sample(f"{folder.name}/{f.name}", image, index))
        else:
            for f in files:
                image = _read_image(f, skipped)
                if image is not None:
                    samples.append(Sample(f.name, image))
    elif path.suffix.lower() == ".npz":
        samples = _load_npz(path)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise QuantizeInputError(f"{path}: OpenCV cannot open this video")
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if index % stride == 0:
                samples.append(Sample(f"{path.name}#{index}", frame))
            index += 1
        cap.release()
    else:
        raise QuantizeInputError(f"{path}: expected a folder of images, a video file or an .npz")
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise QuantizeInputError(f"{path}: no usable pictures{detail}")
    if skipped:
        log.warning("%s: skipped %d unreadable file(s): %s", path, len(skipped), ", ".join(skipped[:5]))
    return SampleSet(samples, str(path), skipped)


def _load_npz(path: Path) -> list[Sample]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise QuantizeInputError(f"{path}: not a readable .npz ({exc})") from None
    if "images" not in data:
        raise QuantizeInputError(f"{path}: an .npz needs an 'images' array (N,H,W[,C] uint8); found {list(data)}")
    images = data["images"]
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise QuantizeInputError(f"{path}: 'images' must be uint8 of shape (N,H,W) or (N,H,W,C), got {images.dtype} {images.shape}")
    labels = data["labels"] if "labels" in data else None
    if labels is not None and len(labels) != len(images):
        raise QuantizeInputError(f"{path}: {len(labels)} labels for {len(images)} images")
    return [
        Sample(f"{path.name}#{i}", images[i], int(labels[i]) if labels is not None else None)
        for i in range(len(images))
    ]


def make_views(image: np.ndarray, count: int = 8, *, seed: int = 0) -> list[np.ndarray]:
    """Camera-like variations of one photo: the photo, its mirror image,
    centre and corner crops at several scales. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    views = [image, cv2.flip(image, 1)]
    while len(views) < count:
        scale = float(rng.uniform(0.55, 0.9))
        ch, cw = int(h * scale), int(w * scale)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = image[y : y + ch, x : x + cw]
        views.append(cv2.flip(crop, 1) if rng.random() < 0.5 else crop)
    return views[:count]


def preprocess_all(
    samples: Iterable[Sample],
    spec: Preprocessing,
    inp: TensorSpec,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Stack the model inputs of all samples (batch axis first)."""
    pre = Preprocessor(spec, inp)
    out = []
    for sample in samples:
        tensor, _ = pre(sample.image)
        out.append(tensor[0] if tensor.shape[0] == 1 and len(inp.shape) == 4 else tensor)
        if progress:
            progress(1)
    return np.stack(out)


class TensorReader(CalibrationDataReader):
    """Feeds pre-computed inputs one at a time (batch 1), ORT style."""

    def __init__(self, input_name: str, tensors: np.ndarray) -> None:
        self.input_name = input_name
        self.tensors = tensors
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.tensors):
            return None
        x = self.tensors[self._pos][None]
        self._pos += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._pos = 0

    def batches(self) -> Iterable[dict[str, np.ndarray]]:
        """Every input as a feed dict (batch 1), from the start; does not
        move the reader."""
        for x in self.tensors:
            yield {self.input_name: x[None]}

    def __len__(self) -> int:
        return len(self.tensors)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.tensors = self.tensors[start_index:end_index]
        self._pos = 0


def drain(reader: CalibrationDataReader, input_name: str | None = None) -> np.ndarray:
    """Collect every batch a (user's) reader yields into one array."""
    batches = []
    while (item := reader.get_next()) is not None:
        value = item[input_name] if input_name else next(iter(item.values()))
        batches.append(np.asarray(value))
    if not batches:
        raise QuantizeInputError("the calibration reader yielded no data")
    return np.concatenate(batches, axis=0)
