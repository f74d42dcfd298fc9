"""Where the broker is and how the console logs in: :class:`BrokerSettings`,
from an agent-style TOML's ``[mqtt]`` and/or command-line options. Checked
when made (a :class:`~edge_agent.errors.UsageError` or
:class:`~edge_agent.errors.ConfigError`, exit code 2); immutable, so safe to
share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import UsageError


@dataclass(frozen=True)
class BrokerSettings:
    """The broker's address and credentials, as the agents use them."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "edge"
    username: str | None = None
    password: str | None = None
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    tls: bool = False
    tls_insecure: bool = False
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    sign_key: Path | None = None  # Ed25519 private key: every command is signed with it

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise UsageError(f"broker port {self.port} is not in 1-65535")
        if not self.prefix or any(ch in self.prefix for ch in "+#") or self.prefix.strip("/") != self.prefix:
            raise UsageError(f"topic prefix {self.prefix!r}: must not be empty, contain '+' or '#', or start or end with '/'")
        if (self.certfile is None) != (self.keyfile is None):
            raise UsageError("--certfile and --keyfile must be given together")
        if self.password is not None and self.username is None:
            raise UsageError("a password is given without a user name")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_certs is not None or self.certfile is not None

    @classmethod
    def from_options(cls, config: Path | str | None = None, **options: Any) -> "BrokerSettings":
        """``[mqtt]`` of an agent config file (when given), then every option
        that is not ``None`` on top. Raises ConfigError/UsageError (exit 2)."""
        base: dict[str, Any] = {}
        if config is not None:
            from edge_agent.config import load_config

            cfg = load_config(config)
            if cfg.mqtt is None:
                raise UsageError(f"{config}: has no [mqtt] section: the console needs the broker's address")
            m = cfg.mqtt
            base = dict(host=m.host, port=m.port, prefix=m.topic_prefix, username=m.username, password=m.password,
                        protocol=m.protocol, keepalive_s=m.keepalive_s)
            if m.tls is not None:
                base.update(tls=True, ca_certs=m.tls.ca_certs, certfile=m.tls.certfile, keyfile=m.tls.keyfile,
                            tls_insecure=m.tls.insecure)
        for key, value in options.items():
            if value is not None:
                base[key] = Path(value) if key in ("ca_certs", "certfile", "keyfile", "sign_key") else value
        return cls(**base)
