"""Model bundles: open and verify them, and make them (``edge-agent pack``).

A bundle is a directory with ``manifest.json`` at its root and the files the
manifest lists, each with its sha256 and size; for transport it is a tar
archive (``.tar`` or ``.tar.gz``) of that directory's contents. Opening a
bundle verifies every file before anything else may read it, and refuses:

* an archive member that would land outside the bundle (absolute paths, ``..``,
  links, devices), that the manifest does not list, or whose size is not the
  listed one, before anything is written,
* an archive that would unpack to more than its limit or than the free disk
  (a decompression bomb), also before anything is written,
* a manifest that does not validate,
* a listed file that is missing, of another size or another sha256,
* a file that is present but not listed (only the manifest and its signature
  may be unlisted),
* when trusted keys are given: a missing, invalid or untrusted signature
  (checked after the files; see :mod:`edge_agent.signing`).

Each refusal is a :class:`~edge_agent.errors.BundleError` with a specific code.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.errors import BundleError, ModelLoadError, is_disk_full
from edge_agent.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ClassifyParams,
    DetectParams,
    FileEntry,
    Manifest,
    Preprocessing,
    TensorSpec,
    concrete_input,
)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SAMPLES_NAME = "samples.npz"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


@dataclass
class Bundle:
    """A verified bundle on disk. ``root`` holds ``manifest.json``.

    When opened from an archive the bundle owns a temporary extraction
    directory, removed by :meth:`close` (or the context manager).
    """

    root: Path
    manifest: Manifest
    _tmpdir: Path | None = field(default=None, repr=False)
    signed_by: str | None = None  # key id, when opened with trusted_keys

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    def labels(self) -> list[str] | None:
        if self.manifest.labels is None:
            return None
        text = (self.root / self.manifest.labels).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines()]

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(
    path: Path | str,
    *,
    workdir: Path | None = None,
    trusted_keys: Sequence[Path | str] | None = None,
    limits: UnpackLimits | None = None,
) -> Bundle:
    """Open a bundle directory or archive and verify it completely.

    An archive is extracted (safely, see :func:`extract_archive`) into a new
    temporary directory under ``workdir`` (default: the system temp dir),
    owned by the returned Bundle; ``limits`` bound what it may unpack to.
    On any refusal nothing of it is left on disk.

    With ``trusted_keys`` (public key files), the bundle must also carry a
    signature by one of them, checked after every file's sha256; the
    signer's key id is ``Bundle.signed_by``. ``None`` checks no signature.
    """
    path = Path(path).expanduser()
    trusted = None
    if trusted_keys is not None:
        from edge_agent.signing import load_trusted_keys

        trusted = load_trusted_keys(trusted_keys)
    if not path.exists():
        raise BundleError(f"bundle {path}: not found", code="bundle_not_found")
    if path.is_dir():
        return Bundle(path, verify_dir(path), signed_by=_check_signature(path, trusted))
    if not is_archive(path):
        raise BundleError(
            f"bundle {path}: expected a directory or a .tar/.tar.gz archive", code="bad_archive"
        )
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bundle-", dir=workdir))
    except OSError as exc:
        if is_disk_full(exc):
            raise BundleError(f"bundle {path}: no space left on device to unpack it into", code="disk_full") from None
        raise
    try:
        extract_archive(path, tmp, limits or NO_LIMITS)
        return Bundle(tmp, verify_dir(tmp), _tmpdir=tmp, signed_by=_check_signature(tmp, trusted))
    except BundleError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Name the archive the user gave, not the temporary extraction folder.
        raise BundleError(str(exc).replace(f"bundle {tmp}:", f"bundle {path}:"), code=exc.code) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_signature(root: Path, trusted: Any) -> str | None:
    if trusted is None:
        return None
    from edge_agent.signing import check_signature

    return check_signature(root, trusted)


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what unpacking an archive may write.

    ``max_bytes``: the most the bundle may unpack to (every file it holds,
    the manifest included; ``None``: no bound). ``min_free_bytes``: free space
    that must remain on the destination's file system once it is unpacked.
    The model store passes ``[store] max_unpacked_mb`` and ``min_free_mb``.
    """

    max_bytes: int | None = None
    min_free_bytes: int = 0


