"""What each command does: the command handlers behind the dispatcher.

The same :class:`CommandHandlers` serve the MQTT command topics (through the
MQTT plane, :mod:`.plane`) and the local control socket of ``edge-agent
models`` (:mod:`.local`); :func:`build_dispatcher` makes the table. ``local=True`` adds the commands that name files on the device
(``add``) and therefore must not be reachable from the network.

:meth:`CommandHandlers.recover` answers a command that a crash interrupted (found in
the command journal at the next start): from the store as it is now, the
command's outcome when it had in fact completed, else ``interrupted`` with
what the device holds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

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

if TYPE_CHECKING:
    from edge_agent.comms.journal import Entry
from edge_agent.models.lifecycle import deploy
from edge_agent.models.manager import ModelManager

log = logging.getLogger(__name__)

DURABLE_COMMANDS = frozenset({"deploy", "activate", "rollback", "remove", "label"})
"""The commands that change the store: written down before they run, so a
crash in the middle gets them answered at the next start."""


class CommandHandlers:
    """Handlers bound to one agent's models and sources. Each runs on the
    thread that dispatches the command (a command worker, a socket
    connection's thread); what they share is the model manager's to guard."""

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

    # -- after a crash ----------------------------------------------------------

    def recover(self, entry: "Entry") -> dict[str, Any]:
        """The answer to a command an earlier run took and never answered
        (the agent died while it ran). Called at start, once the store was
        recovered and the models loaded, so the store is what it will be.

        Returns the command's result, marked ``"recovered": true``, when what
        it asked for is what the device now holds (``deploy``: the version
        serves, with its label; with ``activate`` false, only when it had
        reached its ``labelling`` step, since its checks end without a step
        of their own; ``activate``; ``remove``; ``label``). Raises
        ``interrupted`` otherwise, saying when it was taken, its last step,
        and what the store holds now."""
        args = entry.args
        model = args.get("model") if isinstance(args.get("model"), str) else None
        now = self.models.status().get(model) if model else None
        version = args.get("version")
        outcome: dict[str, Any] | None = None
        if now is not None:
            versions, active, labels = now.get("versions", []), now.get("active"), now.get("labels", {})
            if entry.cmd == "deploy" and version in versions and (
                    active == version if args.get("activate", True) else entry.step == "labelling"
            ) and (args.get("label") is None or labels.get(args["label"]) == version):
                outcome = {"model": model, "version": version, "active": active}
                if args.get("label") is not None:
                    outcome["label"] = args["label"]
            elif entry.cmd == "activate" and active == version:
                outcome = {"model": model, "version": version, "active": active}
            elif entry.cmd == "remove" and isinstance(version, int) and version not in versions:
                outcome = {"model": model, "version": version, "removed": True}
            elif entry.cmd == "label" and isinstance(args.get("label"), str) and labels.get(args["label"]) == version:
                outcome = {"model": model, "label": args["label"], "version": version}
        if outcome is not None:
            return {**outcome, "recovered": True}
        raise EdgeAgentError(self._interrupted_message(entry, model, now), code="interrupted")

    def _interrupted_message(self, entry: "Entry", model: str | None, now: dict[str, Any] | None) -> str:
        ago = max(0.0, time.time() - entry.started)
        step = f", at its step {entry.step!r}" if entry.step else ""
        what = (f"the agent restarted while it ran this {entry.cmd} (taken {_duration(ago)} ago{step}), so it did "
                "not finish")
        if entry.cmd == "set":
            return what + "; settings made by set do not outlive a restart anyway (the config's values apply)"
        if now is None:
            return what + (f"; model {model!r} is not served here" if model else "")
        state = f"; now {model} serves version {now.get('active')}"
        version = entry.args.get("version")
        if isinstance(version, int) and entry.cmd in ("deploy", "activate", "remove", "label"):
            failed = (now.get("failed") or {}).get(str(version))
            if version in now.get("versions", []):
                state += f", version {version} is installed" + (f" but failed ({failed})" if failed else "")
            else:
                state += f", version {version} is not installed"
        labels = now.get("labels") or {}
        if labels:
            state += ", labels " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return what + state + ". The store is consistent (it was recovered at start); send the command again, " \
            "with a new id, to retry"


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
    from edge_agent.bundles.signing import load_trusted_keys, verify_command

    trusted = load_trusted_keys(list(trusted_keys))

    def verify(_envelope: Any, data: dict[str, Any]) -> None:
        # The signature covers the values as the console sent them (``ts`` may
        # be an int there), so check the parsed message, not the envelope.
        verify_command(trusted, data, now=time.time(), max_age_s=max_age_s)

    return verify


def build_dispatcher(handlers: CommandHandlers, *, local: bool, events: Callable[[dict[str, Any]], None] | None = None,
                     **kwargs: Any) -> Dispatcher:
    """The table of commands. ``kwargs`` go to :class:`Dispatcher`
    (``journal=`` makes :data:`DURABLE_COMMANDS` and signed commands survive
    a restart; :meth:`Dispatcher.recover` with :meth:`CommandHandlers.recover`
    answers those a crash interrupted)."""
    d = Dispatcher(events=events, **kwargs)
    table = {
        "ping": handlers.ping,
        "status": handlers.get_status,
        "deploy": handlers.deploy,
        "activate": handlers.activate,
        "rollback": handlers.rollback,
        "remove": handlers.remove,
        "set": handlers.set,
    }
    for name, handler in table.items():
        d.register(name, COMMAND_ARGS[name], handler, durable=name in DURABLE_COMMANDS)
    d.register("label", LabelArgs, handlers.label, durable=True)
    if local:
        d.register("add", AddArgs, handlers.add)
    return d


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
