"""``edge-agent models ...``: the operator's view of the model store.

With the agent running (it holds the store lock), every command goes through
its local control socket, so the agent verifies, swaps and records the change
itself. With the agent stopped, the command opens the store directly, under
the same lock, and runs the very same handlers in-process; an activation made
that way takes effect at the next start and skips probation (nothing is
flowing to judge it by, and the operator chose the version).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from edge_agent.cli.common import config_option, table, user_errors

USAGE_CODES = {"bad_args", "bad_command", "unknown_model", "version_not_found", "bundle_not_found"}

log = logging.getLogger("edge_agent.cli")


def _config(path: str):
    from edge_agent.config import load_config

    return load_config(path)


def send(config_path: str, cmd: str, args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Run one command through the running agent, or offline. Returns the
    reply and whether the agent was running."""
    from edge_agent.comms.local import request
    from edge_agent.errors import EdgeAgentError
    from edge_agent.models.store import ModelStore, StoreLock

    config = _config(config_path)
    root = config.store.path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeAgentError(f"model store {root}: cannot create it ({exc.strerror})", code="store_unusable") from None
    # The reply is printed by the command; the dispatcher's own log lines
    # would say the same thing twice.
    logging.getLogger("edge_agent.comms.dispatcher").setLevel(logging.ERROR)
    lock = StoreLock(root)
    if not lock.acquire():
        return request(config.store.socket_path, cmd, args), True
    try:
        from edge_agent.comms.handlers import CommandHandlers, build_dispatcher
        from edge_agent.models.manager import ModelManager

        store = ModelStore.from_config(config.store)
        manager = ModelManager(store, config.models, trusted_keys=config.store.trusted_keys, probation=False)
        manager.start(require=False)
        try:
            handlers = CommandHandlers(manager, status=lambda: {"state": "stopped", "models": manager.status()})
            dispatcher = build_dispatcher(handlers, local=True, events=lambda e: log.info("%s", e))
            message = json.dumps({"id": f"cli-{uuid.uuid4().hex[:12]}", "cmd": cmd, "args": args})
            return dispatcher.handle(message, "cli"), False
        finally:
            manager.stop()
    finally:
        lock.release()


def _finish(reply: dict[str, Any], as_json: bool, summary: str) -> None:
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        err = reply.get("error", {})
        click.echo(f"error: {err.get('message')} ({err.get('code')})", err=True)
        sys.exit(2 if err.get("code") in USAGE_CODES else 1)
    if not as_json:
        click.echo(summary)


def list_rows(config: Any, status: dict[str, Any], only: str | None) -> list[list[str]]:
    from edge_agent.models.store import dir_size

    rows = []
    for name, st in sorted(status.items()):
        if only and name != only:
            continue
        labels_by_version: dict[int, list[str]] = {}
        for label, v in (st.get("labels") or {}).items():
            labels_by_version.setdefault(v, []).append(label)
        for v in st.get("versions", []):
            marks = []
            if v == st.get("active"):
                marks.append("active")
            if v == st.get("last_good"):
                marks.append("last-good")
            if (st.get("probation") or {}).get("version") == v:
                marks.append("on probation")
            marks += labels_by_version.get(v, [])
            if str(v) in (st.get("failed") or {}):
                marks.append("failed: " + st["failed"][str(v)][:60])
            size = dir_size(config.store.path / name / str(v))
            human = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
            rows.append([name, str(v), ", ".join(marks) or "-", human])
    return rows


@click.group()
def models() -> None:
    """The local model store (through the agent when it runs)."""


def _options(func):
    func = click.option("--json", "as_json", is_flag=True, help="Print the raw reply.")(func)
    return config_option(func)


@models.command("list")
@click.argument("model", required=False)
@_options
@user_errors
def list_cmd(model: str | None, config_path: str, as_json: bool) -> None:
    """Installed versions, which is active, last good, labels."""
    from edge_agent.models.state import read_state
    from edge_agent.models.store import StoreLock, versions_in

    config = _config(config_path)
    lock = StoreLock(config.store.path) if config.store.path.is_dir() else None
    if lock is not None and not lock.acquire():
        from edge_agent.comms.local import request

        reply = request(config.store.socket_path, "status", {})
        if not reply.get("ok"):
            _finish(reply, as_json, "")
        status = reply["result"]["models"]
        running = True
    else:
        if lock is not None:
            lock.release()
        status = {}
        for m in config.models:
            folder = config.store.path / m.name
            state, _ = read_state(folder)
            status[m.name] = {**state.model_dump(mode="json"), "versions": versions_in(folder)}
        running = False
    if as_json:
        click.echo(json.dumps({"running": running, "models": status}, indent=2))
        return
    rows = list_rows(config, status, model)
    click.echo(f"store {config.store.path} (agent {'running' if running else 'stopped'})")
    if not rows:
        click.echo("no versions installed")
        return
    click.echo(table(["MODEL", "VERSION", "STATE", "SIZE"], rows))


@models.command("add")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--activate", is_flag=True, help="Serve it once verified.")
@click.option("--label", help="Point this label (e.g. canary) at it.")
@_options
@user_errors
def add_cmd(bundle: str, activate: bool, label: str | None, config_path: str, as_json: bool) -> None:
    """Verify BUNDLE (checksums, signature, load, smoke test) and install it."""
    reply, _ = send(config_path, "add", {"path": str(Path(bundle).resolve()), "activate": activate, "label": label})
    r = reply.get("result", {})
    act = " and activated" if (r.get("activation") or {}).get("changed") else ""
    active = r.get("active") or "none yet (the newest version serves at the next start)"
    _finish(reply, as_json, f"installed {r.get('model')} version {r.get('version')}{act}; active: {active}")


@models.command("activate")
@click.argument("model")
@click.argument("version", type=click.IntRange(min=1))
@_options
@user_errors
def activate_cmd(model: str, version: int, config_path: str, as_json: bool) -> None:
    """Serve VERSION of MODEL."""
    reply, running = send(config_path, "activate", {"model": model, "version": version})
    r = reply.get("result", {})
    how = f" ({r.get('mode')} swap, {r.get('load_ms')} ms to load)" if r.get("changed") and running else ""
    _finish(reply, as_json, f"{model} version {version} is active{how}")


@models.command("rollback")
@click.argument("model")
@_options
@user_errors
def rollback_cmd(model: str, config_path: str, as_json: bool) -> None:
    """Go back to the previous good version of MODEL."""
    reply, _ = send(config_path, "rollback", {"model": model})
    r = reply.get("result", {})
    _finish(reply, as_json, f"{model}: rolled back from version {r.get('from')} to {r.get('version')}")


@models.command("remove")
@click.argument("model")
@click.argument("version", type=click.IntRange(min=1))
@_options
@user_errors
def remove_cmd(model: str, version: int, config_path: str, as_json: bool) -> None:
    """Delete VERSION of MODEL from the store (never the active or last good one)."""
    reply, _ = send(config_path, "remove", {"model": model, "version": version})
    _finish(reply, as_json, f"{model} version {version} removed")
