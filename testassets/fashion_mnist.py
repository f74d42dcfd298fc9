"""The ``fashion_mnist`` asset: a small CNN trained in code on Debian's
``dataset-fashion-mnist``, and real calibration/test images, in
``fashion_mnist/`` under the cache dir:

* ``cnn.onnx``: the CNN trained 2 epochs, static input ``input``
  [1,1,28,28] float32, output ``logits`` [1,10];
* ``info.json``: test accuracy, mean/std, training time, hyper-parameters;
* ``calibration.npz`` (1,000 training images) and ``test.npz`` (the first
  2,000 test images);
* ``images/<class>/<index>.png``: 200 test images;

class names in ``testassets/data/fashion_mnist_labels.txt`` (committed).
Training is seeded and single-threaded, so a rebuild gives the same model.
torch is imported only to train and export.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from testassets.common import (DATA_DIR, ONNX_OPSET, AssetError, atomic_path, atomic_write_bytes,
                               atomic_write_text, export_onnx, log, onnx_io_valid, onnx_session,
                               sha256, umask)

#: Where Debian's ``dataset-fashion-mnist`` installs the gzipped idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS_PATH = DATA_DIR / "fashion_mnist_labels.txt"
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
    return onnx_io_valid(path, 10_000, FASHION_MNIST_INPUT_NAME, FASHION_MNIST_INPUT_SHAPE,
                         FASHION_MNIST_OUTPUT_NAME, [1, len(FASHION_MNIST_CLASSES)])


def _fashion_info_valid(path: Path, onnx_path: Path) -> bool:
    """info.json exists, describes this model (same sha256) and the expected normalisation."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (isinstance(info, dict)
                and info.get("mean") == FASHION_MNIST_MEAN and info.get("std") == FASHION_MNIST_STD
                and isinstance(info.get("test_accuracy"), float)
                and isinstance(info.get("train_time_s"), float)
                and info.get("model_sha256") == sha256(onnx_path.read_bytes()))
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
    atomic_write_bytes(path, buf.getvalue())


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
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())
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
        log(f"Fashion-MNIST CNN epoch {epoch + 1}/{FASHION_MNIST_EPOCHS}: "
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
      ``testassets/data/fashion_mnist_labels.txt``.

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
        atomic_write_text(FASHION_MNIST_LABELS_PATH, "\n".join(FASHION_MNIST_CLASSES) + "\n")
    model_ok = (not force and _fashion_onnx_valid(onnx_path)
                and _fashion_info_valid(info_path, onnx_path))
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

    with _torch_reproducible(FASHION_MNIST_THREADS), atomic_path(onnx_path) as tmp:
        model, train_time = _train_fashion_cnn(train_images, train_labels)
        example = torch.from_numpy(fashion_mnist_preprocess(test_images[:1]))
        with torch.no_grad():
            expected = model(example).numpy()
            torch_pred = model(torch.from_numpy(fashion_mnist_preprocess(test_images))).argmax(1)
        torch_accuracy = float((torch_pred.numpy() == test_labels).mean())

        log(f"exporting the Fashion-MNIST CNN to {onnx_path} ...")
        export_onnx(model, example, tmp, FASHION_MNIST_INPUT_NAME, FASHION_MNIST_OUTPUT_NAME)
        if not _fashion_onnx_valid(tmp):
            raise AssetError(f"exported ONNX {tmp} does not have the expected I/O")
        got = onnx_session(tmp).run(None, {FASHION_MNIST_INPUT_NAME: example.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if diff > 1e-4:
            raise AssetError(f"onnxruntime and torch disagree (max |diff| {diff:.2e})")
        eval_start = time.perf_counter()
        accuracy = _onnx_accuracy(tmp, test_images, test_labels)
        eval_time = time.perf_counter() - eval_start
        if accuracy < FASHION_MNIST_MIN_ACCURACY:
            raise AssetError(f"Fashion-MNIST CNN test accuracy {accuracy:.4f} is below "
                             f"{FASHION_MNIST_MIN_ACCURACY}")
        model_sha256 = sha256(tmp.read_bytes())
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
        "opset": ONNX_OPSET,
        "model_sha256": model_sha256,
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    log(f"Fashion-MNIST CNN: trained in {train_time:.1f} s, test accuracy {accuracy:.4f} "
        f"(onnxruntime, {len(test_labels)} images)")
    return folder


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
