"""The pipe source (a camera read through a program: rpicam-vid, gst-launch-1.0,
ffmpeg), stall restarts of live sources, decoding only the frames that are
inferred, and the signs of life a watchdog reads.

The programs are Debian's real ``ffmpeg`` and ``gst-launch-1.0`` reading the
demo video (its first 30 frames show a cat); a test is skipped, with the
reason, where one of them is not installed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import cv2
import numpy as np
import psutil
import pytest

from conftest import CAT_CLASSES
from edge_agent.config import SourceConfig, parse_config
from edge_agent.errors import ConfigError, SourceError
from edge_agent.pipeline.worker import SourceWorker
from edge_agent.sources import FrameSource, MjpegSplitter, PipeSource, VideoSource, open_source
from edge_agent.testing import RecordingSink, StaticModels
from waiting import let_time_pass, wait_until

FFMPEG = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error"]


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (scripts/setup.sh dev installs it with apt)")


@pytest.fixture(scope="module")
def demo(assets: dict[str, Path]) -> Path:
    """The demo video: 300 MJPEG frames, 640x480, 30 fps; frames 0-29 show a cat."""
    return assets["demo_video"]


def pipe_cfg(command: list[str], **kw: Any) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "cam"), command=command, model=kw.pop("model", "mobilenet_v2"), **kw)


@contextmanager
def running(source: FrameSource) -> Iterator[FrameSource]:
    source.start()
    try:
        yield source
    finally:
        source.stop()
        assert not source.capture_alive, "stop() must end the capture thread"


def frames_from(source: FrameSource, count: int, timeout: float = 10.0) -> list[Any]:
    frames = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        assert time.monotonic() < deadline, f"got {len(frames)} of {count} frames in {timeout}s ({source.last_error})"
        frame = source.next_frame(timeout=0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def demo_frame(demo: Path, index: int = 0) -> np.ndarray:
    cap = cv2.VideoCapture(str(demo))
    try:
        for _ in range(index + 1):
            ok, image = cap.read()
            assert ok
        return image
    finally:
        cap.release()


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_BEFORE = {p.pid for p in psutil.Process().children(recursive=True)}


def no_children_left() -> list[str]:
    """Children of this process that a pipe source started and left behind
    (running or zombie). Helpers that other tests of the same session keep
    running on purpose, such as the session's mosquitto, are not counted."""
    return [f"{p.pid} {p.name()} {p.status()}" for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.pid not in _BEFORE and p.name() not in ("mosquitto",)]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "source, problem",
    [
        ({}, "sources[0] (cam).uri: required key is missing (or give `command`"),
        ({"uri": "0", "command": ["ffmpeg"]}, "sources[0] (cam).uri: give either `uri` or `command`, not both"),
        ({"command": "rpicam-vid -o -"}, "sources[0] (cam).command: must be a list of arguments"),
        ({"command": []}, "sources[0] (cam).command: List should have at least 1 item"),
        ({"command": ["x"], "format": "raw", "width": 640, "height": 480},
         'sources[0] (cam).pixel_format: required with format = "raw"'),
        ({"command": ["x"], "format": "raw", "height": 480, "pixel_format": "bgr24"},
         'sources[0] (cam).width: required with format = "raw"'),
        ({"command": ["x"], "format": "raw", "width": 4, "height": 4, "pixel_format": "yuv420p"},
         "sources[0] (cam).pixel_format: Input should be 'bgr24', 'rgb24' or 'gray'"),
        ({"command": ["x"], "format": "h264"}, "sources[0] (cam).format: Input should be 'mjpeg' or 'raw'"),
        ({"command": ["x"], "width": 640}, 'sources[0] (cam).width: only used with `command` and format = "raw"'),
        ({"uri": "0", "format": "mjpeg"}, "sources[0] (cam): format: only used with `command`"),
        ({"uri": "0", "stall_timeout_s": 0}, "sources[0] (cam).stall_timeout_s: Input should be greater than 0"),
    ],
)
def test_config_errors_name_the_key(source: dict[str, Any], problem: str) -> None:
    """A pipe source's mistakes are reported like every other config problem: the key and what is wrong."""
    data = {"models": [{"name": "m"}], "sources": [{"name": "cam", "model": "m", **source}]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="agent.toml")
    assert any(p.startswith(f"agent.toml: {problem}") for p in info.value.problems), info.value.problems