NO_LIMITS = UnpackLimits()
MAX_MEMBERS = 10_000  # a bundle holds a model, labels and samples; far fewer in practice
MAX_MANIFEST_BYTES = 4 << 20  # a manifest listing thousands of files is still well under this
MAX_SIGNATURE_BYTES = 64 << 10  # manifest.sig is a few hundred bytes of JSON
_FREE_CHECK_EVERY = 16 << 20  # bytes written between two checks of the free space


def size_text(n: int) -> str:
    """Bytes for a person: ``200.0 MB``, or ``12.3 kB`` below 0.1 MB."""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class _Plan:
    """What the first pass over an archive found: its files and their sizes."""

    manifest: Manifest
    sizes: dict[str, int]  # every regular member (manifest and signature included) -> size
    total: int


def extract_archive(archive: Path, dest: Path, limits: UnpackLimits = NO_LIMITS) -> Manifest:
    """Unpack a bundle archive into the folder ``dest`` (made if missing) and
    return its manifest (not yet checked against the files' sha256:
    :func:`verify_dir` does that). Nothing is written unless the whole archive is acceptable:

    1. a first pass reads the member headers only (no file is written) and
       refuses, as soon as a header shows it: a member that is not a regular
       file or folder or would land outside ``dest`` (``bad_archive``); a
       total size beyond ``limits.max_bytes`` (``bundle_too_large_unpacked``)
       or beyond the free space (``disk_full``). It reads and validates
       ``manifest.json`` (``bad_manifest``).
    2. Then, still before writing: a member the manifest does not list
       (``unlisted_member``), a member whose size is not the listed one
       (``size_mismatch``), a listed file that is absent (``missing_file``),
       the sum of the manifest's sizes against the limit and against the free
       space less ``limits.min_free_bytes``.
    3. The second pass writes the listed files, each stopped as soon as it
       would exceed its listed size, and the free space is checked again
       every few MB (another writer may be filling the disk meanwhile).

    On a refusal ``dest`` may hold part of the files; the caller removes it
    (:func:`open_bundle` does).
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
        plan = _plan_archive(archive, limits, dest)
        _write_archive(archive, dest, plan, limits)
        return plan.manifest
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        if is_disk_full(exc):
            raise BundleError(f"bundle {archive}: no space left on device while extracting", code="disk_full") from None
        raise BundleError(f"bundle {archive}: not a readable tar archive ({exc})", code="bad_archive") from None


class _HeaderTooLarge(tarfile.TarError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses GNU long-name and pax headers over 64 KiB:
    tarfile reads those whole into memory before any member is seen, so a
    1 MB archive could otherwise take hundreds of MB of a 1 GB device."""

    MAX_EXTENDED = 64 * 1024
    _EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED and self.size > self.MAX_EXTENDED:
            raise _HeaderTooLarge(f"an extended tar header of {self.size} bytes (the limit is 64 KiB)")
        return super()._proc_member(tarfile_)


def _member_name(archive: Path, member: tarfile.TarInfo) -> str:
    """The member's path inside the bundle, after the safety checks."""
    name = member.name.removeprefix("./")
    parts = name.split("/")
    if member.name.startswith("/") or ".." in parts:
        raise BundleError(
            f"bundle {archive}: member {member.name!r} would be written outside the bundle", code="bad_archive"
        )
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise BundleError(f"bundle {archive}: member {member.name!r} is not a regular file", code="bad_archive")
    return name


