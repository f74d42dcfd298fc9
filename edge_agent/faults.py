"""Crash injection for the crash-safety tests.

Every step of a model transaction that touches the disk calls
:func:`checkpoint` with a step name. When the environment variable
``EDGE_AGENT_CRASH_AT`` names that step, the process kills itself with
SIGKILL right there, exactly as a power cut or the OOM killer would; the test
then checks that the next start finds a consistent store. ``name@N`` kills at
the N-th time the step is reached. Unset (always, in production) the check is
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SPEC = os.environ.get("EDGE_AGENT_CRASH_AT", "")
_seen: Counter[str] = Counter()


def checkpoint(step: str) -> None:
    if not _SPEC:
        return
    name, _, nth = _SPEC.partition("@")
    if name != step:
        return
    _seen[step] += 1
    if _seen[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
