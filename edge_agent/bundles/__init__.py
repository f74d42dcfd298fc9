"""The bundle format: a model with its manifest, checked before it serves.

``manifest.py`` is the schema; ``verify.py`` the device's path (open a bundle
directory or archive and verify it, within unpack limits; its public names are
re-exported here); ``pack.py`` the workstation's (``edge-agent pack``, writing
and signing bundles), never imported by the device; ``signing.py`` the Ed25519
primitives, which import nothing of the bundle code but the manifest's file
names. Importing this package imports neither ``pack`` nor ``signing``.
"""

from edge_agent.bundles.verify import (
    Bundle,
    UnpackLimits,
    extract_archive,
    free_bytes,
    is_archive,
    open_bundle,
    read_manifest,
    sha256_file,
    size_text,
    verify_bundle_signature,
    verify_dir,
)

__all__ = [
    "Bundle",
    "UnpackLimits",
    "extract_archive",
    "free_bytes",
    "is_archive",
    "open_bundle",
    "read_manifest",
    "sha256_file",
    "size_text",
    "verify_bundle_signature",
    "verify_dir",
]
