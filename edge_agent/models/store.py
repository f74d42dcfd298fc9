"""The versioned model store: ``<root>/<model>/<version>/`` holds a verified bundle.

Bundles are copied into ``<root>/.staging/`` first and renamed into place only
when complete, so a version directory only ever appears whole; leftovers of an
interrupted install are removed when the store is opened.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from edge_agent.bundle import Bundle, open_bundle, verify_dir
from edge_agent.errors import BundleError, EdgeAgentError

log = logging.getLogger(__name__)

STAGING = ".staging"


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ModelStore:
    """Thread-safety: one process owns a store; methods are not reentrant."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeAgentError(f"model store {self.root}: cannot create it ({exc.strerror})", code="store_unusable") from None
        staging = self.root / STAGING
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    def staging(self) -> Path:
        """Scratch space on the store's filesystem (archives are extracted here),
        emptied whenever the store is opened."""
        path = self.root / STAGING
        path.mkdir(exist_ok=True)
        return path

    def versions(self, name: str) -> list[int]:
        """Installed versions of ``name``, ascending."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def install(self, bundle: Bundle) -> Path:
        """Copy a verified bundle into the store; returns its version directory.

        Installing a version that is already present with the same manifest is
        a no-op; a different bundle under the same name and version is refused
        (versions are immutable, as in TF Serving).
        """
        m = bundle.manifest
        dest = self.path(m.name, m.version)
        if dest.exists():
            existing = verify_dir(dest)
            if existing.model_copy(update={"created_at": None}) != m.model_copy(update={"created_at": None}):
                raise BundleError(
                    f"{m.name} version {m.version} is already installed with different contents; "
                    "give the new bundle a new version",
                    code="version_exists",
                )
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f"{m.name}-{m.version}-", dir=self.staging()))
        try:
            work = tmp / "bundle"
            shutil.copytree(bundle.root, work)
            verify_dir(work)
            _fsync_tree(work)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work, dest)
            _fsync_tree(dest.parent)
        except OSError as exc:
            code = "disk_full" if exc.errno == 28 else "store_write_failed"
            raise BundleError(f"cannot install {m.name} v{m.version} into {self.root}: {exc.strerror}", code=code) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("installed %s version %d into %s", m.name, m.version, dest)
        return dest

    def open(self, name: str, version: int) -> Bundle:
        """Open (and re-verify) an installed version."""
        path = self.path(name, version)
        if not path.is_dir():
            raise BundleError(f"{name} version {version} is not in the store", code="version_not_found")
        return open_bundle(path)