def _too_large(archive: Path, total: int, limits: UnpackLimits, what: str) -> BundleError:
    assert limits.max_bytes is not None
    return BundleError(
        f"bundle {archive}: {what} {size_text(total)} unpacked, more than the {size_text(limits.max_bytes)} "
        "this device accepts ([store] max_unpacked_mb)",
        code="bundle_too_large_unpacked",
    )


def _no_room(archive: Path, needed: int, free: int, limits: UnpackLimits, dest: Path) -> BundleError:
    keep = ""
    if limits.min_free_bytes:
        keep = f" and {size_text(limits.min_free_bytes)} must stay free ([store] min_free_mb)"
    return BundleError(
        f"bundle {archive}: unpacking needs {size_text(needed)}{keep}, but only {size_text(free)} are free "
        f"on the disk holding {dest}",
        code="disk_full",
    )


def _plan_archive(archive: Path, limits: UnpackLimits, dest: Path) -> _Plan:
    free = free_bytes(dest)
    sizes: dict[str, int] = {}
    total = 0
    raw_manifest: bytes | None = None
    with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
        for count, member in enumerate(tar, 1):  # headers only: data is skipped, never written
            if count > MAX_MEMBERS:
                raise BundleError(f"bundle {archive}: more than {MAX_MEMBERS} members", code="bad_archive")
            name = _member_name(archive, member)
            if member.isdir():
                continue
            if name in sizes:
                raise BundleError(f"bundle {archive}: member {name!r} appears twice", code="bad_archive")
            sizes[name] = member.size
            total += member.size
            # Refused on the header's word, before its data is even decompressed.
            if limits.max_bytes is not None and total > limits.max_bytes:
                raise _too_large(archive, total, limits, "its members hold at least")
            if total + limits.min_free_bytes > free:
                raise _no_room(archive, total, free, limits, dest)
            if name == MANIFEST_NAME:
                if member.size > MAX_MANIFEST_BYTES:
                    raise BundleError(
                        f"bundle {archive}: {MANIFEST_NAME} is {member.size} bytes, more than a manifest may be "
                        f"({MAX_MANIFEST_BYTES})",
                        code="bad_manifest",
                    )
                fh = tar.extractfile(member)
                assert fh is not None
                raw_manifest = fh.read()
            elif name == SIGNATURE_NAME and member.size > MAX_SIGNATURE_BYTES:
                raise BundleError(
                    f"bundle {archive}: {SIGNATURE_NAME} is {member.size} bytes, more than a signature may be "
                    f"({MAX_SIGNATURE_BYTES})",
                    code="signature_invalid",
                )
    if raw_manifest is None:
        raise BundleError(f"bundle {archive}: no {MANIFEST_NAME}", code="bad_manifest")
    manifest = parse_manifest(raw_manifest, f"bundle {archive}")
    listed = {entry.path: entry.size for entry in manifest.files}
    for name, size in sizes.items():
        if name in (MANIFEST_NAME, SIGNATURE_NAME):
            continue
        if name not in listed:
            raise BundleError(
                f"bundle {archive}: member {name!r} is not listed in the manifest", code="unlisted_member"
            )
        if size != listed[name]:
            raise BundleError(
                f"bundle {archive}: member {name!r} is {size} bytes, the manifest says {listed[name]}",
                code="size_mismatch",
            )
    for name in listed:
        if name not in sizes:
            raise BundleError(f"bundle {archive}: listed file {name!r} is missing", code="missing_file")
    unpacked = sum(listed.values()) + sizes[MANIFEST_NAME] + sizes.get(SIGNATURE_NAME, 0)
    if limits.max_bytes is not None and unpacked > limits.max_bytes:
        raise _too_large(archive, unpacked, limits, "the manifest lists")
    if unpacked + limits.min_free_bytes > free:
        raise _no_room(archive, unpacked, free, limits, dest)
    return _Plan(manifest, sizes, unpacked)


