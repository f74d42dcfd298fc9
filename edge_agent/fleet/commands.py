"""A command as the console sends it: its id (:func:`new_command_id`) and
its message (:func:`command_payload`): ``{"id", "cmd", "args", "ts"}`` plus,
with the console's Ed25519 key, ``sig`` over the four (see
:func:`edge_agent.bundles.signing.sign_command`). Pure functions, any thread.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def new_command_id(cmd: str) -> str:
    return f"fleet-{cmd}-{uuid.uuid4().hex[:12]}"


def command_payload(cmd_id: str, cmd: str, args: dict[str, Any], *, sign_key: Any = None,
                    ts: float | None = None) -> str:
    """The JSON message of one command, stamped ``ts`` (default: now) and
    signed when ``sign_key`` (an Ed25519 private key) is given."""
    message: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "args": args, "ts": time.time() if ts is None else ts}
    if sign_key is not None:
        from edge_agent.bundles.signing import sign_command

        message["sig"] = sign_command(sign_key, cmd_id, cmd, args, message["ts"])
    return json.dumps(message, separators=(",", ":"))
