"""A camera read through a program: ``rpicam-vid``, ``gst-launch-1.0``,
``ffmpeg`` ... whose stdout carries MJPEG (JPEG pictures one after another)
or raw frames of a configured size and pixel format.

The program runs in its own process group with stdin closed; its stderr
goes to the log line by line (rate limited, prefixed with the source's
name). When it exits, cannot be started, or writes no complete frame for
``stall_timeout_s``, its whole process group is terminated (killed after a
grace period) and reaped, and it is started again with back-off.
"""

from __future__ import annotations

import collections
import fcntl
import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from typing import IO

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError
from edge_agent.sources.base import FrameSource, log, redact

MAX_JPEG_BYTES = 32 * 1024 * 1024
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


class MjpegSplitter:
    """Cuts a byte stream of concatenated JPEG pictures into pictures.

    It walks each picture's marker segments by their lengths (so that an
    EXIF thumbnail's own markers are skipped), then looks for the end
    marker after the first start-of-scan: inside entropy-coded data a 0xFF
    byte is always stuffed, so ``FF D9`` there can only be the end. Bytes
    before a start marker are dropped and counted in ``discarded``; markers
    split across reads are handled by keeping the unread tail.

    ``feed`` raises SourceError when a picture grows beyond ``max_bytes``
    without its end marker (the buffer is emptied first, so the caller may
    go on).
    """

    _SEEK, _SEGMENTS, _SCAN = range(3)

    def __init__(self, max_bytes: int = MAX_JPEG_BYTES) -> None:
        self.max_bytes = max_bytes
        self.discarded = 0
        self._buf = bytearray()
        self._state = self._SEEK
        self._pos = 0  # SEGMENTS: the next marker; SCAN: where to go on looking for the end

    @property
    def pending(self) -> int:
        """Bytes held of a picture not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while True:
            if self._state == self._SEEK:
                start = buf.find(_SOI)
                if start < 0:
                    keep = 1 if buf[-1:] == b"\xff" else 0  # half a marker
                    self.discarded += len(buf) - keep
                    del buf[: len(buf) - keep]
                    break
                self.discarded += start
                del buf[:start]
                self._state, self._pos = self._SEGMENTS, 2
            if self._state == self._SEGMENTS:
                if not self._walk_segments(frames):
                    break
                continue
            end = buf.find(_EOI, self._pos)
            if end < 0:
                self._pos = max(self._pos, len(buf) - 1)
                break
            frames.append(bytes(buf[: end + 2]))
            del buf[: end + 2]
            self._state = self._SEEK
        if len(buf) > self.max_bytes:
            size = len(buf)
            buf.clear()
            self._state = self._SEEK
            raise SourceError(
                f"a JPEG picture grew beyond {self.max_bytes // (1024 * 1024)} MB ({size} bytes) without its end "
                'marker: is the program writing MJPEG? (for raw frames set format = "raw")'
            )
        return frames

    def _walk_segments(self, frames: list[bytes]) -> bool:
        """Step over marker segments; False when more data is needed."""
        buf, pos = self._buf, self._pos
        while True:
            if pos + 2 > len(buf):
                self._pos = pos
                return False
            if buf[pos] != 0xFF:  # not a JPEG after all: look for the next start
                self.discarded += 1
                del buf[:1]
                self._state = self._SEEK
                return True
            marker = buf[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
            elif marker == 0xD9:  # an end without a scan (nothing to decode, but a frame boundary)
                frames.append(bytes(buf[: pos + 2]))
                del buf[: pos + 2]
                self._state = self._SEEK
                return True
            elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
                if marker == 0xD8:  # a new picture started: the previous one was cut short
                    self.discarded += pos
                    del buf[:pos]
                    pos = 0
                pos += 2
            else:
                if pos + 4 > len(buf):
                    self._pos = pos
                    return False
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if length < 2:
                    self.discarded += 1
                    del buf[:1]
                    self._state = self._SEEK
                    return True
                pos += 2 + length
                if marker == 0xDA:  # start of scan: entropy-coded data follows
                    self._state, self._pos = self._SCAN, pos
                    return True


class _StderrLogger(threading.Thread):
    """Logs a program's stderr line by line: at most ``burst`` lines per
    ``window_s``, then one line saying how many were left out. Keeps the
    last line for the exit message."""

    def __init__(self, stream: IO[bytes], source: str, program: str, *, burst: int = 20, window_s: float = 10.0) -> None:
        super().__init__(name=f"stderr-{source}", daemon=True)
        self.stream = stream
        self.prefix = f"source {source}: {program}:"
        self.burst = burst
        self.window_s = window_s
        self.last_line: str | None = None

    def run(self) -> None:
        window_start, logged, dropped = time.monotonic(), 0, 0
        try:
            for raw in iter(self.stream.readline, b""):
                line = redact(raw.decode("utf-8", "replace").rstrip())  # ffmpeg repeats its input URL
                if not line:
                    continue
                self.last_line = line[:500]
                now = time.monotonic()
                if now - window_start >= self.window_s:
                    if dropped:
                        log.info("%s %d more stderr lines not logged", self.prefix, dropped)
                    window_start, logged, dropped = now, 0, 0
                if logged < self.burst:
                    logged += 1
                    log.info("%s %s", self.prefix, self.last_line)
                else:
                    dropped += 1
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the program is gone
        if dropped:
            log.info("%s %d more stderr lines not logged", self.prefix, dropped)


def _exit_status(pid: int) -> tuple[int, int] | None:
    """(si_code, si_status) once the child has exited, without reaping it
    (its pid, and so its process group id, cannot be reused meanwhile)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return (os.CLD_EXITED, -1)  # already reaped
    return None if info is None else (info.si_code, info.si_status)