def _write_archive(archive: Path, dest: Path, plan: _Plan, limits: UnpackLimits) -> None:
    written = 0
    next_check = _FREE_CHECK_EVERY
    with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
        for member in tar:
            name = _member_name(archive, member)
            if member.isdir():
                continue
            if plan.sizes.get(name) != member.size:  # the archive changed since the first pass
                raise BundleError(f"bundle {archive}: changed while it was being unpacked", code="bad_archive")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            # "x": never write through something already there (a second
            # member of the same name, or a link planted in dest).
            with src, open(target, "xb") as out:
                n = 0
                while chunk := src.read(_CHUNK):
                    n += len(chunk)
                    if n > member.size:
                        raise BundleError(
                            f"bundle {archive}: member {name!r} holds more than the {member.size} bytes "
                            "the manifest lists",
                            code="size_mismatch",
                        )
                    written += len(chunk)
                    if limits.max_bytes is not None and written > limits.max_bytes:
                        raise _too_large(archive, written, limits, "writing it reached")
                    out.write(chunk)
                    if written >= next_check:
                        next_check = written + _FREE_CHECK_EVERY
                        free = free_bytes(dest)
                        remaining = plan.total - written
                        if free < remaining + limits.min_free_bytes // 2:
                            raise _no_room(archive, remaining, free, limits, dest)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {root}: no {MANIFEST_NAME}", code="bad_manifest") from None
    return parse_manifest(raw, f"bundle {root}")


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Validate the bytes of a ``manifest.json``; ``where`` starts the messages."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: {MANIFEST_NAME} is not valid JSON ({exc})", code="bad_manifest") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"{where}: invalid {MANIFEST_NAME}: {problems}", code="bad_manifest") from None


def verify_dir(root: Path) -> Manifest:
    """Validate the manifest and check every file's presence, size and sha256."""
    manifest = read_manifest(root)
    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        target = root / entry.path
        if not target.is_file() or target.is_symlink():
            raise BundleError(f"bundle {root}: listed file {entry.path!r} is missing", code="missing_file")
        size = target.stat().st_size
        if size != entry.size:
            raise BundleError(
                f"bundle {root}: {entry.path!r} is {size} bytes, the manifest says {entry.size}",
                code="size_mismatch",
            )
        digest = sha256_file(target)
        if digest != entry.sha256:
            raise BundleError(
                f"bundle {root}: sha256 of {entry.path!r} is {digest[:12]}..., the manifest says "
                f"{entry.sha256[:12]}...: the file was changed or corrupted",
                code="checksum_mismatch",
            )
    for found in root.rglob("*"):
        rel = found.relative_to(root).as_posix()
        if found.is_dir() and not found.is_symlink():
            continue
        if rel not in listed and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleError(f"bundle {root}: file {rel!r} is not listed in the manifest", code="unexpected_file")
    return manifest


# --------------------------------------------------------------------- packing


def default_preprocessing(inp: TensorSpec, **overrides: Any) -> Preprocessing:
    """Preprocessing for a model input: explicit options win, the rest is read
    off the input's shape (layout from where the channel axis is, size from
    the spatial dims). Raises BundleError when the size cannot be known."""
    shape = inp.shape
    opts = {k: v for k, v in overrides.items() if v is not None}
    if "layout" not in opts and len(shape) == 4:
        opts["layout"] = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
    layout = opts.get("layout", "nchw")
    if len(shape) == 4:
        channels = shape[1] if layout == "nchw" else shape[3]
        if channels == 1 and "color" not in opts:
            opts["color"] = "gray"
    if "size" not in opts:
        if len(shape) != 4:
            raise BundleError(f"input {inp.name!r} has shape {shape}: give --size WxH", code="unsupported_model")
        h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
        if h is None or w is None:
            raise BundleError(
                f"input {inp.name!r} has dynamic spatial dimensions {shape}: give --size WxH", code="unsupported_model"
            )
        opts["size"] = (w, h)
    return Preprocessing(**opts)


