"""``scripts/setup.sh dev`` against stand-ins for apt, dpkg and systemctl: what
it installs and what it leaves running (the real packages are not touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGGER = '#!/bin/sh\necho "$(basename "$0") $*" >> "$STUB_LOG"\n'


def _checkout(tmp: Path, *, promtool: bool, systemd: bool, prometheus_installed: bool = False) -> tuple[Path, dict]:
    """A copy of setup.sh in a checkout whose venv is already set up, and an
    environment whose PATH holds only stubs and the few real tools it needs."""
    repo = tmp / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    for name in ("setup_onnx2tf.sh", "setup_tfserving_client.sh"):
        (repo / "scripts" / name).write_text("#!/bin/sh\nexit 0\n")
        (repo / "scripts" / name).chmod(0o755)
    (repo / "pyproject.toml").write_text("")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "edge-agent").write_text("#!/bin/sh\necho edge-agent 0\n")
    for f in (venv / "python", venv / "edge-agent"):
        f.chmod(0o755)
    stamp = repo / ".venv" / ".edge-agent-setup-dev"
    stamp.touch()
    os.utime(stamp, (time.time() + 60, time.time() + 60))  # newer than pyproject.toml: no pip run
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id", "basename"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stubs = {"apt-get": LOGGER, "systemctl": LOGGER, "invoke-rc.d": LOGGER, "update-rc.d": LOGGER,
             "sudo": '#!/bin/sh\nexec "$@"\n', "python3": "#!/bin/sh\nexit 0\n",
             "dpkg": LOGGER + ('exit 0\n' if prometheus_installed else 'exit 1\n')}
    if promtool:
        stubs["promtool"] = "#!/bin/sh\nexit 0\n"
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp / "run-systemd-system"
    if systemd:
        run_dir.mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp), "STUB_LOG": str(tmp / "calls.log"),
           "SYSTEMD_RUN_DIR": str(run_dir), "PYTHON": "python3"}
    return repo, env


def _setup(repo: Path, env: dict) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    done = subprocess.run([shutil.which("bash"), str(repo / "scripts" / "setup.sh"), "dev"], env=env,
                          capture_output=True, text=True, timeout=60)
    log = Path(env["STUB_LOG"])
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return done, calls


def test_promtool_comes_without_a_prometheus_server_left_running(tmp_path: Path) -> None:
    """The dev setup wants Debian's promtool, which comes only with the
    prometheus package, and that package starts and enables a Prometheus
    server on port 9090 under systemd: a developer's machine must not be left
    with a server (and an open port) they never asked for. A second run finds
    promtool and does nothing."""
    repo, env = _checkout(tmp_path, promtool=False, systemd=True)
    done, calls = _setup(repo, env)
    assert done.returncode == 0, done.stderr
    install = [c for c in calls if c.startswith("apt-get install")]
    assert install and "prometheus" in install[0].split()
    assert "systemctl disable --now --quiet prometheus.service" in calls
    assert "Prometheus server is stopped and disabled" in done.stdout

    (Path(env["PATH"]) / "promtool").write_text("#!/bin/sh\nexit 0\n")
    (Path(env["PATH"]) / "promtool").chmod(0o755)
    done, calls = _setup(repo, env)
    assert done.returncode == 0, done.stderr
    assert not any(c.startswith("systemctl") for c in calls)
    assert not any("prometheus" in c for c in calls if c.startswith("apt-get install"))


@pytest.mark.parametrize("systemd", [True, False])
def test_a_prometheus_installed_before_is_left_alone(tmp_path: Path, systemd: bool) -> None:
    """A user who runs Prometheus on purpose (the package installed before,
    promtool somehow gone) keeps their server: setup only stops the one it
    started itself."""
    repo, env = _checkout(tmp_path, promtool=False, systemd=systemd, prometheus_installed=True)
    done, calls = _setup(repo, env)
    assert done.returncode == 0, done.stderr
    assert not any(c.split()[0] in ("systemctl", "invoke-rc.d", "update-rc.d") for c in calls), calls
