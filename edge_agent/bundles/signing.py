"""Bundle signatures: Ed25519 keys, ``manifest.sig``, and its verification.

A bundle is signed by signing the exact bytes of its ``manifest.json``. The
manifest pins the size and sha256 of every other file, so a valid signature
on the manifest plus passing checksums covers the whole bundle. The
signature lives beside the manifest as ``manifest.sig``, a small JSON
document::

    {"algorithm": "ed25519", "key_id": "3f2a9c0d1e4b5a67", "signature": "<base64, 64 bytes>"}

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public
key; it names which key signed, so that a device can trust several keys at
once (key rotation). It is a hint, not a proof: the signature is always
checked against the trusted key it names.

Keys are PEM files as ``openssl genpkey -algorithm ed25519`` writes them
(PKCS#8 private key, SubjectPublicKeyInfo public key), unencrypted.

Only this module imports ``cryptography``; the agent imports it only when it
signs or verifies. Errors: a bundle that fails verification raises
:class:`~edge_agent.errors.BundleError` with code ``signature_missing``,
``signature_invalid`` or ``untrusted_key``; a key file that cannot be used
raises :class:`~edge_agent.errors.UsageError` with code ``bad_key`` (or
``key_exists`` when ``keygen`` would overwrite one). Both exit with status 2.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.bundles.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.errors import BundleError, UsageError

ALGORITHM = "ed25519"
KEY_ID_LENGTH = 16
_SIG_MAX_BYTES = 64 * 1024  # a real manifest.sig is about 150 bytes
_SIGNATURE_BYTES = 64

TrustedKeys = Mapping[str, Ed25519PublicKey]


# ------------------------------------------------------------------------ keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LENGTH]


def generate_keypair(private_path: Path | str, public_path: Path | str) -> str:
    """Make a new Ed25519 key pair: the private key (PEM, PKCS#8, mode 0600)
    at ``private_path`` and the public key (PEM) at ``public_path``.

    Never overwrites: if either file exists, nothing is written and a
    UsageError (``key_exists``) is raised. Missing parent directories are
    created. Returns the key id.
    """
    private_path = Path(private_path).expanduser()
    public_path = Path(public_path).expanduser()
    if private_path.resolve() == public_path.resolve():
        raise UsageError("the private and the public key need two different files", code="bad_usage")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} already exists; refusing to overwrite a key", code="key_exists")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return key_id(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode``, whatever the umask."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists; refusing to overwrite a key", code="key_exists") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}", code="bad_usage") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: not found", code="bad_key") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory, expected a PEM file", code="bad_key") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc.strerror or exc})", code="bad_key") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key (PEM). UsageError ``bad_key``
    when the file is missing, not a PEM private key, encrypted, or another
    algorithm (a public key given by mistake is named as such)."""
    path = Path(path).expanduser()
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(
            f"signing key {path}: is encrypted with a passphrase; edge-agent needs an unencrypted key "
            "(openssl pkey -in KEY -out PLAIN.key)",
            code="bad_key",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = ""
        if b"PUBLIC KEY" in data:
            hint = " (this is a public key; sign with the .key file, the .pub file is for the devices)"
        raise UsageError(f"signing key {path}: not a PEM private key{hint}", code="bad_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(
            f"signing key {path}: not an Ed25519 key; bundles are signed with Ed25519 keys (edge-agent keygen)",
            code="bad_key",
        )
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM). UsageError ``bad_key`` otherwise."""
    path = Path(path).expanduser()
    data = _read_key_file(path, "trusted key")
    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"trusted key {path}: is a private key; give the devices the public key (.pub) only", code="bad_key"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"trusted key {path}: not a PEM public key", code="bad_key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"trusted key {path}: not an Ed25519 public key", code="bad_key")
    return key


def load_trusted_keys(paths: Sequence[Path | str] | Path | str) -> dict[str, Ed25519PublicKey]:
    """Load public key files into ``{key_id: key}``. Load them once (e.g. at
    start) to report a bad key file early; :func:`check_signature` takes the
    result."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id(key)] = key
    return keys


# --------------------------------------------------------------------- signing


def sign_dir(root: Path, private_key: Ed25519PrivateKey) -> Path:
    """Write ``root/manifest.sig`` for ``root/manifest.json`` as it is now,
    replacing an older signature. Does not check the bundle's files (see
    :func:`edge_agent.bundles.pack.sign_bundle`). Returns the signature's path."""
    manifest_path = root / MANIFEST_NAME
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {root}: no {MANIFEST_NAME}", code="bad_manifest") from None
    document = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }
    target = root / SIGNATURE_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest.sig-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(document, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------- verification


def check_signature(root: Path, trusted: TrustedKeys) -> str:
    """Check ``root/manifest.sig`` against ``root/manifest.json`` and the
    trusted keys (from :func:`load_trusted_keys`); return the signer's key id.

    This checks the signature only, not the files: call it after
    :func:`edge_agent.bundles.verify.verify_dir` (``open_bundle(..., trusted_keys=...)``
    does both, in that order). Raises BundleError:

    * ``signature_missing``: there is no ``manifest.sig``;
    * ``untrusted_key``: it is signed by a key that is not trusted;
    * ``signature_invalid``: ``manifest.sig`` is malformed, or the signature
      does not match ``manifest.json`` (changed after signing, or forged).
    """
    sig_path = root / SIGNATURE_NAME
    if sig_path.is_symlink() or (sig_path.exists() and not sig_path.is_file()):
        raise BundleError(f"bundle {root}: {SIGNATURE_NAME} is not a regular file", code="signature_invalid")
    if not sig_path.exists():
        raise BundleError(
            f"bundle {root}: not signed (no {SIGNATURE_NAME}), and trusted keys are configured, "
            "so a signature is required",
            code="signature_missing",
        )
    if sig_path.stat().st_size > _SIG_MAX_BYTES:
        raise BundleError(f"bundle {root}: {SIGNATURE_NAME} is too large to be a signature", code="signature_invalid")
    kid, signature = _parse_signature(root, sig_path.read_bytes())
    key = trusted.get(kid)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise BundleError(
            f"bundle {root}: signed by key {kid}, which is not a trusted key (trusted: {known})",
            code="untrusted_key",
        )
    try:
        key.verify(signature, (root / MANIFEST_NAME).read_bytes())
    except InvalidSignature:
        raise BundleError(
            f"bundle {root}: the signature does not match {MANIFEST_NAME}: the manifest was changed after "
            f"signing, or the signature is forged",
            code="signature_invalid",
        ) from None
    return kid


def _parse_signature(root: Path, raw: bytes) -> tuple[str, bytes]:
    def bad(why: str) -> BundleError:
        return BundleError(f"bundle {root}: {SIGNATURE_NAME} is malformed: {why}", code="signature_invalid")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    algorithm = doc.get("algorithm")
    if algorithm != ALGORITHM:
        raise bad(f"algorithm is {algorithm!r}, expected {ALGORITHM!r}")
    kid = doc.get("key_id")
    if not isinstance(kid, str) or len(kid) != KEY_ID_LENGTH or any(c not in "0123456789abcdef" for c in kid):
        raise bad(f"key_id must be {KEY_ID_LENGTH} lower-case hex digits")
    encoded = doc.get("signature")
    if not isinstance(encoded, str):
        raise bad("no signature")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad("signature is not base64") from None
    if len(signature) != _SIGNATURE_BYTES:
        raise bad(f"signature is {len(signature)} bytes, an Ed25519 signature is {_SIGNATURE_BYTES}")
    return kid, signature


# --------------------------------------------------------------------- commands
#
# A command over MQTT (CONTRACT §3) may carry ``ts`` and ``sig``. The signature
# covers the command's canonical form: the JSON object {"args", "cmd", "id",
# "ts"} with sorted keys, no spaces, UTF-8 (``json.dumps(..., sort_keys=True,
# separators=(",", ":"), ensure_ascii=False)``), as parsed from the message,
# so a key order or spacing of the console's own does not matter. ``sig`` is
# ``"<key_id>:<base64 Ed25519 signature>"``.

def command_message(cmd_id: object, cmd: object, args: object, ts: object) -> bytes:
    """The bytes a command signature covers."""
    doc = {"args": args, "cmd": cmd, "id": cmd_id, "ts": ts}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_command(private_key: Ed25519PrivateKey, cmd_id: str, cmd: str, args: object, ts: float) -> str:
    """The ``sig`` field of a command (see :func:`command_message`)."""
    signature = private_key.sign(command_message(cmd_id, cmd, args, ts))
    return f"{key_id(private_key.public_key())}:{base64.b64encode(signature).decode('ascii')}"


def verify_command(trusted: TrustedKeys, data: Mapping[str, object], *, now: float, max_age_s: float) -> str:
    """Check a parsed command's ``sig`` against the trusted keys and its
    ``ts`` against ``now``; return the signer's key id. Raises CommandError:

    * ``signature_missing``: no ``sig`` (or no ``ts``);
    * ``untrusted_key``: signed by a key that is not trusted;
    * ``signature_invalid``: a malformed ``sig``, or one that does not match
      the command (changed after signing, or forged);
    * ``stale_command``: signed more than ``max_age_s`` seconds before
      ``now`` (a replay of an old command); 0 disables the check. A ``ts``
      in the future is accepted: a device whose clock is behind (a Pi
      without a real-time clock, before NTP) must not refuse its console.

    This checks one message. That a signed command runs only once, also
    after a restart, is the command journal's work
    (:mod:`edge_agent.comms.journal`), which does not rely on ``now``.
    """
    from edge_agent.errors import CommandError

    sig, ts = data.get("sig"), data.get("ts")
    if sig is None or ts is None:
        raise CommandError("the command is not signed (it needs ts and sig): this device accepts only "
                           "commands signed by a trusted key", code="signature_missing")
    if not isinstance(sig, str) or sig.count(":") != 1:
        raise CommandError('sig must be "<key id>:<base64 signature>"', code="signature_invalid")
    kid, encoded = sig.split(":")
    key = trusted.get(kid)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise CommandError(f"signed by key {kid!r}, which is not trusted here (trusted: {known})",
                           code="untrusted_key")
    try:
        signature = base64.b64decode(encoded, validate=True)
        key.verify(signature, command_message(data.get("id"), data.get("cmd"), data.get("args", {}), ts))
    except (binascii.Error, ValueError, InvalidSignature):
        raise CommandError("the signature does not match the command: it was changed after signing, "
                           "or the signature is forged", code="signature_invalid") from None
    if max_age_s > 0 and isinstance(ts, (int, float)) and now - float(ts) > max_age_s:
        raise CommandError(
            f"the command was signed at {_utc(float(ts))}, {now - float(ts):.0f} s before this device's clock "
            f"({_utc(now)}); commands older than {max_age_s:g} s are refused: a replay, a command held back, "
            "or a clock that is wrong (check NTP on the device and the console)", code="stale_command")
    return kid


def _utc(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f}"