def test_config_accepts_a_command_and_raw_geometry() -> None:
    """The contract's pipe keys: command (argv), format with its geometry, stall_timeout_s (default 10 s)."""
    cfg = parse_config({"models": [{"name": "m"}], "sources": [
        {"name": "csi", "model": "m", "command": ["rpicam-vid", "-t", "0", "--codec", "mjpeg", "-o", "-"]},
        {"name": "raw", "model": "m", "command": ["x"], "format": "raw", "width": 4, "height": 2,
         "pixel_format": "gray", "stall_timeout_s": 2.5},
    ]})
    csi, raw = cfg.sources
    assert csi.uri is None and csi.format == "mjpeg" and csi.stall_timeout_s == 10 and csi.frame_bytes is None
    assert raw.frame_bytes == 8 and raw.stall_timeout_s == 2.5
    assert isinstance(open_source(csi), PipeSource)


# -------------------------------------------------------------- MJPEG cutting


def jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def with_thumbnail(picture: bytes, thumbnail: bytes) -> bytes:
    """An EXIF-like APP1 segment holding a whole JPEG (its own start and end markers)."""
    payload = b"Exif\x00\x00" + thumbnail
    return picture[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + picture[2:]


def test_mjpeg_splitter_cuts_pictures_at_any_read_boundary() -> None:
    """Pipes hand over bytes in arbitrary pieces: a marker split between two reads, an embedded
    thumbnail's end marker and leading garbage must not cut or lose a picture."""
    rng = np.random.default_rng(0)
    pictures = [jpeg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    pictures[1] = with_thumbnail(pictures[1], jpeg(np.full((8, 8, 3), 200, np.uint8)))
    stream = b"noise before the first picture" + b"".join(pictures)
    for chunk in (1, 2, 3, 7, 64, 1000, len(stream)):
        splitter = MjpegSplitter()
        out: list[bytes] = []
        for i in range(0, len(stream), chunk):
            out += splitter.feed(stream[i:i + chunk])
        assert out == pictures, chunk
        assert splitter.discarded == len(b"noise before the first picture") and splitter.pending == 0
    assert cv2.imdecode(np.frombuffer(pictures[1], np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)


def test_mjpeg_splitter_bounds_a_picture_without_end() -> None:
    """A stream that is not MJPEG must not grow the buffer without bound: a clear error, then it goes on."""
    splitter = MjpegSplitter(max_bytes=10_000)
    picture = jpeg(np.zeros((16, 16, 3), np.uint8))
    header = picture[: picture.index(b"\xff\xda") + 14]  # up to the scan's data
    with pytest.raises(SourceError, match=r"without its end marker: is the program writing MJPEG"):
        splitter.feed(header + bytes(20_000))
    assert splitter.pending == 0
    assert splitter.feed(picture) == [picture]


# ------------------------------------------------------------- real programs


def test_ffmpeg_mjpeg_frames_are_the_videos(demo: Path) -> None:
    """ffmpeg's MJPEG on stdout arrives as the video's own pictures, in order, at the video's size."""
    need("ffmpeg")
    # one frame a run (restarts repeat it), so the frame taken is the video's first however late it is taken
    source = PipeSource(pipe_cfg([*FFMPEG, "-i", str(demo), "-frames:v", "1", "-f", "mjpeg", "-q:v", "2", "-"]))
    with running(source):
        first = frames_from(source, 1)[0]
    assert first.image.shape == (480, 640, 3) and first.image.dtype == np.uint8
    assert np.abs(first.image.astype(int) - demo_frame(demo)).mean() < 4  # JPEG re-encoding noise only


def test_ffmpeg_raw_bgr24_frames(demo: Path) -> None:
    """Raw frames of the configured size and pixel format are the video's pixels (bgr24 as is, rgb24 swapped, gray)."""
    need("ffmpeg")
    expected = demo_frame(demo)
    for pix_fmt, check in (
        ("bgr24", lambda img: np.abs(img.astype(int) - expected).mean() < 1.5),
        ("rgb24", lambda img: np.abs(img.astype(int) - expected).mean() < 1.5),
        ("gray", lambda img: np.abs(img[..., 0].astype(int) - cv2.cvtColor(expected, cv2.COLOR_BGR2GRAY)).mean() < 2),
    ):
        cfg = pipe_cfg([*FFMPEG, "-i", str(demo), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"],
                       format="raw", width=640, height=480, pixel_format=pix_fmt)
        with running(PipeSource(cfg)) as source:
            image = frames_from(source, 1)[0].image
        assert image.shape == (480, 640, 3) and image.flags.writeable, pix_fmt
        assert check(image), pix_fmt


def test_gst_launch_mjpeg_and_raw(demo: Path) -> None:
    """gst-launch-1.0 pipelines ending in fdsink, as the Pi (libcamerasrc) and Jetson
    (nvarguscamerasrc) presets do: JPEG pictures and raw BGR both arrive as the video's frames."""
    need("gst-launch-1.0")
    head = ["gst-launch-1.0", "-q", "filesrc", f"location={demo}", "!", "avidemux", "!", "jpegdec", "!",
            "identity", "eos-after=2", "!", "videoconvert", "!"]  # one frame a run (the Nth buffer is the EOS)
    expected = demo_frame(demo)
    mjpeg = PipeSource(pipe_cfg([*head, "jpegenc", "quality=90", "!", "fdsink"]))
    raw = PipeSource(pipe_cfg([*head, "video/x-raw,format=BGR", "!", "fdsink"], name="raw", format="raw",
                              width=640, height=480, pixel_format="bgr24"))
    for source in (mjpeg, raw):
        with running(source):
            image = frames_from(source, 1)[0].image
        assert image.shape == (480, 640, 3)
        assert np.abs(image.astype(int) - expected).mean() < 4, source.name


def test_program_that_exits_is_restarted_and_frames_resume(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A camera program that dies (here: ffmpeg ends after 3 frames, then is killed by a signal) is
    started again with back-off, says why in the log, and frames resume with indices that keep counting."""
    need("ffmpeg")
    caplog.set_level(logging.INFO, "edge_agent.sources")
    source = PipeSource(pipe_cfg([*FFMPEG, "-re", "-i", str(demo), "-frames:v", "3", "-f", "mjpeg", "-"]))
    with running(source):
        frames = frames_from(source, 5)
        assert source.opens >= 2
        assert [f.index for f in frames] == sorted({f.index for f in frames})
        assert "cam: ffmpeg exited with status 0 after 3 frames; restarting it in 0.5s" in caplog.text
        # killed from outside: the next run is started, with a new pid
        wait_until(lambda: source.pid is not None and source.state == "open", 5, "ffmpeg runs again")
        pid = source.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "was killed by SIGKILL" in caplog.text, 5, "the kill is reported")
        wait_until(lambda: source.pid not in (None, pid), 5, "ffmpeg is started again")
        assert not alive(pid)
        frames_from(source, 1)
    assert source.errors >= 2 and source.stats()["captured"] >= 6
    assert no_children_left() == []


def test_missing_program_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    """A command that does not exist is a clear error, retried with growing delays; the thread keeps running."""
    caplog.set_level(logging.INFO, "edge_agent.sources")
    source = PipeSource(pipe_cfg(["rpicam-vid-not-installed", "-o", "-"]))
    assert source.state == "starting" and not source.capture_alive
    with running(source):
        wait_until(lambda: source.errors >= 2, 5, "two attempts")
        assert source.state == "retrying" and source.capture_alive and source.opens == 0
    text = caplog.text
    assert ("cam: cannot start 'rpicam-vid-not-installed': no such program (is it installed, and on PATH?); "
            "retrying in 0.5s") in text
    assert "retrying in 1.0s" in text
    assert source.state == "stopped"


def test_program_that_exits_at_once_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    """`false` starts but exits before any frame: its status is logged and the delays grow (it never delivered)."""
    caplog.set_level(logging.INFO, "edge_agent.sources")
    program = shutil.which("false") or "false"
    with running(PipeSource(pipe_cfg([program]))) as source:
        wait_until(lambda: source.opens >= 2 and source.errors >= 2, 5, "two runs")
    assert "cam: false exited with status 1 after 0 frames; restarting it in 0.5s" in caplog.text
    assert "restarting it in 1.0s" in caplog.text
    assert source.stats()["captured"] == 0 and no_children_left() == []


def test_stderr_goes_to_the_log_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """The program's complaints reach the journal, prefixed with the source, without flooding it;
    its last line explains the exit; a password in it is masked."""
    caplog.set_level(logging.INFO, "edge_agent.sources")
    script = ("import sys\nfor i in range(100): print(f'line {i}', file=sys.stderr)\n"
              "print('rtsp://admin:secret@cam/1: camera not found', file=sys.stderr)\nsys.exit(3)")
    with running(PipeSource(pipe_cfg([sys.executable, "-c", script]))) as source:
        wait_until(lambda: source.errors >= 1, 5, "the program exits")
    name = Path(sys.executable).name
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"source cam: {name}: ")]
    assert lines[:2] == [f"source cam: {name}: line 0", f"source cam: {name}: line 1"]
    assert len(lines) <= 25 and any("stderr lines not logged" in line for line in lines), lines
    assert f"cam: {name} exited with status 3 after 0 frames: rtsp://***@cam/1: camera not found" in caplog.text
    assert "secret" not in caplog.text, "credentials a program prints are masked like a uri's"


def test_raw_frame_size_that_does_not_match_the_stream(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A wrong width/height shows where it can be seen: the stream ends inside a frame. And an MJPEG
    stream configured as raw is named for what it is."""
    need("ffmpeg")
    caplog.set_level(logging.INFO, "edge_agent.sources")
    cfg = pipe_cfg([*FFMPEG, "-i", str(demo), "-frames:v", "3", "-f", "rawvideo", "-pix_fmt", "bgr24", "-"],
                   format="raw", width=600, height=480, pixel_format="bgr24")
    with running(PipeSource(cfg)) as source:
        wait_until(lambda: source.errors >= 1, 5, "the stream ends")
    assert ("frame size 600x480 bgr24 does not match the stream (got 2764800 bytes, not a multiple of 864000"
            in (source.last_error or "")), source.last_error
    assert "frame size 600x480 bgr24 does not match the stream" in caplog.text

    cfg = pipe_cfg([*FFMPEG, "-i", str(demo), "-frames:v", "3", "-f", "mjpeg", "-"],
                   format="raw", width=640, height=480, pixel_format="bgr24")
    with running(PipeSource(cfg)) as source:
        wait_until(lambda: source.errors >= 1, 5, "the stream is refused")
    assert 'ffmpeg writes JPEG pictures, not raw frames: set format = "mjpeg"' in (source.last_error or "")
    assert source.stats()["captured"] == 0


def test_undecodable_jpeg_is_counted_and_skipped() -> None:
    """A picture that is cut like a JPEG but does not decode is an error for that frame only."""
    good = jpeg(np.full((24, 32, 3), 128, np.uint8)).hex()
    bad = (b"\xff\xd8\xff\xda\x00\x02" + b"garbage" + b"\xff\xd9").hex()
    script = f"import sys,time\nsys.stdout.buffer.write(bytes.fromhex('{bad}{good}'))\nsys.stdout.flush()\ntime.sleep(30)"
    with running(PipeSource(pipe_cfg([sys.executable, "-c", script]))) as source:
        frame = frames_from(source, 1)[0]
        assert frame.image.shape == (24, 32, 3) and frame.index == 0  # a picture that failed is not a frame
        assert source.errors == 1 and "not a decodable JPEG picture" in (source.last_error or "")


def test_silent_program_is_killed_and_restarted_after_stall_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A program that writes nothing (a hung camera) is killed after stall_timeout_s and started again;
    its process is reaped, not left as a zombie."""
    caplog.set_level(logging.INFO, "edge_agent.sources")
    with running(PipeSource(pipe_cfg(["sleep", "1000"], stall_timeout_s=0.5))) as source:
        wait_until(lambda: source.pid is not None, 5, "sleep runs")
        first = source.pid
        started = time.monotonic()
        wait_until(lambda: source.pid not in (None, first), 5, "a second run")
        assert time.monotonic() - started >= 0.4
        assert not alive(first) and not psutil.pid_exists(first), "the stalled program is killed and reaped"
        assert source.state in ("open", "retrying")
    assert "cam: no frame for 0.5s from sleep (pid " in caplog.text
    assert "; restarting it in 0.5s" in caplog.text
    assert no_children_left() == []


def test_program_that_sends_frames_then_hangs(demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frames, then silence: the whole process group is killed (the shell and the child it
    started), the program restarted, and frames come again."""
    need("ffmpeg")
    caplog.set_level(logging.INFO, "edge_agent.sources")
    pidfile = tmp_path / "child.pid"
    ff = " ".join([*FFMPEG, "-i", str(demo), "-frames:v", "4", "-f", "mjpeg", "-"])
    script = f"{ff}; sleep 1000 & echo $! > {pidfile}; wait"
    with running(PipeSource(pipe_cfg(["sh", "-c", script], stall_timeout_s=0.7))) as source:
        frames_from(source, 1)
        wait_until(pidfile.exists, 5, "the shell hangs in sleep")
        sleeper = int(pidfile.read_text())
        wait_until(lambda: source.opens >= 2, 5, "a restart after the stall")
        wait_until(lambda: not alive(sleeper), 5, "the hanging child is killed with its group")
        frames_from(source, 1)
    assert "cam: no frame for 0.7s from sh (pid " in caplog.text
    assert source.stats()["captured"] >= 5
    assert no_children_left() == []


def test_stop_terminates_the_program_group() -> None:
    """stop() while the program runs: the process group is gone and reaped afterwards."""
    source = PipeSource(pipe_cfg(["sh", "-c", "sleep 1000 & sleep 1000"]))
    with running(source):
        wait_until(lambda: source.pid is not None, 5, "the program runs")
        pid = source.pid
        wait_until(lambda: len(psutil.Process(pid).children()) == 2, 5, "the children run")
        children = psutil.Process(pid).children()
    assert source.pid is None and source.state == "stopped"
    assert not psutil.pid_exists(pid)
    for child in children:
        assert not alive(child.pid)
    assert no_children_left() == []


# ---------------------------------------------------------------- watchdog


def test_watchdog_fields_while_backing_off() -> None:
    """The watchdog's view: state and capture_alive follow the source, last_progress stays fresh
    (at most a second old) while the thread waits in back-off, blocked_in names a call in progress."""
    source = PipeSource(pipe_cfg(["no-such-camera-program"]))
    source._backoff.initial = source._backoff._next = 2.0  # a back-off longer than the refresh step
    assert (source.state, source.capture_alive, source.blocked_in) == ("starting", False, None)
    with running(source):
        wait_until(lambda: source.state == "retrying", 5, "the first attempt failed")
        ages = []
        for _ in range(15):
            ages.append(time.monotonic() - source.last_progress)
            let_time_pass(0.1, "the watchdog's view, sampled ten times a second")
        assert max(ages) <= 1.5, ages  # refreshed each second (plus scheduling slack) within a 2 s back-off
        assert source.capture_alive and source.blocked_in is None
    assert (source.state, source.capture_alive) == ("stopped", False)


def test_watchdog_sees_a_read_in_progress_and_file_states(demo: Path, tmp_path: Path) -> None:
    """blocked_in is "read" while the thread waits for the program; files end as "ended", a
    file that cannot be opened as "failed"."""
    with running(PipeSource(pipe_cfg(["sleep", "1000"]))) as source:
        wait_until(lambda: source.blocked_in == "read" and source.state == "open", 5, "the thread waits in a read")
        assert time.monotonic() - source.last_progress < 1.0  # the pipe is polled, not blocked on
    ended = open_source(SourceConfig(name="f", uri=str(demo), model="m", realtime=False))
    with running(ended):
        while ended.next_frame(timeout=5) is not None:
            pass
    assert ended.state == "ended"
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video" * 10)
    failed = open_source(SourceConfig(name="b", uri=str(bad), model="m", realtime=False))
    with running(failed):
        wait_until(lambda: failed.finished, 5, "the file fails")
    assert failed.state == "failed" and failed.failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stalled_network_stream_is_reopened(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stream that stops sending (the server hangs, here SIGSTOP) must not block its read for ever:
    OpenCV's read time-out comes from stall_timeout_s, the source reopens and says why."""
    need("ffmpeg")
    caplog.set_level(logging.INFO, "edge_agent.sources")
    port = free_port()
    server = subprocess.Popen([*FFMPEG, "-re", "-stream_loop", "-1", "-i", str(demo), "-c:v", "copy", "-f", "nut",
                               f"tcp://127.0.0.1:{port}?listen=1"], stdin=subprocess.DEVNULL)
    try:
        source = open_source(SourceConfig(name="door", uri=f"tcp://127.0.0.1:{port}", model="m", stall_timeout_s=1.5))
        assert isinstance(source, VideoSource) and source.is_stream
        wait_until(lambda: server.poll() is None and _listening(port), 5, "the server listens")
        with running(source):
            frames_from(source, 3)
            server.send_signal(signal.SIGSTOP)
            stalled = time.monotonic()
            wait_until(lambda: source.state == "retrying", 6, "the stalled read returns")
            assert 1.2 <= time.monotonic() - stalled <= 5
            assert time.monotonic() - source.last_progress < 2
    finally:
        server.kill()
        server.wait()
    assert "source door: no frame for 1.5s from tcp://127.0.0.1" in caplog.text
    assert "reopening in 0.5s" in caplog.text


def _listening(port: int) -> bool:
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp4"))


# ------------------------------------------------- decode only what is inferred


class CountingModels:
    """A stand-in model that costs nothing, so the test measures the source, not inference."""

    def __init__(self) -> None:
        self.calls = 0

    @contextmanager
    def acquire(self, name: str, label: str | None = None) -> Iterator[Any]:
        yield self

    name, version = "stub", 1

    def process(self, image: np.ndarray, *, top_k: Any = None, threshold: Any = None, prepared: Any = None) -> Any:
        self.calls += 1
        return SimpleNamespace(latency_ms=0.1, payload={"top": []})


def run_capped(source: FrameSource, fps: float, seconds: float) -> tuple[SourceWorker, int, list[tuple[int, int]]]:
    """Run ``source`` under a worker capped at ``fps``; returns the worker, the number of
    frames converted, and (frame taken, frames captured at that instant) per take."""
    converted = 0
    retrieve = source._retrieve

    def counting(grabbed: Any) -> Any:
        nonlocal converted
        converted += 1
        return retrieve(grabbed)

    source._retrieve = counting  # type: ignore[method-assign]
    taken: list[tuple[int, int]] = []
    next_frame = source.next_frame

    def watched(timeout: float | None = None) -> Any:
        with source._cond:
            frame = next_frame(timeout)
            if frame is not None:
                taken.append((frame.index, source.captured))
        return frame

    source.next_frame = watched  # type: ignore[method-assign]
    stop = threading.Event()
    cfg = source.cfg.model_copy(update={"fps": fps})
    source.cfg = cfg
    worker = SourceWorker(source, CountingModels(), [RecordingSink()], stop)  # type: ignore[arg-type]
    source.start()
    worker.start()
    let_time_pass(seconds, "the worker runs at its capped rate for that long")
    stop.set()
    worker.join(5)
    source.stop()
    return worker, converted, taken


@pytest.mark.parametrize("kind", ["pipe", "opencv"])
def test_fps_cap_decodes_only_the_frames_it_infers(demo: Path, kind: str) -> None:
    """fps = 5 on a 30 fps camera: the 25 frames a second that are skipped are grabbed but never
    converted (CPU is the Pi's scarcest resource), every frame is still counted, and each frame the
    worker takes is the newest one at that instant."""
    if kind == "pipe":
        need("ffmpeg")
        source: FrameSource = PipeSource(pipe_cfg([*FFMPEG, "-re", "-i", str(demo), "-f", "mjpeg", "-q:v", "3", "-"]))
    else:
        source = open_source(SourceConfig(name="cam", uri=str(demo), model="m"))  # a file played in real time
    worker, converted, taken = run_capped(source, fps=5, seconds=2.5)
    stats = source.stats()
    inferred = worker.stats.frames
    assert stats["captured"] >= 50, stats
    assert 9 <= inferred <= 14, inferred
    assert converted <= 2 * inferred + 2, (converted, inferred)  # against ~75 without the cap's help
    left = 1 if source._latest is not None else 0
    assert inferred + stats["skipped"] + left == stats["captured"], (inferred, stats)
    assert all(index == captured - 1 for index, captured in taken), taken


def test_no_fps_cap_converts_every_frame(demo: Path) -> None:
    """Without a cap nothing changes: every frame grabbed is converted (a slow model then skips the converted ones)."""
    need("ffmpeg")
    source = PipeSource(pipe_cfg([*FFMPEG, "-i", str(demo), "-frames:v", "20", "-f", "mjpeg", "-"]))
    converted = 0
    retrieve = source._retrieve

    def counting(grabbed: Any) -> Any:
        nonlocal converted
        converted += 1
        return retrieve(grabbed)

    source._retrieve = counting  # type: ignore[method-assign]
    with running(source):
        frames_from(source, 1)
        wait_until(lambda: source.stats()["captured"] >= 20, 5, "20 frames")
        assert converted >= 20


# ------------------------------------------------------- classified end to end


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["ffmpeg-mjpeg", "ffmpeg-raw", "gst-mjpeg"])
def test_pipe_frames_classify_as_the_cat(demo: Path, mobilenet, kind: str) -> None:
    """Through the real MobileNetV2: the first frames of the demo video, read through each kind of
    pipe, are classified as the cat they show."""
    if kind.startswith("ffmpeg"):
        need("ffmpeg")
        if kind == "ffmpeg-mjpeg":
            cfg = pipe_cfg([*FFMPEG, "-re", "-i", str(demo), "-frames:v", "10", "-f", "mjpeg", "-q:v", "5", "-"])
        else:
            cfg = pipe_cfg([*FFMPEG, "-re", "-i", str(demo), "-frames:v", "10", "-f", "rawvideo", "-pix_fmt", "bgr24",
                            "-"], format="raw", width=640, height=480, pixel_format="bgr24")
    else:
        need("gst-launch-1.0")
        cfg = pipe_cfg(["gst-launch-1.0", "-q", "filesrc", f"location={demo}", "!", "avidemux", "!", "jpegdec", "!",
                        "identity", "eos-after=10", "sync=true", "!", "videoconvert", "!", "jpegenc", "!", "fdsink"])
    source = PipeSource(cfg.model_copy(update={"fps": 10}))
    sink = RecordingSink()
    stop = threading.Event()
    worker = SourceWorker(source, StaticModels(mobilenet), [sink], stop)
    source.start()
    worker.start()
    try:
        wait_until(lambda: len(sink.results) >= 3, 15, "three results")
    finally:
        stop.set()
        worker.join(5)
        source.stop()
    top1 = [r["top"][0]["label"] for r in sink.results[:3]]
    assert all(label in CAT_CLASSES for label in top1), top1


@pytest.mark.integration
def test_bad_pipe_leaves_the_other_source_alone(demo: Path, mobilenet_bundle: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """In one agent, a camera program that does not exist is retried with back-off while the other
    source (ffmpeg on the demo video) is classified as usual."""
    need("ffmpeg")
    from edge_agent.agent import Agent

    caplog.set_level(logging.INFO, "edge_agent.sources")
    config = parse_config({
        "device_id": "pipes",
        "store": {"path": str(tmp_path / "store")},
        "models": [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
        "sources": [
            {"name": "broken", "model": "mobilenet_v2", "command": ["no-such-camera", "--codec", "mjpeg"]},
            {"name": "good", "model": "mobilenet_v2", "fps": 10,
             "command": [*FFMPEG, "-re", "-i", str(demo), "-frames:v", "15", "-f", "mjpeg", "-"]},
        ],
    })
    sink = RecordingSink()
    agent = Agent(config, extra_sinks=[sink])
    agent.start()
    try:
        wait_until(lambda: len([s for s, _, _ in sink.items if s == "good"]) >= 3, 20, "results of the good source")
        broken = next(s for s in agent.sources if s.name == "broken")
        wait_until(lambda: broken.errors >= 2, 5, "the broken source retried")
        assert broken.state == "retrying" and broken.capture_alive
    finally:
        agent.shutdown()
    good = [r for s, r, _ in sink.items if s == "good"]
    assert all(r["top"][0]["label"] in CAT_CLASSES for r in good[:3]), good[:3]
    assert not any(s == "broken" for s, _, _ in sink.items)
    assert "source broken: cannot start 'no-such-camera': no such program" in caplog.text
    assert no_children_left() == []


def test_the_program_does_not_inherit_the_agents_systemd_sockets(monkeypatch, tmp_path: Path) -> None:
    """NOTIFY_SOCKET and WATCHDOG_* are for the agent alone: a camera program
    that speaks sd_notify (gst-launch can) must not report in its name."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    out = tmp_path / "env.txt"
    source = PipeSource(pipe_cfg(["sh", "-c", f"env > {out}; sleep 5"]))
    with running(source):
        wait_until(lambda: out.exists() and out.stat().st_size > 0, 5, "the program ran")
    env = out.read_text()
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert "PATH=" in env
