"""One conversion worker process (:mod:`quantize.tflite.worker`) running in
the converter environment, and the JSON-lines conversation with it.

The worker runs as ``<env>/bin/python -P quantize/tflite/worker.py`` (the file
itself, by path: the converter environment has nothing of edge-agent
installed) in a temporary folder of its own, :attr:`WorkerProcess.workdir`,
which is also where the caller puts files for it. Its stderr (everything the
converter libraries print) goes to a log file there; when a request fails,
times out or the worker dies, the :class:`~quantize.errors.QuantizeError`
carries the tail of that log.

Thread-safety: one thread talks to a :class:`WorkerProcess` (a reader thread
of its own only moves the worker's stdout lines into a queue).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from quantize.errors import QuantizeError
from quantize.tflite.env import SETUP_SCRIPT, find_converter_env

#: The worker script, run by path in the converter environment.
WORKER = Path(__file__).resolve().with_name("worker.py")

_LOG_TAIL_LINES = 25
# Lines of the worker's log that say nothing about a failure.
_LOG_NOISE = ("WARNING: All log messages", "W0000", "I0000", "UserWarning", "warnings.warn")

Progress = Callable[[str], None]


def worker_command(python: Path | str) -> list[str]:
    """The command that starts the worker with ``python``. ``-P``: the
    worker's own folder is not put on ``sys.path``, so no module of this
    package can shadow a library of the converter's."""
    return [str(python), "-P", str(WORKER)]


def worker_environment() -> dict[str, str]:
    """The worker's environment variables: this process's, less anything that
    would make the converter's python import the agent's packages, plus
    quiet, CPU-only TensorFlow with the Keras 2 that onnx2tf uses."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_USE_LEGACY_KERAS="1",
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="-1",
    )
    return env


class WorkerProcess:
    """A worker in the converter environment ``env`` (see
    :func:`~quantize.tflite.env.find_converter_env`), started by the first
    :meth:`start` or :meth:`request`. ``progress`` gets the worker's progress
    lines; every request may take ``timeout_s``. :meth:`close` stops it and
    removes its folder; safe to call twice.
    """

    def __init__(self, env: Path | str | None = None, *, progress: Progress | None = None, timeout_s: float = 1800.0) -> None:
        self.env = env
        self.progress = progress
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log_path: Path | None = None
        self._log_file: Any = None

    @property
    def workdir(self) -> Path:
        """The worker's temporary folder (its working folder)."""
        if self._tmp is None:
            raise QuantizeError("the TFLite converter is not started")
        return Path(self._tmp.name)

    def start(self) -> None:
        """Start the worker unless it runs. Raises :class:`QuantizeError` when
        the converter environment is missing or its python does not start."""
        if self._proc is not None:
            return
        env_dir = find_converter_env(self.env)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-tflite-")
        tmp = Path(self._tmp.name)
        if self._log_file is not None:  # a worker that died before
            self._log_file.close()
        self._log_path = tmp / "worker.log"
        self._log_file = open(self._log_path, "w")
        self._lines = queue.Queue()
        try:
            self._proc = subprocess.Popen(
                worker_command(env_dir / "bin" / "python"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                text=True,
                bufsize=1,
                env=worker_environment(),
                cwd=tmp,
            )
        except OSError as exc:
            raise QuantizeError(f"cannot start the converter ({env_dir}/bin/python): {exc}; re-create it with {SETUP_SCRIPT} --force") from None
        reader = threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True)
        reader.start()

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def log_tail(self) -> str:
        """The last lines of the worker's log, without the noise."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        self._log_file.flush()
        lines = [ln.rstrip() for ln in self._log_path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln.strip() and not any(n in ln for n in _LOG_NOISE)]
        return "\n".join(deque(lines, maxlen=_LOG_TAIL_LINES))

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (passing progress lines
        on). A refusal or failure of the worker, a timeout (the worker is
        killed) or its death raises :class:`QuantizeError` with the worker's
        reason or the tail of its log."""
        self.start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(cmd) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise QuantizeError(
                    f"the TFLite converter timed out after {self.timeout_s:.0f} s ({cmd}); last output:\n{self.log_tail()}",
                    code="converter_timeout",
                )
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise self._died(cmd)
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in msg:
                if self.progress:
                    self.progress(str(msg["progress"]))
                continue
            if not msg.get("ok"):
                error = msg.get("error", "unknown error")
                code = msg.get("code") or "conversion_failed"
                tail = self.log_tail()
                raise QuantizeError(f"TFLite conversion failed ({cmd}): {error}" + (f"\nconverter output:\n{tail}" if tail else ""), code=code)
            return msg

    def _died(self, cmd: str) -> QuantizeError:
        rc = self._proc.wait(timeout=10) if self._proc is not None else None
        self._proc = None
        return QuantizeError(
            f"the TFLite converter exited (code {rc}) during {cmd}; last output:\n{self.log_tail()}",
            code="conversion_failed",
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=10)
            self._proc = None

    def close(self) -> None:
        """Stop the worker and remove its temporary folder; safe to call twice."""
        if self._proc is not None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except Exception:
                self._kill()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
