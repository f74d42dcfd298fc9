"""The bundle as the console ships it: :func:`prepare_bundle` verifies a
bundle directory or archive as a device will and archives a directory to a
temporary ``.tar.gz``; :func:`chunk_size_for` picks the chunk size of an MQTT
transfer. No shared state.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UsageError


@dataclass
class PreparedBundle:
    """A bundle archive ready to ship, with what the deploy command needs."""

    archive: Path
    model: str
    version: int
    sha256: str
    size: int
    temporary: bool = False
    """True when the console made the archive (from a directory) and removes it."""

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.archive.parent, ignore_errors=True)


def prepare_bundle(path: Path | str) -> PreparedBundle:
    """Verify the bundle at ``path`` (directory or archive) as a device will
    and, for a directory, archive it (``.tar.gz``) to a temporary file."""
    from edge_agent.bundles import is_archive, open_bundle, sha256_file
    from edge_agent.bundles.pack import write_bundle
    from edge_agent.errors import BundleError

    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"bundle {path}: not found")
    if not path.is_dir() and not is_archive(path):
        raise UsageError(f"bundle {path}: expected a bundle directory or a .tar/.tar.gz archive")
    try:
        with open_bundle(path) as bundle:
            manifest = bundle.manifest
    except BundleError as exc:
        raise UsageError(f"bundle {path} cannot be deployed: {exc}") from None
    temporary = False
    archive = path
    if path.is_dir():
        folder = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
        archive = folder / f"{manifest.name}-{manifest.version}.tar.gz"
        write_bundle(path, archive)
        temporary = True
    return PreparedBundle(archive, manifest.name, manifest.version, sha256_file(archive), archive.stat().st_size,
                          temporary)


CONSOLE_CHUNK_SIZE = 256 * 1024


def chunk_size_for(size: int) -> int:
    """256 KiB, or larger for a large file so the transfer's meta (one sha256
    per chunk) stays below about 70 kB: at most 1024 chunks, at most 4 MiB.

    Larger than the transfer's own default (64 KiB) because a fleet pays per
    message as much as per byte: every device handles every chunk, and four
    times fewer messages cost the devices and the broker much less (see
    benchmarks/fleet.py); a chunk lost is still only 256 KiB to ask again."""
    from edge_agent.comms.transfer import MAX_CHUNK_SIZE

    wanted = math.ceil(size / 1024 / 1024) * 1024
    return min(MAX_CHUNK_SIZE, max(CONSOLE_CHUNK_SIZE, wanted))
