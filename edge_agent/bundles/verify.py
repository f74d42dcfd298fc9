"""Model bundles on the device: open one and verify it completely.

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
  (checked after the files; see :mod:`edge_agent.bundles.signing`, imported
  only then).

Each refusal is a :class:`~edge_agent.errors.BundleError` with a specific code.

This is the device's path: it imports neither the packing code
(:mod:`edge_agent.bundles.pack`, the workstation's) nor the runtimes nor the
preprocessing. Its functions keep no state between calls; a :class:`Bundle`
belongs to whoever opened it.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from edge_agent.bundles.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edge_agent.errors import BundleError, is_disk_full

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
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
        from edge_agent.bundles.signing import load_trusted_keys

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
    from edge_agent.bundles.signing import check_signature

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


# ------------------------------------------------------------ signatures


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
