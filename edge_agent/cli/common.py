"""What every command group of the command line shares (no heavy imports)."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_HELP = "Agent config file (TOML)."
DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"
CONFIG_ENV = "EDGE_AGENT_CONFIG"


def config_option(func: F) -> F:
    """``--config PATH`` of the device-side commands; ``EDGE_AGENT_CONFIG``
    is its environment form (what the systemd unit sets)."""
    return click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                        envvar=CONFIG_ENV, show_envvar=True, help=CONFIG_HELP)(func)


def user_errors(func: F) -> F:
    """Turn our own errors into a message and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from edge_agent.errors import ConfigError, EdgeAgentError

        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(exc.exit_code)
        except EdgeAgentError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def table(head: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the head first."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])
