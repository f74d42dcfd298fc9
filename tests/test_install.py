"""scripts/install.sh: usage, and the failures that must say what to do.

The full install, upgrade, failed upgrade (no package index), uninstall and
purge run for real inside an emulated Debian bookworm arm64 system:
scripts/arm64_check.sh (tests/test_arm64.py). Here, on this machine, only
what changes nothing on it: bad usage, not root, no Python >= 3.10, 32-bit
ARM, not enough disk space (a tiny tmpfs as TMPDIR).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"
IS_ROOT = os.geteuid() == 0


def run(args: list[str], *, env: dict[str, str] | None = None, script: Path = INSTALL,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(script), *args]
    if user == "nobody" and IS_ROOT:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=env if env is not None else dict(os.environ))


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of what install.sh reads from its checkout, readable by everyone
    (pytest's tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="edge-agent-install-"))
    try:
        for rel in ("scripts/install.sh", "pyproject.toml", "systemd/edge-agent.service", "configs/agent.example.toml"):
            (top / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, top / rel)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def fake_bin(tmp: Path, **scripts: str) -> dict[str, str]:
    """An environment whose PATH holds only the tools install.sh needs up to
    its checks, plus fake ones (name -> shell body)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "flock", "mkdir", "uname", "cat", "stat", "tr", "df", "awk",
                 "basename", "readlink", "python3", "date", "head"):
        if tool not in scripts and shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp), "LANG": "C.UTF-8"}


def test_syntax() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    assert INSTALL.stat().st_mode & 0o111, "install.sh must be executable"


def test_help_exits_0() -> None:
    proc = run(["--help"])
    assert proc.returncode == 0
    assert "--uninstall" in proc.stdout and "--purge" in proc.stdout and "--no-start" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown argument: --bogus"),
    (["--purge"], "--purge goes with --uninstall"),
    (["--uninstall", "--wheel", __file__], "--uninstall takes only --purge"),
    (["--wheel"], "--wheel needs a value"),
    (["--wheel", "/no/such/edge_agent-1.0-py3-none-any.whl"], "--wheel: no such wheel file"),
    (["--extras", "tflite;rm -rf /"], "--extras: a comma-separated list"),
])
def test_bad_usage_exits_2(checkout: Path, args: list[str], message: str) -> None:
    # Checked before anything else, root or not: nothing is touched. (The
    # readable copy: a clone in a private folder is not readable by nobody.)
    proc = run(args, script=checkout / "scripts" / "install.sh", user="nobody")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "usage: sudo" in proc.stderr


@pytest.mark.parametrize("args", [[], ["--uninstall"], ["--uninstall", "--purge"]])
def test_not_root_says_run_with_sudo(checkout: Path, args: list[str]) -> None:
    proc = run(args, script=checkout / "scripts" / "install.sh", user="nobody")
    if IS_ROOT:
        assert proc.returncode == 1, proc.stderr
        assert "must run as root: run with sudo" in proc.stderr
    else:  # the suite itself runs unprivileged
        assert proc.returncode == 1 and "run with sudo" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(not IS_ROOT, reason="needs root: install.sh checks for root before Python")
def test_no_python_310_says_which_package(checkout: Path, tmp_path: Path) -> None:
    env = fake_bin(tmp_path, python3='[ "$1" = --version ] && echo "Python 3.9.2" || exit 1')
    proc = run([], script=checkout / "scripts" / "install.sh", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Python >= 3.10 is needed (Python 3.9.2 found)" in proc.stderr
    assert "apt-get install python3 python3-venv" in proc.stderr
    assert "python3.10-venv" in proc.stderr  # Ubuntu 20.04 / JetPack 5


@pytest.mark.skipif(not IS_ROOT, reason="needs root: install.sh checks for root first")
def test_32_bit_arm_is_refused_with_the_reason(checkout: Path, tmp_path: Path) -> None:
    env = fake_bin(tmp_path, uname="echo armv7l")
    proc = run([], script=checkout / "scripts" / "install.sh", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "32-bit ARM (armv7l) is not supported: onnxruntime publishes no wheel for it" in proc.stderr
    assert "64-bit" in proc.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root (mounts a small tmpfs)")
def test_not_enough_space_says_how_much(checkout: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        env = dict(os.environ, TMPDIR=str(small))
        proc = run([], script=checkout / "scripts" / "install.sh", env=env)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"not enough disk space: pip needs 250 MB in {small} while it installs" in proc.stderr
    assert "TMPDIR" in proc.stderr


def test_missing_checkout_files_are_named(tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root: install.sh checks for root first")
    lone = tmp_path / "scripts"
    lone.mkdir()
    shutil.copy(INSTALL, lone / "install.sh")
    proc = run([], script=lone / "install.sh")
    assert proc.returncode == 1
    assert "pyproject.toml is missing: run this script from an edge-agent checkout" in proc.stderr
