"""One exception hierarchy for the whole agent.

Every error a user can cause derives from :class:`EdgeAgentError`, carries a
stable snake_case ``code`` (used in MQTT replies and events) and the process
exit code the CLI should use. Library exceptions (onnxruntime, OpenCV, paho,
pydantic) are wrapped at the boundary with ``raise ... from None`` so that a
user never sees a traceback for something they can fix.
"""

from __future__ import annotations


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
    :mod:`edge_agent.signing`): ``signature_missing``, ``signature_invalid``,
    ``untrusted_key``.
    """

    code = "bad_bundle"
    exit_code = 2


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
