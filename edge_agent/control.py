"""What each command does: the handlers behind the dispatcher.

The same handlers serve the MQTT command topics (issue: control plane) and the
local control socket of ``edge-agent models``; :func:`build_dispatcher` makes
the table. ``local=True`` adds the commands that name files on the device
(``add``) and therefore must not be reachable from the network.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_agent.comms.commands import (
    COMMAND_ARGS,
    ActivateArgs,
    AddArgs,
    DeployArgs,
    LabelArgs,
    RemoveArgs,
    RollbackArgs,
    SetArgs,
)
from edge_agent.comms.dispatcher import CommandContext, Dispatcher
from edge_agent.errors import EdgeAgentError
from edge_agent.models.lifecycle import deploy
from edge_agent.models.manager import ModelManager

log = logging.getLogger(__name__)


class Control:
    """Handlers bound to one agent's models and sources."""

    def __init__(
        self,
        models: ModelManager,
        *,
        status: Callable[[], dict[str, Any]],
        apply_settings: Callable[[SetArgs], dict[str, Any]] | None = None,
        fetcher: Callable[[DeployArgs, Callable[..., None]], Path] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.models = models
        self.status = status
        self.apply_settings = apply_settings
        self.fetcher = fetcher
        self.max_bytes = max_bytes

    def ping(self, args: Any, ctx: CommandContext) -> dict[str, Any]:
        return {"pong": True}

    def get_status(self, args: Any, ctx: CommandContext) -> dict[str, Any]:
        return self.status()

    def _progress(self, ctx: CommandContext) -> Callable[..., None]:
        def progress(step: str, **info: Any) -> None:
            ctx.emit_event("deploy_progress", step=step, **info)

        return progress

    def deploy(self, args: DeployArgs, ctx: CommandContext) -> dict[str, Any]:
        """Fetch (file://, http(s):// with resume, or an MQTT transfer), then the
        whole lifecycle transaction; the reply comes when it has finished."""
        if self.max_bytes is not None and args.size > self.max_bytes:
            raise EdgeAgentError(
                f"the bundle is {args.size} bytes; this device accepts at most {self.max_bytes}", code="too_large"
            )
        ctx.emit_event("deploy_started", model=args.model, version=args.version)
        progress = self._progress(ctx)
        fetched: Path | None = None
        try:
            source: str | Path
            sha256, size = args.sha256, args.size
            if args.url is not None and args.url.lower().startswith("file:"):
                source = args.url
            else:
                if self.fetcher is None:
                    raise EdgeAgentError("this agent cannot fetch bundles (no MQTT connection)", code="unsupported_url")
                if args.transfer is None:  # a transfer says "transfer" once it listens (BundleFetcher)
                    progress("fetching")
                source = fetched = Path(self.fetcher(args, progress))
                sha256 = size = None  # the download or transfer has just verified both
            result = deploy(
                self.models, source, sha256=sha256, size=size, activate=args.activate,
                label=args.label, model=args.model, version=args.version, progress=progress,
            )
        except EdgeAgentError as exc:
            ctx.emit_event("deploy_failed", model=args.model, version=args.version, code=exc.code, message=str(exc))
            raise
        finally:
            if fetched is not None:
                _remove_fetched(fetched)
        ctx.emit_event("deploy_done", model=args.model, version=args.version, active=result["active"])
        return result

    def add(self, args: AddArgs, ctx: CommandContext) -> dict[str, Any]:
        return deploy(self.models, Path(args.path), activate=args.activate, label=args.label,
                      progress=self._progress(ctx))

    def activate(self, args: ActivateArgs, ctx: CommandContext) -> dict[str, Any]:
        return self.models.activate(args.model, args.version, reason=f"command {ctx.id}")

    def rollback(self, args: RollbackArgs, ctx: CommandContext) -> dict[str, Any]:
        return self.models.rollback(args.model)

    def remove(self, args: RemoveArgs, ctx: CommandContext) -> dict[str, Any]:
        return self.models.remove(args.model, args.version)

    def label(self, args: LabelArgs, ctx: CommandContext) -> dict[str, Any]:
        return self.models.set_label(args.model, args.label, args.version)

    def set(self, args: SetArgs, ctx: CommandContext) -> dict[str, Any]:
        if self.apply_settings is None:
            raise EdgeAgentError("this agent has no run-time settings to change", code="unsupported_command")
        return self.apply_settings(args)


def _remove_fetched(path: Path) -> None:
    """The fetched archive is not needed once the store holds the version (or
    the deploy failed after the archive was complete and verified)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return
    try:
        path.parent.rmdir()  # its folder too, once empty
    except OSError:
        pass  # not empty (or already gone): left alone


def command_verifier(trusted_keys: Sequence[Path], max_age_s: float) -> Callable[[Any, dict[str, Any]], None]:
    """The dispatcher's verifier for signed commands (CONTRACT §3: ``ts`` and
    ``sig``): every command must be signed by one of ``trusted_keys``. The
    key files are read here, once, so a bad one stops the agent at start."""
    from edge_agent.signing import load_trusted_keys, verify_command

    trusted = load_trusted_keys(list(trusted_keys))

    def verify(_envelope: Any, data: dict[str, Any]) -> None:
        # The signature covers the values as the console sent them (``ts`` may
        # be an int there), so check the parsed message, not the envelope.
        verify_command(trusted, data, now=time.time(), max_age_s=max_age_s)

    return verify


def build_dispatcher(control: Control, *, local: bool, events: Callable[[dict[str, Any]], None] | None = None,
                     **kwargs: Any) -> Dispatcher:
    d = Dispatcher(events=events, **kwargs)
    handlers = {
        "ping": control.ping,
        "status": control.get_status,
        "deploy": control.deploy,
        "activate": control.activate,
        "rollback": control.rollback,
        "remove": control.remove,
        "set": control.set,
    }
    for name, handler in handlers.items():
        d.register(name, COMMAND_ARGS[name], handler)
    d.register("label", LabelArgs, control.label)
    if local:
        d.register("add", AddArgs, control.add)
    return d
