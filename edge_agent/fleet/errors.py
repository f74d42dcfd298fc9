"""The fleet console's own error: :class:`FleetError`, raised where the
console cannot do its part (broker unreachable or refusing, a command that
cannot be published, an archive that cannot be served). Usage mistakes are
:class:`~edge_agent.errors.UsageError` (exit code 2)."""

from __future__ import annotations

from edge_agent.errors import EdgeAgentError


class FleetError(EdgeAgentError):
    """The console could not do its part (broker unreachable, bad bundle
    path, nothing to target). Exit code 1; usage mistakes are
    :class:`~edge_agent.errors.UsageError` (exit code 2)."""

    code = "fleet_error"
