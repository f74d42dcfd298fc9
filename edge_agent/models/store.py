"""The versioned model store.

Layout under ``store.path``::

    <model>/<version>/      a verified bundle, immutable once renamed into place
    <model>/state.json      active version, last good, labels, history (state.py)
    .staging/               incoming bundles and versions being removed
    .lock                   held (flock) by the process that owns the store

A version directory only ever appears complete: a bundle is copied into
``.staging/``, verified, fsynced and renamed into place in one step; a version
is removed by renaming it into ``.staging/`` first. Whatever an interrupted
process left in ``.staging/`` is deleted the next time the store is opened,
and :meth:`ModelStore.recover` repairs a state file that points at a version
that is not there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from edge_agent.bundles import (
    Bundle,
    UnpackLimits,
    free_bytes,
    open_bundle,
    read_manifest,
    size_text,
    verify_dir,
)
from edge_agent.errors import BundleError, EdgeAgentError, is_disk_full
from edge_agent.faults import checkpoint
from edge_agent.models.state import ModelState, clean_state_leftovers, fsync_dir, read_state, write_state

if TYPE_CHECKING:
    from edge_agent.config import StoreConfig

log = logging.getLogger(__name__)

STAGING = ".staging"
LOCK_NAME = ".lock"


class StoreError(EdgeAgentError):
    """The store cannot be used or a store operation is not allowed."""

    code = "store_error"


def _fsync_tree(root: Path) -> None:
    """Every file and folder under ``root``, and ``root`` itself, to disk."""
    for path in [*root.rglob("*"), root]:
        fsync_dir(path)  # an O_RDONLY fsync: files and folders alike


def _write_error(what: str, exc: OSError) -> StoreError:
    code = "disk_full" if is_disk_full(exc) else "store_write_failed"
    return StoreError(f"{what}: {exc.strerror}", code=code)


class StoreLock:
    """An exclusive advisory lock on the store: the running agent holds it, so
    ``edge-agent models`` knows to go through the agent instead of the disk."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when the lock was taken, False when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def versions_in(folder: Path) -> list[int]:
    """The version numbers installed in a model's folder, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def installed_as(bundle: Bundle, dest: Path) -> Bundle | None:
    """``bundle`` when its verified files are the version directory ``dest``
    (:meth:`ModelStore.install` has just put them there), so loading them
    needs no second sha256 of every file and no second signature check; else
    None: a version that was already there is opened from the store and
    verified as usual."""
    return bundle if bundle.root == dest else None


def dir_size(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class ModelStore:
    """Versions on disk plus one state file per model.

    Thread-safety: the store itself is not locked; the model manager
    serialises every transaction, and one process owns a store (StoreLock).
    """

    def __init__(self, root: Path, *, keep_versions: int = 3, max_unpacked_bytes: int | None = None,
                 min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        # What a bundle coming in may unpack to, and the free space it must
        # leave ([store] max_unpacked_mb, min_free_mb).
        self.limits = UnpackLimits(max_unpacked_bytes, min_free_bytes)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"model store {self.root}: cannot create it ({exc.strerror})", code="store_unusable") from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"model store {self.root}: not writable", code="store_unusable")

    @classmethod
    def from_config(cls, cfg: "StoreConfig") -> "ModelStore":
        """The store a ``[store]`` section describes."""
        return cls(cfg.path, keep_versions=cfg.keep_versions, max_unpacked_bytes=cfg.max_unpacked_bytes,
                   min_free_bytes=cfg.min_free_bytes)

    def clean_staging(self) -> None:
        """Delete what an interrupted install or removal left in ``.staging``.
        Only the process that holds the store lock may call this."""
        staging = self.root / STAGING
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            log.info("model store: removed leftovers of an interrupted operation in %s", staging)

    def staging(self) -> Path:
        """Scratch space on the store's filesystem (archives are extracted and
        downloads land here), emptied whenever the store is opened."""
        path = self.root / STAGING
        path.mkdir(exist_ok=True)
        return path

    def open_incoming(self, path: Path | str, *, trusted_keys: Sequence[Path] | None = None) -> Bundle:
        """Open (and verify) a bundle that is to be installed: an archive is
        unpacked into staging within the store's limits (a decompression bomb
        is refused before it is written: ``bundle_too_large_unpacked``,
        ``disk_full``, ``unlisted_member``)."""
        return open_bundle(path, workdir=self.staging(), trusted_keys=trusted_keys, limits=self.limits)

    # -- reading -----------------------------------------------------------

    def versions(self, name: str) -> list[int]:
        """Installed versions of ``name``, ascending."""
        return versions_in(self.root / name)

    def path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def size(self, name: str, version: int) -> int:
        """Bytes of an installed version's files."""
        return dir_size(self.path(name, version))

    def open(self, name: str, version: int, *, trusted_keys: Sequence[Path] | None = None) -> Bundle:
        """Open (and re-verify: sha256 of every file, signature) an installed version."""
        path = self.path(name, version)
        if not path.is_dir():
            raise BundleError(f"{name} version {version} is not in the store", code="version_not_found")
        return open_bundle(path, trusted_keys=trusted_keys)

    def state(self, name: str) -> ModelState:
        state, problem = read_state(self.root / name)
        if problem:
            log.warning("model %s: %s", name, problem)
        return state

    # -- writing -----------------------------------------------------------

    def save_state(self, name: str, state: ModelState) -> None:
        try:
            write_state(self.root / name, state, checkpoint=checkpoint)
        except OSError as exc:
            raise _write_error(f"model {name}: cannot write its state", exc) from None

    def install(self, bundle: Bundle) -> tuple[Path, bool]:
        """Copy a verified bundle into the store. Returns its version directory
        and whether it was newly installed.

        Installing a version that is already present with the same manifest is
        a no-op; a different bundle under the same name and version is refused
        (versions are immutable, as in TF Serving).

        A newly installed version was verified where it lies (the bundle's own
        verified extraction moved into place, or a copy checked after
        copying), so ``bundle.root`` is the version directory afterwards: the
        bundle then stands for the installed version, verified (see
        :func:`installed_as`).
        """
        m = bundle.manifest
        dest = self.path(m.name, m.version)
        if dest.exists():
            # The manifests pin every file's sha256; the installed files are
            # checked when that version is loaded, so no hashing here.
            existing = read_manifest(dest)
            if existing.model_copy(update={"created_at": None}) != m.model_copy(update={"created_at": None}):
                raise BundleError(
                    f"{m.name} version {m.version} is already installed with different contents; "
                    "give the new bundle a new version",
                    code="version_exists",
                )
            return dest, False
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{m.name}-{m.version}-", dir=self.staging()))
        except OSError as exc:
            raise _write_error(f"cannot install {m.name} v{m.version} into {self.root}", exc) from None
        try:
            work = tmp / "bundle"
            taken = self._take_extracted(bundle, work)
            if not taken:
                self._check_room(bundle)
                shutil.copytree(bundle.root, work)
                if verify_dir(work) != m:
                    raise BundleError(f"bundle {bundle.root} changed while it was being installed; try again",
                                      code="checksum_mismatch")
            checkpoint("install_copied")
            _fsync_tree(work)
            checkpoint("install_synced")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work, dest)
            bundle.root = dest
            fsync_dir(dest.parent)
            checkpoint("install_renamed")
        except OSError as exc:
            raise _write_error(f"cannot install {m.name} v{m.version} into {self.root}", exc) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("installed %s version %d into %s", m.name, m.version, dest)
        return dest, True

    def _check_room(self, bundle: Bundle) -> None:
        """Before copying a bundle folder in: its size against the store's
        limits (an archive was checked as it was unpacked, into staging)."""
        m = bundle.manifest
        size = sum(entry.size for entry in m.files)
        limit = self.limits.max_bytes
        if limit is not None and size > limit:
            raise BundleError(
                f"{m.name} v{m.version}: its files hold {size_text(size)}, more than the {size_text(limit)} "
                "this device accepts ([store] max_unpacked_mb)",
                code="bundle_too_large_unpacked",
            )
        free = free_bytes(self.root)
        keep = self.limits.min_free_bytes
        if size + keep > free:
            must = f" and {size_text(keep)} must stay free ([store] min_free_mb)" if keep else ""
            raise StoreError(
                f"cannot install {m.name} v{m.version}: it needs {size_text(size)}{must}, but only "
                f"{size_text(free)} are free in {self.root}",
                code="disk_full",
            )

    def _take_extracted(self, bundle: Bundle, work: Path) -> bool:
        """Move an archive's extraction into ``work`` instead of copying it,
        when the bundle owns it (extracted from an archive into this store's
        staging folder, where nothing else writes) and it was verified on
        extraction: no second copy and no second hash of every file."""
        tmp = bundle._tmpdir
        if tmp is None or bundle.root != tmp or tmp.parent != self.staging():
            return False
        try:
            os.rename(tmp, work)
        except OSError:
            return False
        bundle.root = work
        bundle._tmpdir = None  # the store owns it now
        return True

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version directory: renamed into staging first (one atomic
        step), then deleted, so a half-deleted version never looks installed."""
        path = self.path(name, version)
        if not path.is_dir():
            raise StoreError(f"{name} version {version} is not in the store", code="version_not_found")
        trash = self.staging() / f"removed-{name}-{version}-{os.getpid()}"
        try:
            os.rename(path, trash)
            fsync_dir(path.parent)
        except OSError as exc:
            raise _write_error(f"cannot remove {name} v{version}", exc) from None
        checkpoint("remove_renamed")
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed %s version %d from the store", name, version)

    def collectable(self, name: str, state: ModelState, keep: Iterable[int] = ()) -> list[int]:
        """Versions garbage collection would remove, ascending.

        Never the active or last good version, a labelled one, the version on
        probation or the one before it. Of the others, ``keep_versions`` stay
        for rollback: first those in ``keep`` (what the manager needs: the
        rollback target, versions the policy serves or keeps loaded; these
        stay even beyond ``keep_versions``), then the newest that have not
        failed, then the newest failed ones. The rest is collectable: what
        interrupted and failed deploys left behind."""
        protected = {state.active, state.last_good, *state.labels.values()}
        if state.probation is not None:
            protected |= {state.probation.version, state.probation.previous}
        others = [v for v in self.versions(name) if v not in protected]
        needed = {v for v in others if v in set(keep)}
        rest = sorted((v for v in others if v not in needed), key=lambda v: (v not in state.failed, v), reverse=True)
        kept = needed | set(rest[: max(0, self.keep_versions - len(needed))])
        return [v for v in others if v not in kept]

    def gc(self, name: str, state: ModelState, keep: Iterable[int] = ()) -> list[int]:
        """Remove what :meth:`collectable` names; returns the versions removed
        (the caller updates and saves the state)."""
        removed = []
        for version in self.collectable(name, state, keep):
            try:
                self.delete_version(name, version)
                removed.append(version)
            except StoreError as exc:
                log.warning("model %s: %s", name, exc)
        return removed

    def recover(self, name: str) -> ModelState:
        """Read the state of ``name`` and repair what an interrupted process may
        have left: temporary state files, and references to versions that are
        not installed. Returns the (saved, when changed) state."""
        folder = self.root / name
        if folder.is_dir():
            clean_state_leftovers(folder)
        state = self.state(name)
        installed = set(self.versions(name))
        notes = []
        if state.active is not None and state.active not in installed:
            notes.append(f"active version {state.active} is not installed")
            state.active = None
        if state.last_good is not None and state.last_good not in installed:
            notes.append(f"last good version {state.last_good} is not installed")
            state.last_good = None
        for label, version in list(state.labels.items()):
            if version not in installed:
                notes.append(f"label {label!r} pointed at version {version}, which is not installed")
                del state.labels[label]
        for version in [v for v in state.failed if v not in installed]:
            del state.failed[version]
        if notes:
            for note in notes:
                log.warning("model %s: %s; repaired", name, note)
            state.record("repaired", reason="; ".join(notes))
            self.save_state(name, state)
        return state
