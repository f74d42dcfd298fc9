"""Errors of the quantizer. They derive from the agent's hierarchy so the CLI
prints them as one clear line with their exit code (2: bad input, 1: failed)."""

from __future__ import annotations

from edge_agent.errors import EdgeAgentError


class QuantizeError(EdgeAgentError):
    """The quantizer could not do its job (exit code 1)."""

    code = "quantize_failed"
    exit_code = 1


class QuantizeInputError(QuantizeError):
    """Bad input: not an ONNX model, unknown size, no usable calibration data (exit code 2)."""

    code = "bad_input"
    exit_code = 2


class QualityGateFailed(QuantizeError):
    """The artifacts do not agree with fp32 well enough (exit code 1)."""

    code = "quality_gate_failed"
    exit_code = 1