def pack(
    model: Path | str,
    *,
    name: str,
    version: int,
    out: Path | str,
    preprocessing: dict[str, Any] | None = None,
    labels: Path | str | None = None,
    task: str = "classify",
    postprocessing: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    sign_key: Path | str | None = None,
    sample_images: Sequence[Path | str] = (),
) -> Path:
    """Wrap an .onnx or .tflite file into a bundle at ``out`` (a directory, or
    an archive when ``out`` ends in .tar/.tar.gz). Returns ``out``.

    With ``sign_key`` (an Ed25519 private key file) the staged bundle is
    signed (``manifest.sig``) before it is written out or archived.

    The model is opened with its runtime to read the input/output specs, so a
    file the runtime cannot read is refused here rather than on the device.

    ``sample_images`` are preprocessed and run through the model here; the
    inputs and outputs go into ``samples.npz`` so that the device can check,
    before a version serves, that it computes the same answers.
    """
    from edge_agent.runtimes import describe_model, runtime_for_file

    model = Path(model).expanduser()
    out = Path(out).expanduser()
    if not model.is_file():
        raise BundleError(f"model {model}: not found", code="bundle_not_found")
    private_key = None
    if sign_key is not None:  # a bad key fails before any work is done
        from edge_agent.signing import load_private_key

        private_key = load_private_key(sign_key)
    runtime = runtime_for_file(model)
    try:
        inputs, outputs = describe_model(model, runtime)
    except ModelLoadError as exc:
        # The file given to pack is not a model its runtime can read: the
        # user's mistake (exit 2), not a runtime failure on the device.
        raise BundleError(f"model {model}: not a usable model file ({exc})", code="unsupported_model") from None
    if len(inputs) != 1:
        raise BundleError(
            f"model {model}: has {len(inputs)} inputs; a camera model takes exactly one image", code="unsupported_model"
        )
    pre = default_preprocessing(inputs[0], **(preprocessing or {}))
    post_cls = DetectParams if task == "detect" else ClassifyParams
    post = post_cls.model_validate(postprocessing or {})

    with tempfile.TemporaryDirectory(prefix="pack-", dir=out.parent if out.parent.exists() else None) as tmp:
        stage = Path(tmp) / "bundle"
        stage.mkdir()
        files = {model.name: model}
        label_name = None
        if labels is not None:
            labels = Path(labels).expanduser()
            if not labels.is_file():
                raise BundleError(f"labels {labels}: not found", code="bundle_not_found")
            label_name = "labels.txt"
            files[label_name] = labels
        files.update(extra_files or {})
        entries = []
        for rel, src in files.items():
            shutil.copyfile(src, stage / rel)
            entries.append(FileEntry(path=rel, sha256=sha256_file(stage / rel), size=(stage / rel).stat().st_size))
        try:
            manifest = Manifest(
                name=name,
                version=version,
                runtime=runtime,
                model_file=model.name,
                files=entries,
                inputs=inputs,
                outputs=outputs,
                preprocessing=pre,
                task=task,
                postprocessing=post,
                labels=label_name,
                created_at=time.time(),
                created_by=f"edge-agent {__version__}",
                metadata=metadata or {},
            )
        except ValidationError as exc:
            raise BundleError(f"cannot pack {model}: {exc.errors()[0]['msg']}", code="bad_manifest") from None
        if sample_images:
            _write_samples(stage / SAMPLES_NAME, model, runtime, manifest, sample_images)
            entry = FileEntry(
                path=SAMPLES_NAME, sha256=sha256_file(stage / SAMPLES_NAME), size=(stage / SAMPLES_NAME).stat().st_size
            )
            manifest = manifest.model_copy(update={"files": [*manifest.files, entry], "samples": SAMPLES_NAME})
        (stage / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        if private_key is not None:
            from edge_agent.signing import sign_dir

            sign_dir(stage, private_key)
        write_bundle(stage, out)
    return out


def _write_samples(
    dest: Path, model: Path, runtime: str, manifest: Manifest, images: Sequence[Path | str]
) -> None:
    """Preprocess ``images`` as the agent will and record the model's outputs."""
    import cv2
    import numpy as np

    from edge_agent.preprocess import Preprocessor
    from edge_agent.runtimes import create_runtime

    spec = concrete_input(manifest.inputs[0], manifest.preprocessing)
    pre = Preprocessor(manifest.preprocessing, spec)
    rt = create_runtime(runtime, model, [spec], manifest.outputs, threads=1)
    rt.load()
    inputs, outputs = [], []
    try:
        for image in images:
            frame = cv2.imread(str(image), cv2.IMREAD_COLOR)
            if frame is None:
                raise BundleError(f"sample image {image}: not a readable image", code="bad_sample")
            tensor, _ = pre(frame)
            inputs.append(tensor)
            outputs.append(rt.infer(tensor))
    finally:
        rt.close()
    arrays = {"input": np.concatenate(inputs)}
    for k in range(len(outputs[0])):
        arrays[f"output_{k}"] = np.concatenate([o[k] for o in outputs])
    np.savez(dest, **arrays)


def write_bundle(stage: Path, out: Path) -> None:
    """Move a staged bundle directory to ``out`` (dir or archive), replacing
    nothing: an existing ``out`` is an error rather than silently overwritten."""
    if out.exists():
        raise BundleError(f"{out} already exists; remove it or choose another --out", code="bad_usage")
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_archive(out):
        mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
        tmp_out = out.with_name(out.name + ".partial")
        with tarfile.open(tmp_out, mode) as tar:
            for item in sorted(stage.iterdir()):
                tar.add(item, arcname=item.name)
        os.replace(tmp_out, out)
    else:
        shutil.copytree(stage, out)


# ----------------------------------------------------------------- signing


def sign_bundle(bundle: Path | str, private_key_path: Path | str) -> Path:
    """Sign a bundle with the Ed25519 private key at ``private_key_path``.

    The bundle is verified first (manifest schema, every file's size and
    sha256): only a bundle that verifies gets signed. A directory gets
    ``manifest.sig`` beside its ``manifest.json`` (an older signature is
    replaced) and the signature's path is returned. An archive is unpacked,
    signed and written back in place (atomically; its sha256 changes) and its
    path is returned. ``edge-agent pack --sign-key`` signs the staged
    directory before it writes the archive, which is the cheaper order.
    """
    from edge_agent.signing import load_private_key, sign_dir

    bundle = Path(bundle).expanduser()
    key = load_private_key(private_key_path)
    if bundle.is_dir():
        verify_dir(bundle)
        return sign_dir(bundle, key)
    with open_bundle(bundle) as opened:  # refuses what is neither a bundle dir nor an archive
        sign_dir(opened.root, key)
        assert is_archive(bundle)
        tmp_out = bundle.with_name(f".signing-{os.getpid()}-{bundle.name}")
        tmp_out.unlink(missing_ok=True)
        try:
            write_bundle(opened.root, tmp_out)
            os.replace(tmp_out, bundle)
        except BaseException:
            tmp_out.unlink(missing_ok=True)
            raise
    return bundle


def verify_bundle_signature(bundle: Path | str, trusted_keys: Sequence[Path | str] | Path | str) -> str:
    """Verify a bundle (directory or archive) completely and check that it is
    signed by one of the public keys in ``trusted_keys``; return the
    signer's key id.

    The files are checked first (missing, size and sha256 errors come before
    any signature error), then the signature (:func:`check_signature`). Same
    as ``open_bundle(bundle, trusted_keys=...)`` without keeping it open.
    """
    with open_bundle(bundle, trusted_keys=trusted_keys) as opened:
        assert opened.signed_by is not None
        return opened.signed_by
