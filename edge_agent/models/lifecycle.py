"""Deploy: the whole model transaction from a bundle file to a serving version.

``deploy`` is what ``edge-agent models add`` runs and what the MQTT ``deploy``
command calls once the bundle is on local disk. Steps, each announced through
``progress(step, **info)``:

1. ``fetching``: resolve the source (a path or a ``file://`` URL; the
   MQTT plane downloads or receives any other source itself and passes
   the local file), check the archive's size and sha256 when the caller gave
   them;
2. ``verifying``: open the bundle: manifest schema, every file's sha256, the
   signature when trusted keys are configured;
3. ``installing``: copy into the store through its staging area;
4. ``loading``: load it in its runtime, warm it up, smoke-test it (finite
   outputs of the declared shape; the bundle's sample outputs when it has some);
5. ``activating``: swap it in (see :meth:`ModelManager.activate`), probation starts;
   or ``labelling`` when a label was asked for.

Any failure raises an EdgeAgentError with a specific code; a version this
deploy installed is removed again, and the active version never stops serving.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from edge_agent.bundles import sha256_file
from edge_agent.errors import BundleError, EdgeAgentError
from edge_agent.models.manager import ModelManager
from edge_agent.models.store import installed_as

Progress = Callable[..., None]


class DeployError(EdgeAgentError):
    code = "deploy_failed"


def resolve_source(source: str | Path) -> Path:
    """A local path for ``source``: a path or a ``file://`` URL."""
    if isinstance(source, Path):
        return source.expanduser()
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DeployError(f"{source}: a file:// URL must name a local path", code="unsupported_url")
        return Path(urllib.parse.unquote(parsed.path) if parsed.scheme else source).expanduser()
    raise DeployError(f"{source}: only local paths and file:// URLs can be deployed here", code="unsupported_url")


def deploy(
    manager: ModelManager,
    source: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    activate: bool = True,
    label: str | None = None,
    model: str | None = None,
    version: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Install, verify and (by default) activate a bundle. ``model``/``version``
    when given must match the bundle's manifest. Returns a result object."""
    say = progress or (lambda step, **info: None)
    t0 = time.monotonic()
    store = manager.store
    if not isinstance(source, Path):  # a path is already here (or was fetched by the caller)
        say("fetching", source=str(source))
    path = resolve_source(source)
    if not path.exists():
        raise BundleError(f"bundle {path}: not found", code="bundle_not_found")
    if path.is_file():
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise DeployError(f"bundle {path}: {actual} bytes, expected {size}", code="size_mismatch")
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise DeployError(f"bundle {path}: sha256 does not match the one given", code="checksum_mismatch")
    elif sha256 is not None or size is not None:
        raise DeployError(f"bundle {path}: sha256 and size apply to an archive, not a directory", code="bad_args")

    say("verifying")
    with store.open_incoming(path, trusted_keys=manager.trusted_keys) as bundle:
        m = bundle.manifest
        if model is not None and m.name != model:
            raise DeployError(f"the bundle holds model {m.name!r}, not {model!r}", code="name_mismatch")
        if version is not None and m.version != version:
            raise DeployError(f"the bundle holds {m.name} version {m.version}, not {version}", code="version_mismatch")
        with manager.transaction(m.name):  # unknown_model before anything is written
            say("installing", model=m.name, version=m.version)
            dest, installed = store.install(bundle)
    verified = installed_as(bundle, dest)  # no second sha256 of every file
    name, ver = m.name, m.version
    with manager.transaction(name):
        try:
            already_active = manager.active_version(name) == ver
            if not already_active:
                say("loading", model=name, version=ver)
                loaded = manager.verify_installed(name, ver, verified)
                if activate or label:
                    manager.adopt(loaded)
                else:
                    loaded.close()
            result: dict[str, Any] = {"model": name, "version": ver, "installed": installed}
            if activate and not already_active:
                say("activating", model=name, version=ver)
                result["activation"] = manager.activate(name, ver, reason="deploy", progress=say)
            if label is not None:
                say("labelling", model=name, version=ver, label=label)
                manager.set_label(name, label, ver)
                result["label"] = label
        except BaseException as exc:
            if installed:
                manager.reject_installed(name, ver, exc)
            manager.collect(name, "collected after a failed deploy")
            raise
    result["active"] = manager.active_version(name)
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def file_url(path: Path) -> str:
    return Path(os.path.abspath(path)).as_uri()