def _describe_exit(code: int, status: int) -> str:
    if code in (os.CLD_KILLED, os.CLD_DUMPED):
        try:
            return f"was killed by {signal.Signals(status).name}"
        except ValueError:
            return f"was killed by signal {status}"
    return f"exited with status {status}"


def terminate_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the program's process group, SIGKILL to whatever is left
    after ``grace_s``, then reap the program. The group is signalled while
    the leader is not yet reaped, so its id cannot belong to anyone else."""
    pgid = proc.pid  # start_new_session: the program leads its own group
    if _exit_status(proc.pid) is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while _exit_status(proc.pid) is None and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        os.killpg(pgid, signal.SIGKILL)  # children that outlived the leader, or a leader ignoring SIGTERM
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class PipeSource(FrameSource):
    """Frames from a program's stdout (``cfg.command``, ``cfg.format``).

    ``mjpeg``: the JPEG pictures are cut from the stream as they come and
    decoded only for frames the consumer takes. ``raw``: exactly
    ``width * height * channels`` bytes per frame (``bgr24``, ``rgb24``,
    ``gray``), converted to BGR. ``pid`` is the running program's (None
    between runs).
    """

    live = True
    reopen_verb = "restarting it"
    stop_grace_s = 2.0
    poll_s = 0.25  # longest select() wait: how fast stop() and the stall check are seen
    pipe_bytes = 1024 * 1024  # stdout pipe buffer asked of the kernel (fewer, larger reads)

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        assert cfg.command, "a pipe source needs a command"
        self.argv = list(cfg.command)
        self.program = os.path.basename(self.argv[0])
        self.display_uri = shlex.join(redact(a) for a in self.argv)
        self.frame_bytes = cfg.frame_bytes
        self._proc: subprocess.Popen | None = None
        self._stderr: _StderrLogger | None = None
        self._selector: selectors.BaseSelector | None = None
        self._splitter: MjpegSplitter | None = None
        self._raw = bytearray()
        self._pending: collections.deque[bytes | bytearray] = collections.deque()
        self._bytes = 0  # bytes read from this run
        self._frames = 0  # frames cut from this run

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def _open(self) -> None:
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True, bufsize=0, env=_program_env(),
            )
        except FileNotFoundError:
            raise SourceError(f"cannot start {self.argv[0]!r}: no such program (is it installed, and on PATH?)") from None
        except PermissionError:
            raise SourceError(f"cannot start {self.argv[0]!r}: permission denied (is it executable?)") from None
        except OSError as exc:
            raise SourceError(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}") from None
        assert proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        try:
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, self.pipe_bytes)
        except (OSError, AttributeError):
            pass  # a smaller pipe only means more reads
        self._stderr = _StderrLogger(proc.stderr, self.name, self.program)
        self._stderr.start()
        self._selector = selectors.DefaultSelector()
        self._selector.register(proc.stdout, selectors.EVENT_READ)
        self._splitter = MjpegSplitter() if self.cfg.format == "mjpeg" else None
        self._raw = bytearray()
        self._pending.clear()
        self._bytes = self._frames = 0
        log.info("source %s: started %s (pid %d)", self.name, self.display_uri, proc.pid)

    def _grab(self) -> bytes | bytearray | None:
        if self._pending:
            return self._pending.popleft()
        proc, selector = self._proc, self._selector
        assert proc is not None and proc.stdout is not None and selector is not None
        fd = proc.stdout.fileno()
        stall = self.cfg.stall_timeout_s
        while not self._stop.is_set():
            left = self._last_frame_at + stall - time.monotonic()
            if left <= 0:
                raise SourceError(self._stall_message(stall))
            ready = selector.select(min(left, self.poll_s))
            self._touch()
            if not ready:
                continue
            data = os.read(fd, self.pipe_bytes)
            if not data:
                raise SourceError(self._exit_message())
            self._bytes += len(data)
            frames = self._cut(data)
            if frames:
                self._frames += len(frames)
                self._pending.extend(frames[1:])
                return frames[0]
        return None

    def _cut(self, data: bytes) -> list[bytes | bytearray]:
        if self._splitter is not None:
            if self._frames == 0 and self._bytes == len(data) and not data.startswith(_SOI):
                log.warning(
                    "source %s: %s's output does not start with a JPEG start marker (%s): is it MJPEG? "
                    '(for raw frames set format = "raw")', self.name, self.program, data[:8].hex(" "),
                )
            return list(self._splitter.feed(data))
        assert self.frame_bytes is not None
        if self._frames == 0 and self._bytes == len(data) and data.startswith(_SOI + b"\xff"):
            raise SourceError(
                f'{self.program} writes JPEG pictures, not raw frames: set format = "mjpeg" '
                "(and remove width, height, pixel_format)"
            )
        raw = self._raw
        raw += data
        frames: list[bytes | bytearray] = []
        size = self.frame_bytes
        while len(raw) >= size:
            frames.append(raw[:size])  # a bytearray: the picture made from it is writable
            del raw[:size]
        return frames

    def _geometry(self) -> str:
        return f"{self.cfg.width}x{self.cfg.height} {self.cfg.pixel_format}"

    def _stall_message(self, stall: float) -> str:
        message = f"no frame for {stall:.1f}s from {self.program} (pid {self.pid})"
        if self.frame_bytes is not None and self._raw:
            message += (
                f"; it wrote {len(self._raw)} bytes of a {self.frame_bytes}-byte frame: does the frame size "
                f"{self._geometry()} match the stream?"
            )
        elif self._splitter is not None and self._splitter.pending:
            message += f"; {self._splitter.pending} bytes of an unfinished JPEG picture"
        return message

    def _exit_message(self) -> str:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.stop_grace_s
        status = _exit_status(proc.pid)
        while status is None and time.monotonic() < deadline:
            time.sleep(0.01)
            status = _exit_status(proc.pid)
        how = "closed its output" if status is None else _describe_exit(*status)
        message = f"{self.program} {how} after {self._frames} frames"
        if self.frame_bytes is not None and self._bytes % self.frame_bytes:
            message += (
                f"; frame size {self._geometry()} does not match the stream (got {self._bytes} bytes, "
                f"not a multiple of {self.frame_bytes}, the size of one frame)"
            )
        elif self._splitter is not None and self._splitter.pending:
            message += f"; the stream ended inside a JPEG picture ({self._splitter.pending} bytes)"
        if self._stderr is not None:
            self._stderr.join(0.2)  # its last words are usually the reason
            if self._stderr.last_line:
                message += f": {self._stderr.last_line}"
        return message

    def _retrieve(self, grabbed: bytes | bytearray) -> np.ndarray | None:
        if self._splitter is not None:
            image = cv2.imdecode(np.frombuffer(grabbed, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                self._decode_error(f"a frame is not a decodable JPEG picture ({len(grabbed)} bytes)")
            return image
        cfg = self.cfg
        assert cfg.width is not None and cfg.height is not None
        if cfg.pixel_format == "gray":
            return cv2.cvtColor(np.frombuffer(grabbed, np.uint8).reshape(cfg.height, cfg.width), cv2.COLOR_GRAY2BGR)
        image = np.frombuffer(grabbed, np.uint8).reshape(cfg.height, cfg.width, 3)
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if cfg.pixel_format == "rgb24" else image

    def _decode_error(self, message: str) -> None:
        self._error(message)
        if self.errors <= 5 or self.errors % 100 == 0:
            log.warning("source %s: %s (%d errors so far)", self.name, message, self.errors)

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        terminate_group(proc, self.stop_grace_s)
        streams = [proc.stdout]
        if self._stderr is not None:
            self._stderr.join(1.0)  # ends at EOF: the group is gone, unless a daemon it left keeps stderr
            if not self._stderr.is_alive():  # closing it under a blocked readline() would block here
                streams.append(proc.stderr)
            self._stderr = None
        for stream in streams:
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._pending.clear()


_SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _program_env() -> dict[str, str]:
    """The agent's environment, less what systemd meant for the agent alone:
    a camera program must not speak the notify protocol in its name."""
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ONLY}
