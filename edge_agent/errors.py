"""One exception hierarchy for the whole agent.

Every error a user can cause derives from :class:`EdgeAgentError`, carries a
stable snake_case ``code`` (used in MQTT replies and events) and the process
exit code the CLI should use. Library exceptions (onnxruntime, OpenCV, paho,
pydantic) are wrapped at the boundary with ``raise ... from None`` so that a
user never sees a traceback for something they can fix.
"""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: BaseException) -> bool:
    """Did writing fail because the disk (or the user's quota) is full?"""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class EdgeAgentError(Exception):
    """Base class. ``code`` is machine readable, the message is for a person."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class UsageError(EdgeAgentError):
    """Bad command-line usage (exit code 2)."""

    code = "bad_usage"
    exit_code = 2


class ConfigError(EdgeAgentError):
    """A configuration file is unreadable or invalid (exit code 2).

    ``problems`` lists every problem found, each already naming the file and
    the key, so ``validate-config`` can print all of them at once.
    """

    code = "bad_config"
    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BundleError(EdgeAgentError):
    """A model bundle is malformed, incomplete or tampered with.

    Codes: ``bundle_not_found``, ``bad_archive``, ``bad_manifest``,
    ``missing_file``, ``size_mismatch``, ``checksum_mismatch``,
    ``unexpected_file``, ``unsupported_model``; with trusted keys (see
    :mod:`edge_agent.bundles.signing`): ``signature_missing``, ``signature_invalid``,
    ``untrusted_key``. Unpacking an archive, before anything is written:
    ``unlisted_member`` (a member the manifest does not list),
    ``bundle_too_large_unpacked`` (more than ``[store] max_unpacked_mb``),
    ``disk_full`` (more than the free space less ``[store] min_free_mb``).
    """

    code = "bad_bundle"
    exit_code = 2


class TaskMismatch(EdgeAgentError):
    """A tensor model (task ``tensor``) where a source would feed it camera
    frames: the config binds a source to it, or a deploy would put one
    there (exit code 2: the config or the deploy is wrong, not the device)."""

    code = "task_mismatch"
    exit_code = 2

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


class RuntimeUnavailable(EdgeAgentError):
    """No Python package can run this model format (e.g. no LiteRT installed)."""

    code = "runtime_unavailable"


class ModelLoadError(EdgeAgentError):
    """The runtime could not load or warm up a model."""

    code = "model_load_failed"


class InferenceError(EdgeAgentError):
    """A runtime failed on one input."""

    code = "inference_failed"


class SourceError(EdgeAgentError):
    """A frame source could not be opened or read."""

    code = "source_failed"


class ModelNotAvailable(EdgeAgentError):
    """No version of the requested model is loaded."""

    code = "model_not_available"


# -- the MQTT plane (edge_agent.comms) ----------------------------------------


class CommandError(EdgeAgentError):
    """A command message could not be accepted, so no handler ran.

    Codes: ``bad_json``, ``bad_command`` (not an object, missing or mistyped
    envelope fields), ``unknown_command``, ``bad_args``,
    ``payload_too_large``; ``signature_missing``, ``untrusted_key``,
    ``signature_invalid`` or ``stale_command`` where commands must be signed.
    """

    code = "bad_command"


class SpoolError(EdgeAgentError):
    """The store-and-forward spool could not keep a message.

    Codes: ``spool_full`` (an event or reply does not fit even after every
    evictable message went), ``disk_full`` (the file system or the spool
    file is full), ``spool_failed`` (any other storage failure).
    """

    code = "spool_failed"


class DownloadError(EdgeAgentError):
    """A bundle could not be downloaded.

    Codes: ``unsupported_url``, ``download_failed``, ``too_large``,
    ``size_mismatch``, ``checksum_mismatch``, ``disk_full``, ``cancelled``.
    """

    code = "download_failed"


class TransferError(EdgeAgentError):
    """A bundle transfer over MQTT failed.

    Codes: ``bad_transfer`` (malformed or mismatching meta), ``too_large``,
    ``transfer_timeout``, ``checksum_mismatch``, ``disk_full``,
    ``transfer_failed``.
    """

    code = "transfer_failed"
