"""The one error the serving core raises: a status code as TF Serving (and
gRPC) names it, and a message worded as TF Serving words it where it has
one. A transport maps ``code`` to its own status: gRPC to the
``grpc.StatusCode`` of the same name, REST as TF Serving's HTTP server does
(:data:`edge_agent.http.api.HTTP_STATUS`)."""

from __future__ import annotations

from edge_agent.errors import EdgeAgentError

CODES = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNIMPLEMENTED", "UNAVAILABLE",
    "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED",
})


class ServingError(EdgeAgentError):
    """A request the serving core refuses or could not answer.

    ``code``: one of :data:`CODES` (a ``tensorflow.error.Code`` name);
    ``message``: for a person, naming what is wrong.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown serving status code {code!r}")
        super().__init__(message, code=code)

    def __repr__(self) -> str:
        return f"ServingError({self.code!r}, {self.message!r})"
