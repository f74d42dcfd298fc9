"""Faults: what the real agent survives, measured. Seven scenarios, each
against the real agent (``python -m edge_agent run`` as a subprocess, the
real MobileNetV2 packed as the demo's bundle) and a real mosquitto on a free
loopback port (127.0.0.1 only), bounded in time and count, each ending by
itself:

* **R1** the broker killed (SIGKILL) and restarted ``--restarts`` times (20)
  while results (``results_qos = 1``) and telemetry flow, broker with
  persistence: a subscriber with a persistent session counts ``seq`` gaps,
  duplicates and reorderings per topic; seconds from the broker back to the
  first message and to the first fresh result (captured after it came
  back); what the spool replayed (the agent's "replayed N message(s)" lines).
* **R2** ``kill -9`` of the agent at ``--kills`` (50) random moments of
  deploys, alternately by URL (a local HTTP server) and by MQTT transfer (the
  fleet console's sender): after each restart a valid version serves (its
  results arrive, its directory verifies), ``edge-agent models list`` agrees
  with the state file, ``.staging`` is empty; whether the interrupted deploy
  was ever answered; versions and partial downloads left at the end.
* **R3** bad bundles deployed over MQTT (wrong sha256, larger than declared,
  signature absent, by another key or not matching, truncated, not a model,
  a model whose input disagrees with its manifest, ``../`` and absolute
  paths, symbolic and hard links, a file larger than listed, decompression
  bombs, ...): the code each gets, the largest gap between results while it
  is refused, and the store and staging listed before and after.
* **R4** ``--fuzz`` (10,000) fuzzed commands (random JSON, wrong types, huge
  strings, deep nesting, binary, NaN, repeated ids), in bursts and paced:
  the agent stays up, RSS before and after, every message whose id can be
  read answered exactly once (``busy`` counts), the others answered with
  ``id: null`` or counted in telemetry's ``commands_shed``, and a ping after
  each burst answered within 2 s.
* **R5** the camera gone and back: the program of a pipe source killed
  (SIGKILL), a stream server (``ffmpeg ... tcp://127.0.0.1:PORT?listen``)
  killed and started again, a video file replaced, and removed then put
  back: seconds until results resume.
* **R6** a soak (``--soak-minutes``, 30) at 10 fps with telemetry, HTTP
  predicts and a swap v1/v2 every ``--swap-every-s``: RSS, open fds and
  threads of the agent after warm-up and at the end.
* **R7** security: unsigned, wrongly signed, tampered, replayed (also after a
  restart), stale and future-dated commands with ``[commands]
  trusted_keys``; clients without a certificate, or with one from another
  CA, against ``require_certificate true``; the mosquitto ACL shipped in
  ``configs/mosquitto/`` confining each device to its own topics.

Each scenario ends with a verdict against "nothing lost, every bad input
refused with a specific error, the serving version never pauses" and the
reasons when it fails. The broker runs with ``max_queued_messages 100000``
so that what the scenarios count is the agent's doing, not mosquitto's
per-client queue limit (1,000 by default); ``broker_drops`` reports any
drop it logged anyway.

Run from the repository root::

    .venv/bin/python benchmarks/faults.py                       # all, default sizes
    .venv/bin/python benchmarks/faults.py --only R1,R3 --restarts 5
    .venv/bin/python benchmarks/faults.py --only R6 --soak-minutes 30 --json

JSON goes to stdout, then a readable table; progress to stderr.
``tests/test_faults.py`` runs small sizes of the same code.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import socketserver
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from _bench import MODEL_NAME, REPO, emit, loadavg, machine_info, pack_mobilenet

import testassets  # noqa: E402  (the checkout is on sys.path through _bench)

SCENARIOS = ("R1", "R2", "R3", "R4", "R5", "R6", "R7")
FFMPEG = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error"]
# A result gap longer than this while a fault is handled counts as a pause
# of the serving version (at 10 fps the steady gap is 0.1 s; this machine is
# shared, so scheduling alone gives gaps of a few tenths).
PAUSE_S = 1.0
BROKER_EXTRA = ["max_queued_messages 100000", "max_inflight_messages 100"]


_LIVE: dict[int, Any] = {}
"""Brokers, agents and clients started here, for :func:`cleanup`."""


def cleanup() -> None:
    """Stop every broker, agent and client a scenario started: what one that
    failed half-way (an exception in its setup) left running."""
    while _LIVE:
        _, thing = _LIVE.popitem()
        with suppress(Exception):
            (thing.close if isinstance(thing, Watcher) else thing.stop)()


def progress(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` s, else None."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(step)


def free_port() -> int:
    from edge_agent.testing import free_port as fp

    return fp()


# -- the world: assets, bundles, keys --------------------------------------------------------------


class Ctx:
    """What the scenarios share: a work folder, the real assets, bundles
    (packed once per run) and Ed25519 key pairs."""

    def __init__(self, work: Path, cache: Path | None = None) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.assets = testassets.build(cache or testassets.default_cache_dir(),
                                         only={"mobilenet_v2", "imagenet_labels", "photos", "demo_video"})
        self._bundles: dict[tuple, Path] = {}
        self._keys: dict[str, tuple[Path, Path]] = {}
        self._lock = threading.Lock()
        self.prefix = f"faults-{uuid.uuid4().hex[:6]}"

    @property
    def video(self) -> Path:
        return self.assets["demo_video"]

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def keypair(self, name: str) -> tuple[Path, Path]:
        """(private, public) key files of key pair ``name``."""
        from edge_agent.bundles.signing import generate_keypair

        with self._lock:
            if name not in self._keys:
                folder = self.folder("keys")
                private, public = folder / f"{name}.key", folder / f"{name}.pub"
                if not (private.exists() and public.exists()):  # a --work folder of an earlier run keeps them
                    generate_keypair(private, public)
                self._keys[name] = (private, public)
            return self._keys[name]

    def bundle(self, version: int, *, archive: bool = False, key: str | None = None) -> Path:
        """MobileNetV2 as the demo packs it, as ``version``: a directory, or a
        ``.tar`` archive; signed by key pair ``key`` when given."""
        spec = (version, archive, key)
        with self._lock:
            if spec in self._bundles:
                return self._bundles[spec]
        folder = self.folder("bundles")
        stem = f"{MODEL_NAME}-v{version}" + (f"-{key}" if key else "")
        out = folder / (f"{stem}.tar" if archive else stem)
        if not out.exists():
            src = folder / stem
            if not src.exists():
                pack_mobilenet(self.assets, src, version=version)
                if key:
                    from edge_agent.bundles.signing import load_private_key, sign_dir

                    sign_dir(src, load_private_key(self.keypair(key)[0]))
            if archive:
                from edge_agent.bundles.pack import write_bundle

                write_bundle(src, out)
        with self._lock:
            self._bundles[spec] = out
        return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the broker ------------------------------------------------------------------------------------


class Broker:
    """A mosquitto of our own on a free loopback port that can be killed."""

    def __init__(self, folder: Path, *, persistence: bool = False, tls: dict[str, Path] | None = None,
                 users: dict[str, str] | None = None, extra: list[str] | None = None) -> None:
        from edge_agent.testing import Mosquitto

        self.folder = Path(folder)
        self.m = Mosquitto(self.folder, persistence=persistence, tls=tls, users=users,
                           extra=[*BROKER_EXTRA, *(extra or [])])
        _LIVE[id(self)] = self
        self.host, self.port = self.m.host, self.m.port

    @property
    def pid(self) -> int | None:
        return self.m.proc.pid if self.m.proc else None

    def kill9(self) -> None:
        if self.m.proc is not None and self.m.proc.poll() is None:
            self.m.proc.kill()
            self.m.proc.wait(10)

    def start(self) -> None:
        self.m.start()

    def stop(self) -> None:
        with suppress(Exception):
            self.m.stop()
        self.kill9()

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def drops(self) -> int:
        """Lines where mosquitto said it dropped messages for a client."""
        return sum(1 for line in self.log().splitlines() if "dropped" in line.lower())


# -- an MQTT client that keeps everything --------------------------------------------------------------


class Watcher:
    """A paho client (MQTT 3.1.1) that keeps every message it receives,
    parsed as JSON where it is JSON, with the monotonic time it arrived;
    replies and events are indexed by command id. Also publishes commands."""

    def __init__(self, broker: Broker, topics: list[str], *, client_id: str | None = None,
                 persistent: bool = False, tls: dict[str, Path] | None = None,
                 auth: tuple[str, str] | None = None, timeout: float = 10.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.cond = threading.Condition()
        self.messages: list[tuple[float, str, Any]] = []
        self.replies: dict[Any, list[tuple[float, dict]]] = {}
        self.events: dict[Any, list[tuple[float, dict]]] = {}
        self.topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"faults-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["cert"]) if tls.get("cert") else None,
                                keyfile=str(tls["key"]) if tls.get("key") else None)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(0.2, 1)
        self.subscribed = threading.Event()
        self.refused: str | None = None
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        _LIVE[id(self)] = self
        if topics and not self.subscribed.wait(timeout):
            self.close()
            raise RuntimeError(f"subscription to {topics} not acknowledged ({self.refused or 'no answer'})")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            return
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        try:
            payload: Any = json.loads(msg.payload)
        except ValueError:
            payload = bytes(msg.payload)
        with self.cond:
            self.messages.append((now, msg.topic, payload))
            if isinstance(payload, dict):
                if msg.topic.endswith("/reply"):
                    self.replies.setdefault(payload.get("id"), []).append((now, payload))
                elif msg.topic.endswith("/events"):
                    self.events.setdefault(payload.get("id"), []).append((now, payload))
            self.cond.notify_all()

    # -- reading -----------------------------------------------------------------------

    def on(self, suffix: str, since: float = 0.0) -> list[tuple[float, dict]]:
        """(arrival, payload) of JSON messages on topics ending in ``suffix``."""
        with self.cond:
            return [(t, p) for t, topic, p in self.messages
                    if t >= since and topic.endswith(suffix) and isinstance(p, dict)]

    def first_since(self, since: float) -> float | None:
        """When the first message at or after ``since`` arrived (None: none yet)."""
        with self.cond:
            first = None
            for t, _, _ in reversed(self.messages):
                if t < since:
                    break
                first = t
            return first

    def results(self, device: str, since: float = 0.0) -> list[tuple[float, dict]]:
        key = f"/{device}/results/"
        with self.cond:
            return [(t, p) for t, topic, p in self.messages if t >= since and key in topic and isinstance(p, dict)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = predicate()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def reply(self, cmd_id: Any, timeout: float = 30.0) -> dict | None:
        got = self.wait_for(lambda: self.replies.get(cmd_id), timeout)
        return got[0][1] if got else None

    def first_result(self, device: str, *, after_wall: float | None = None, since: float = 0.0,
                     timeout: float = 30.0) -> tuple[float, dict] | None:
        """The first result (arrival, payload) that arrived at or after
        ``since`` and, with ``after_wall``, whose frame was captured after it."""
        key = f"/{device}/results/"
        i = [0]

        def find() -> tuple[float, dict] | None:
            while i[0] < len(self.messages):
                t, topic, p = self.messages[i[0]]
                i[0] += 1
                if t >= since and key in topic and isinstance(p, dict):
                    if after_wall is None or float(p.get("ts", 0)) > after_wall:
                        return t, p
            return None

        return self.wait_for(find, timeout)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, wait: float | None = 10.0) -> Any:
        info = self.client.publish(topic, payload, qos=qos)
        if wait:
            info.wait_for_publish(wait)
        return info

    def command(self, topic: str, cmd: str, args: dict | None = None, *, cmd_id: str | None = None,
                sign_key: Path | None = None, ts: float | None = None) -> tuple[str, bytes]:
        """Publish a command (QoS 1), signed with ``sign_key`` when given;
        returns its id and the exact payload (to replay it)."""
        cmd_id = cmd_id or f"f-{uuid.uuid4().hex[:12]}"
        message: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "args": args or {}}
        if sign_key is not None or ts is not None:
            message["ts"] = time.time() if ts is None else ts
        if sign_key is not None:
            from edge_agent.bundles.signing import load_private_key, sign_command

            message["sig"] = sign_command(load_private_key(sign_key), cmd_id, cmd, message["args"], message["ts"])
        payload = json.dumps(message).encode()
        self.publish(topic, payload)
        return cmd_id, payload

    def close(self) -> None:
        with suppress(Exception):
            self.client.disconnect()
        with suppress(Exception):
            self.client.loop_stop()


# -- the agent ------------------------------------------------------------------------------------------


def toml(data: dict[str, Any]) -> str:
    """A small TOML writer for the configs made here (tables, arrays of
    tables, strings, numbers, booleans and lists of them)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(prefix: str, d: dict[str, Any], out: list[str]) -> None:
        for k, v in d.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                out.append(f"{k} = {value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                out += ["", f"[{name}]"]
                table(name, v, out)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    out += ["", f"[[{name}]]"]
                    table(name, item, out)

    lines: list[str] = []
    table("", data, lines)
    return "\n".join(lines) + "\n"


def video_source(path: Path, fps: float = 10.0, **extra: Any) -> dict[str, Any]:
    return {"name": "cam", "uri": str(path), "model": MODEL_NAME, "fps": fps, "loop": True, **extra}


def pipe_source(video: Path, fps: float = 10.0, **extra: Any) -> dict[str, Any]:
    """ffmpeg playing the video in real time, looping, as MJPEG on stdout."""
    command = [*FFMPEG, "-re", "-stream_loop", "-1", "-i", str(video), "-c:v", "copy", "-f", "mjpeg", "-"]
    return {"name": "cam", "command": command, "model": MODEL_NAME, "fps": fps, "stall_timeout_s": 3.0, **extra}


def agent_config(ctx: Ctx, folder: Path, device: str, broker: Broker | None, *, source: dict[str, Any] | None,
                 bundle: Path | None = None, telemetry_s: float = 1.0, results_qos: int = 0,
                 model: dict[str, Any] | None = None, **sections: Any) -> Path:
    """An agent config in ``folder`` (store in ``folder/store``); ``sections``
    adds or overrides top-level sections (``store``, ``commands``, ``http``...)."""
    data: dict[str, Any] = {"device_id": device, "log_level": "info"}
    if broker is not None:
        data["mqtt"] = {"host": broker.host, "port": broker.port, "topic_prefix": ctx.prefix,
                        "telemetry_interval_s": telemetry_s, "keepalive_s": 5, "results_qos": results_qos}
    data["store"] = {"path": str(folder / "store")}
    data["models"] = [{"name": MODEL_NAME, "bundle": str(bundle or ctx.bundle(1)), "threads": 1, **(model or {})}]
    if source is not None:
        data["sources"] = [source]
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **val}
        else:
            data[key] = val
    path = folder / f"{device}.toml"
    path.write_text(toml(data))
    return path


class Agent:
    """``python -m edge_agent run --config CONFIG`` with its log in
    ``CONFIG.log`` (appended across restarts)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = Path(config)
        self.logfile = self.config.with_suffix(".log")
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env}
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.config.parent, env=env)
        _LIVE[id(self)] = self
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[Any]:
        import psutil

        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill9(self) -> None:
        """SIGKILL, as a power cut would; its camera programs (they lead
        process groups of their own, so they outlive it) are killed too."""
        if self.alive:
            assert self.proc is not None
            orphans = self.children()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            for child in orphans:
                with suppress(Exception):
                    child.kill()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_size(self) -> int:
        return self.logfile.stat().st_size if self.logfile.exists() else 0

    def output(self, since: int = 0) -> str:
        if not self.logfile.exists():
            return ""
        with open(self.logfile, "rb") as fh:
            fh.seek(since)
            return fh.read().decode("utf-8", "replace")

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]

    def usage(self) -> dict[str, float]:
        """RSS (MB), open fds and threads of the agent process."""
        import psutil

        p = psutil.Process(self.pid)
        return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds(), "threads": p.num_threads()}


def wait_serving(w: Watcher, agent: Agent, device: str, *, since: float, n: int = 3, timeout: float = 90.0) -> dict:
    """Wait for ``n`` results of ``device`` after ``since``; the last one."""
    got = wait_until(lambda: (not agent.alive and "dead") or (len(w.results(device, since)) >= n and "ok"), timeout,
                     step=0.1)
    if got != "ok":
        why = "exited" if got == "dead" else f"gave fewer than {n} results in {timeout:.0f} s"
        raise RuntimeError(f"agent {device} {why}:\n{agent.tail()}")
    return w.results(device, since)[-1][1]


def gaps_between(times: list[float], t0: float, t1: float) -> float:
    """The largest gap between consecutive times around [t0, t1] (a gap
    counts when it overlaps the window); 0 with fewer than two times."""
    times = sorted(times)
    worst = 0.0
    for a, b in zip(times, times[1:]):
        if b >= t0 and a <= t1:
            worst = max(worst, b - a)
    if times and times[-1] < t1:
        worst = max(worst, t1 - max(times[-1], t0))
    return worst


def seq_check(seqs: list[int]) -> dict[str, Any]:
    """Gaps (missing numbers between the first and the last), duplicates and
    reorderings of a sequence as it arrived."""
    if not seqs:
        return {"received": 0, "unique": 0, "missing": 0, "duplicates": 0, "out_of_order": 0}
    unique = set(seqs)
    missing = sorted(set(range(min(unique), max(unique) + 1)) - unique)
    seen: set[int] = set()
    high = 0
    reordered = 0
    for s in seqs:
        if s not in seen and s < high:
            reordered += 1
        seen.add(s)
        high = max(high, s)
    return {"received": len(seqs), "unique": len(unique), "first": min(unique), "last": max(unique),
            "missing": len(missing), "missing_first": missing[:10], "duplicates": len(seqs) - len(unique),
            "out_of_order": reordered}


def store_listing(store: Path) -> set[str]:
    """Every path under the store except the ones that change by
    themselves (spool, lock, socket, state files)."""
    if not store.exists():
        return set()
    skip = (".spool.db", ".lock", "agent.sock", "state.json", ".state.json")
    out = set()
    for p in store.rglob("*"):
        rel = p.relative_to(store).as_posix()
        if any(part.startswith(skip) for part in rel.split("/")):
            continue
        if rel in (".staging", ".transfers"):
            continue  # the containers themselves (made by the first deploy); what is in them counts
        out.add(rel + ("/" if p.is_dir() else ""))
    return out


def verdict(out: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    out["failures"] = failures
    out["verdict"] = "pass" if not failures else "fail"
    return out


# -- R1: broker killed and restarted ------------------------------------------------------------------


def r1_broker_restarts(ctx: Ctx, *, restarts: int = 20, down_s: float = 2.0, up_s: float = 8.0,
                       fps: float = 10.0) -> dict[str, Any]:
    folder = ctx.folder("r1")
    device = "r1"
    broker = Broker(folder / "broker", persistence=True)
    sub = Watcher(broker, [f"{ctx.prefix}/{device}/results/#", f"{ctx.prefix}/{device}/telemetry"],
                  client_id=f"faults-r1-{uuid.uuid4().hex[:6]}", persistent=True)
    cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), results_qos=1,
                       telemetry_s=1.0)
    agent = Agent(cfg)
    per: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        agent.start()
        wait_serving(sub, agent, device, since=0.0, n=10)
        for i in range(restarts):
            offset = agent.log_size()
            broker.kill9()
            t_kill = time.monotonic()
            time.sleep(down_s)
            broker.start()
            t_up, wall_up = time.monotonic(), time.time()
            first_any = sub.wait_for(lambda: sub.first_since(t_up), 60)
            fresh = sub.first_result(device, after_wall=wall_up, since=t_up, timeout=60)
            time.sleep(max(0.0, up_s - (time.monotonic() - t_up)))
            replayed = sum(int(n) for n in re.findall(r"replayed (\d+) message", agent.output(offset)))
            row = {"restart": i + 1, "down_s": round(t_up - t_kill, 2),
                   "first_message_s": round(first_any - t_up, 2) if first_any else None,
                   "first_fresh_result_s": round(fresh[0] - t_up, 2) if fresh else None,
                   "replayed": replayed}
            per.append(row)
            progress(f"R1 restart {i + 1}/{restarts}: first fresh result after {row['first_fresh_result_s']} s, "
                     f"{replayed} replayed")
            if not agent.alive:
                failures.append(f"the agent exited after restart {i + 1}")
                break
        time.sleep(3.0)  # the last ones arrive
        stopped = agent.stop()
        time.sleep(1.0)
    finally:
        agent.stop()
        sub.close()
        broker.stop()
    results = [p["seq"] for _, p in sub.on("/results/cam")]
    telemetry = [p["seq"] for _, p in sub.on("/telemetry")]
    res, tel = seq_check(results), seq_check(telemetry)
    fresh_s = [r["first_fresh_result_s"] for r in per if r["first_fresh_result_s"] is not None]
    out = {
        "scenario": "R1", "what": "broker SIGKILLed and restarted while results (QoS 1) and telemetry flow",
        "restarts": restarts, "down_s": down_s, "up_s": up_s, "fps": fps,
        "results": res, "telemetry": tel,
        "first_fresh_result_s": {"median": round(statistics.median(fresh_s), 2) if fresh_s else None,
                                 "max": max(fresh_s) if fresh_s else None},
        "replayed_total": sum(r["replayed"] for r in per),
        "replayed_per_restart": [r["replayed"] for r in per],
        "agent_exit": stopped, "broker_drops": broker.drops(), "per_restart": per,
    }
    if res["missing"]:
        failures.append(f"{res['missing']} result(s) lost (seq gaps, first {res['missing_first']})")
    if tel["missing"]:
        failures.append(f"{tel['missing']} telemetry message(s) lost (seq gaps, first {tel['missing_first']})")
    if len(fresh_s) < len(per):
        failures.append(f"{len(per) - len(fresh_s)} restart(s) without a fresh result within 60 s")
    if stopped != 0:
        failures.append(f"the agent's clean stop exited {stopped}")
    return verdict(out, failures)


# -- R2: kill -9 during deploys ---------------------------------------------------------------------------


class FileServer:
    """A quiet ``http.server`` for a folder on 127.0.0.1 (bundles by URL)."""

    def __init__(self, folder: Path) -> None:
        handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
        bound = lambda *a, **k: handler(*a, directory=str(folder), **k)  # noqa: E731
        server = type("QuietServer", (socketserver.ThreadingTCPServer,), {"handle_error": lambda *a: None})
        self.server = server(("127.0.0.1", 0), bound)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True, name="file-server").start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Deployer:
    """Deploys an archive to one device by URL or by MQTT transfer, as the
    fleet console does (its command and its :class:`TransferSender`), and can
    be abandoned half-way (the agent killed under it)."""

    def __init__(self, ctx: Ctx, console: Watcher, device: str, files: FileServer | None = None) -> None:
        self.ctx, self.console, self.device, self.files = ctx, console, device, files
        self.sender: Any = None

    def send(self, archive: Path, version: int, via: str, *, sha256: str | None = None, size: int | None = None,
             activate: bool = True, model: str = MODEL_NAME, sign_key: Path | None = None,
             chunk_size: int = 256 * 1024, url_path: str | None = None) -> str:
        """Publish the deploy command; for ``via="mqtt"`` start the transfer
        once the device listens (its ``transfer`` progress event, or after
        3 s). ``sha256`` and ``size`` default to the archive's own."""
        from edge_agent.comms.mqtt import PahoLink
        from edge_agent.comms.transfer import TransferSender

        self.close()
        args: dict[str, Any] = {"model": model, "version": version, "sha256": sha256 or sha256_of(archive),
                                "size": archive.stat().st_size if size is None else size, "activate": activate}
        tid = None
        if via == "url":
            assert self.files is not None
            args["url"] = self.files.url(url_path or archive.name)
        else:
            tid = uuid.uuid4().hex
            args["transfer"] = tid
        cmd_id = f"deploy-{uuid.uuid4().hex[:12]}"
        if tid is not None:
            self.sender = TransferSender(PahoLink(self.console.client), self.ctx.prefix, archive, tid=tid,
                                         chunk_size=chunk_size)
        self.console.command(f"{self.ctx.prefix}/{self.device}/cmd", "deploy", args, cmd_id=cmd_id, sign_key=sign_key)
        if tid is not None:
            sender = self.sender

            def start_when_listening() -> None:
                self.console.wait_for(lambda: any(p.get("step") == "transfer" or p.get("event") in ("deploy_failed",)
                                                  for _, p in self.console.events.get(cmd_id, []))
                                      or self.console.replies.get(cmd_id), 3.0)
                with suppress(Exception):
                    if self.sender is sender:
                        sender.start()

            threading.Thread(target=start_when_listening, daemon=True, name="transfer-start").start()
        return cmd_id

    def close(self) -> None:
        if self.sender is not None:
            with suppress(Exception):
                self.sender.close()
            self.sender = None


def check_store_after_restart(cfg: Path, store: Path, serving_version: int) -> list[str]:
    """What R2 asks of a store once the agent serves again."""
    from edge_agent.bundles import verify_dir
    from edge_agent.errors import EdgeAgentError

    problems = []
    listed = subprocess.run([sys.executable, "-m", "edge_agent", "models", "list", "--json", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        cli = json.loads(listed.stdout)["models"][MODEL_NAME]
    except (ValueError, KeyError) as exc:
        return [f"models list failed ({listed.returncode}): {listed.stderr[-300:] or exc}"]
    state = json.loads((store / MODEL_NAME / "state.json").read_text())
    on_disk = sorted(int(p.name) for p in (store / MODEL_NAME).iterdir() if p.is_dir() and p.name.isdigit())
    if cli.get("active") != state.get("active") or cli.get("last_good") != state.get("last_good"):
        problems.append(f"models list says active {cli.get('active')} last good {cli.get('last_good')}, the state "
                        f"file {state.get('active')} / {state.get('last_good')}")
    if sorted(cli.get("versions", [])) != on_disk:
        problems.append(f"models list versions {cli.get('versions')} != directories {on_disk}")
    if state.get("active") != serving_version:
        problems.append(f"results come from version {serving_version}, the state file says {state.get('active')}")
    try:
        verify_dir(store / MODEL_NAME / str(serving_version))
    except EdgeAgentError as exc:
        problems.append(f"the serving version {serving_version} does not verify: {exc}")
    staging = store / ".staging"
    if staging.exists() and any(staging.iterdir()):
        problems.append(f".staging not empty: {sorted(p.name for p in staging.iterdir())}")
    if list((store / MODEL_NAME).glob(".state.json.*")):
        problems.append("a temporary state file was left")
    return problems


KEEP_FOR_RESUME = 2
"""Interrupted downloads and transfers the agent keeps at start for a resume."""


def r2_kill_during_deploys(ctx: Ctx, *, kills: int = 50, seed: int = 12, fps: float = 10.0) -> dict[str, Any]:
    folder = ctx.folder("r2")
    device = "r2"
    broker = Broker(folder / "broker")
    console = Watcher(broker, [f"{ctx.prefix}/{device}/{t}" for t in ("reply", "events", "results/#")])
    archives = ctx.folder("r2/archives")
    files = FileServer(archives)
    store = folder / "store"
    cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), telemetry_s=5.0,
                       model={"probation_s": 2.0, "probation_frames": 1000})
    agent = Agent(cfg)
    deployer = Deployer(ctx, console, device, files)
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    calibration: dict[str, float] = {}
    next_version = [2]
    serving_before: set[int] = set()  # the versions that may serve before the current deploy
    probation_s = 2.0

    def archive_for(version: int) -> Path:
        target = archives / f"{MODEL_NAME}-v{version}.tar"
        if not target.exists():
            src = ctx.bundle(version, archive=True)
            shutil.copy(src, target)
        return target

    def one(via: str, kill_after: float | None) -> dict[str, Any]:
        version = next_version[0]
        next_version[0] += 1
        archive = archive_for(version)
        since = time.monotonic()
        cmd_id = deployer.send(archive, version, via)
        row: dict[str, Any] = {"via": via, "version": version}
        if kill_after is None:
            reply = console.reply(cmd_id, 180)
            row["seconds"] = round(time.monotonic() - since, 2)
            row["reply"] = (reply or {}).get("ok")
            deployer.close()
            return row
        time.sleep(kill_after)
        replied_before = bool(console.replies.get(cmd_id))
        agent.kill9()
        deployer.close()
        passed = any(p.get("event") == "probation_passed" and p.get("version") == version
                     for _, p in console.events.get(None, []))
        row.update(kill_after_s=round(kill_after, 2), replied_before_kill=replied_before,
                   passed_probation_before_kill=passed)
        steps = [p.get("step") or p.get("event") for _, p in console.events.get(cmd_id, [])]
        row["last_step"] = steps[-1] if steps else None
        t_restart = time.monotonic()
        agent.start()
        last = wait_serving(console, agent, device, since=t_restart, n=3)
        row["restart_to_serving_s"] = round(time.monotonic() - t_restart, 2)
        row["serving"] = last["version"]
        problems = check_store_after_restart(cfg, store, last["version"])
        # Past its probation the new version serves; killed before (while it
        # was fetched, verified, installed, loaded or on probation) the one
        # before it does (the new one only if its probation passed unseen
        # in the last moment).
        allowed = {version} if passed else serving_before | {version}
        if last["version"] not in allowed:
            problems.append(f"serving v{last['version']}, expected v{' or v'.join(map(str, sorted(allowed)))}")
        serving_before.clear()
        serving_before.add(last["version"])
        if not replied_before:
            late = console.reply(cmd_id, 3.0)
            row["reply_after_restart"] = None if late is None else (
                "ok" if late.get("ok") else late.get("error", {}).get("code"))
            if late is not None and late.get("ok"):
                # Killed before it took the command: the broker's persistent
                # session delivered it to the restarted agent, which deployed
                # it then; it serves once its probation passes.
                serving_before.add(version)
        row["problems"] = problems
        row["replies"] = len(console.replies.get(cmd_id, []))
        return row

    try:
        agent.start()
        wait_serving(console, agent, device, since=0.0, n=3)
        # How long an uninterrupted deploy takes: the kills fall within it. The
        # shorter of two each (the first in a process can take longer than the
        # deploy itself, and kills timed on it fell after the reply).
        for via in ("url", "mqtt", "url", "mqtt"):
            r = one(via, None)
            calibration[via] = min(r["seconds"], calibration.get(via, r["seconds"]))
            progress(f"R2 calibration: a deploy by {via} takes {r['seconds']} s (ok: {r['reply']})")
            if not r["reply"]:
                failures.append(f"the calibration deploy by {via} failed")
            time.sleep(probation_s + 1.0)  # past its probation
        serving_before.add(wait_serving(console, agent, device, since=time.monotonic(), n=2)["version"])
        for i in range(kills):
            via = "url" if i % 2 == 0 else "mqtt"
            took = calibration.get(via, 5.0)
            # Mostly within the deploy itself; one in four later, on probation or past it.
            kill_after = (rng.uniform(0.0, 1.15 * took) if rng.random() < 0.75
                          else rng.uniform(took, took + probation_s + 1.5))
            row = one(via, kill_after)
            row["run"] = i + 1
            runs.append(row)
            progress(f"R2 kill {i + 1}/{kills} ({via}, after {row['kill_after_s']} s at {row['last_step']}): serving "
                     f"v{row['serving']}, {len(row['problems'])} problem(s)")
            for p in row["problems"]:
                failures.append(f"kill {i + 1}: {p}")
            time.sleep(rng.uniform(0.0, 2.5))  # sometimes within the new version's probation, sometimes after
        versions_left = sorted(int(p.name) for p in (store / MODEL_NAME).iterdir() if p.is_dir() and p.name.isdigit())
        transfers = store / ".transfers"
        partial = [p for p in transfers.rglob("*") if p.is_file()] if transfers.exists() else []
        partial_folders = [p for p in transfers.iterdir() if p.is_dir()] if transfers.exists() else []
        stopped = agent.stop()
    finally:
        deployer.close()
        agent.stop()
        files.close()
        console.close()
        broker.stop()
    unanswered = [r for r in runs if not r["replied_before_kill"]]
    answered_late: dict[str, int] = {}
    for r in unanswered:
        key = r.get("reply_after_restart") or "never"
        answered_late[key] = answered_late.get(key, 0) + 1
    never = [r for r in unanswered if not r.get("reply_after_restart")]
    if never:
        failures.append(f"{len(never)} deploy(s) never answered, before the kill or after the restart (run(s) "
                        f"{[r['run'] for r in never]}, killed at {[r['last_step'] for r in never]})")
    # The agent keeps the two most recent interrupted downloads or transfers
    # (a console that sends the same deploy again resumes them); more than
    # that is what crashes leave behind for good.
    if len(partial_folders) > KEEP_FOR_RESUME:
        failures.append(f"{len(partial_folders)} folder(s), {sum(p.stat().st_size for p in partial) / 1e6:.0f} MB of "
                        f"interrupted downloads and transfers left in .transfers (at most {KEEP_FOR_RESUME} are kept "
                        "for a resume)")
    out = {
        "scenario": "R2", "what": "kill -9 at random moments of deploys by URL and by MQTT transfer",
        "kills": kills, "seed": seed, "calibration_s": calibration,
        "kill_moments_by_step": _count(r["last_step"] or "before any event" for r in runs),
        "runs_ok": sum(1 for r in runs if not r["problems"]),
        "killed_after_probation_passed": sum(1 for r in runs if r["passed_probation_before_kill"]),
        "serving_after_restart": _count(f"v{r['serving']}" for r in runs),
        "restart_to_serving_s": {"median": round(statistics.median(x["restart_to_serving_s"] for x in runs), 2)
                                 if runs else None,
                                 "max": max((x["restart_to_serving_s"] for x in runs), default=None)},
        "interrupted_deploys_replied_after_restart": answered_late,
        # QoS 1 is "at least once": a reply the agent sent just before it was
        # killed, not yet acknowledged, is sent again by the next start.
        "deploys_answered_twice": sum(1 for r in runs if r.get("replies", 0) > 1),
        "versions_on_disk_at_end": versions_left, "keep_versions": 3,
        "partial_downloads_at_end": {"folders": len(partial_folders), "files": len(partial),
                                     "mb": round(sum(p.stat().st_size for p in partial) / 1e6, 1)},
        "agent_exit": stopped, "runs": runs,
    }
    return verdict(out, failures)


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# -- R3: bad bundles over MQTT --------------------------------------------------------------------------


@dataclass
class BadBundle:
    kind: str
    what: str
    archive: Path
    version: int
    expect: tuple[str, ...]
    sha256: str | None = None  # declared in the command (default: the archive's)
    size: int | None = None
    via: str = "mqtt"


class _Zeros(io.RawIOBase):
    """``n`` zero bytes to read (a bomb's content, never in memory at once)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def read(self, k: int = -1) -> bytes:
        k = self.left if k is None or k < 0 else min(k, self.left)
        self.left -= k
        return bytes(k)


def _zeros_sha256(n: int) -> str:
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(n >> 20):
        h.update(block)
    h.update(bytes(n & ((1 << 20) - 1)))
    return h.hexdigest()


def _tar(src: Path, out: Path, *, skip: tuple[str, ...] = (), extra: list[tuple[tarfile.TarInfo, Any]] = (),
         gz: bool = False) -> Path:
    """``src``'s files (manifest first) into an archive, leaving out
    ``skip``, plus ``extra`` members (TarInfo, file object or None)."""
    names = sorted(p.name for p in src.iterdir())
    names.sort(key=lambda n: n != "manifest.json")
    opened = tarfile.open(out, "w:gz", compresslevel=1) if gz else tarfile.open(out, "w")
    with opened as tf:
        for name in names:
            if name not in skip:
                tf.add(src / name, arcname=name, recursive=False)
        for info, fh in extra:
            tf.addfile(info, fh)
    return out


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict[str, Any], key: Path | None) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "manifest.sig").unlink(missing_ok=True)
    if key is not None:
        from edge_agent.bundles.signing import load_private_key, sign_dir

        sign_dir(folder, load_private_key(key))


def _relist(manifest: dict[str, Any], folder: Path, path: str) -> None:
    """Update the manifest entry of ``path`` to the file as it is now."""
    f = folder / path
    for entry in manifest["files"]:
        if entry["path"] == path:
            entry["sha256"], entry["size"] = sha256_of(f), f.stat().st_size
            return
    manifest["files"].append({"path": path, "sha256": sha256_of(f), "size": f.stat().st_size})


def bad_bundles(ctx: Ctx, base_version: int, *, bomb_mb: int, key: str = "a", other_key: str = "b",
                kinds: set[str] | None = None) -> Iterator[BadBundle]:
    """Each kind of bad bundle, made from the real MobileNetV2 signed by key
    pair ``key`` (what a device with that trusted key accepts), spoiled in
    one way. Versions from ``base_version`` up, one per kind."""
    folder = ctx.folder(f"r3/bad-{uuid.uuid4().hex[:6]}")
    signer = ctx.keypair(key)[0]
    v = [base_version]

    template = folder / "template"
    pack_mobilenet(ctx.assets, template, version=1)

    def fresh(signed: bool = True, version: int | None = None) -> tuple[Path, int]:
        """A copy of the packed model as the next version (packed once: only
        the manifest's version differs), signed unless told otherwise."""
        if version is None:
            version = v[0]
            v[0] += 1
        src = folder / f"src-{version}-{uuid.uuid4().hex[:4]}"
        shutil.copytree(template, src)
        m = _manifest(src)
        m["version"] = version
        _write_manifest(src, m, signer if signed else None)
        return src, version

    def labels_name(src: Path) -> str:
        return _manifest(src)["labels"]

    def make(kind: str) -> BadBundle | None:
        out = folder / f"{kind}.tar"
        if kind in ("wrong_sha256", "wrong_sha256_url"):
            src, ver = fresh()
            url = kind.endswith("_url")
            return BadBundle(kind, "the command's sha256 is another file's" + (" (by URL)" if url else
                             " (the transfer's meta says otherwise)"), _tar(src, out), ver,
                             ("checksum_mismatch",) if url else ("bad_transfer", "checksum_mismatch"),
                             sha256=hashlib.sha256(b"another file").hexdigest(), via="url" if url else "mqtt")
        if kind in ("larger_than_declared", "larger_than_declared_url"):
            src, ver = fresh()
            arch = _tar(src, out)
            url = kind.endswith("_url")
            return BadBundle(kind, "the archive is 10 kB larger than the command's size" + (" (by URL)" if url else
                             " (the transfer's meta says otherwise)"), arch, ver,
                             ("size_mismatch",) if url else ("bad_transfer", "size_mismatch"),
                             size=arch.stat().st_size - 10_240, via="url" if url else "mqtt")
        if kind == "declared_too_large":
            src, ver = fresh()
            return BadBundle(kind, "the command declares 600 MB (max_bundle_mb 512)", _tar(src, out), ver,
                             ("too_large",), size=600 * 10**6)
        if kind == "unsigned":
            src, ver = fresh(signed=False)
            return BadBundle(kind, "no manifest.sig, trusted_keys set", _tar(src, out), ver, ("signature_missing",))
        if kind == "other_key":
            src, ver = fresh(signed=False)
            _write_manifest(src, _manifest(src), ctx.keypair(other_key)[0])
            return BadBundle(kind, "signed by a key the device does not trust", _tar(src, out), ver, ("untrusted_key",))
        if kind == "signature_not_matching":
            src, ver = fresh()
            m = _manifest(src)
            m["metadata"] = {**m.get("metadata", {}), "changed": "after signing"}
            (src / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")  # the old signature stays
            return BadBundle(kind, "the manifest changed after it was signed", _tar(src, out), ver,
                             ("signature_invalid",))
        if kind == "truncated":
            src, ver = fresh()
            arch = _tar(src, out)
            data = arch.read_bytes()
            arch.write_bytes(data[: len(data) // 2])
            return BadBundle(kind, "the archive cut in half (sha256 and size of the half)", arch, ver, ("bad_archive",))
        if kind == "not_an_archive":
            arch = folder / f"{kind}.tar.gz"
            arch.write_bytes(random.Random(7).randbytes(200_000))
            ver = v[0]
            v[0] += 1
            return BadBundle(kind, "200 kB of random bytes named .tar.gz", arch, ver, ("bad_archive",))
        if kind == "not_a_model":
            src, ver = fresh(signed=False)
            m = _manifest(src)
            (src / m["model_file"]).write_bytes(random.Random(8).randbytes(500_000))
            _relist(m, src, m["model_file"])
            _write_manifest(src, m, signer)
            return BadBundle(kind, "model.onnx is random bytes (listed, signed)", _tar(src, out), ver,
                             ("model_load_failed",))
        if kind == "input_disagrees":
            src, ver = fresh(signed=False)
            m = _manifest(src)
            m["inputs"][0]["shape"] = [1, 3, 160, 160]
            m["preprocessing"]["size"] = [160, 160]
            _write_manifest(src, m, signer)
            return BadBundle(kind, "the manifest says 160x160, the model takes 224x224", _tar(src, out), ver,
                             ("inference_failed", "smoke_test_failed", "model_load_failed"))
        if kind in ("dotdot_path", "absolute_path", "symlink", "hardlink"):
            src, ver = fresh()
            info = tarfile.TarInfo({"dotdot_path": "../escaped.txt", "absolute_path": os.path.join(tempfile.gettempdir(), f"faults-{uuid.uuid4().hex}"),
                                    "symlink": "link.txt", "hardlink": "hard.txt"}[kind])
            fh: Any = None
            if kind in ("dotdot_path", "absolute_path"):
                info.size = 6
                fh = io.BytesIO(b"owned\n")
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
            return BadBundle(kind, f"an extra member {info.name!r}" + (f" -> {info.linkname}" if info.linkname else ""),
                             _tar(src, out, extra=[(info, fh)]), ver, ("bad_archive", "unlisted_member"))
        if kind == "file_larger_than_listed":
            src, ver = fresh()
            with open(src / labels_name(src), "a") as f:
                f.write("one more label\n")
            return BadBundle(kind, "labels.txt longer than its manifest entry", _tar(src, out), ver, ("size_mismatch",))
        if kind == "file_checksum":
            src, ver = fresh()
            p = src / labels_name(src)
            data = bytearray(p.read_bytes())
            data[0] = ord("X") if data[0] != ord("X") else ord("Y")
            p.write_bytes(bytes(data))
            return BadBundle(kind, "labels.txt changed, same size", _tar(src, out), ver, ("checksum_mismatch",))
        if kind == "unlisted_member":
            src, ver = fresh()
            (src / "extra.bin").write_bytes(b"not listed\n")
            return BadBundle(kind, "a file the manifest does not list", _tar(src, out), ver,
                             ("unlisted_member", "unexpected_file"))
        if kind == "missing_file":
            src, ver = fresh()
            return BadBundle(kind, "labels.txt listed but absent", _tar(src, out, skip=(labels_name(src),)), ver,
                             ("missing_file",))
        if kind == "no_manifest":
            src, ver = fresh()
            return BadBundle(kind, "no manifest.json", _tar(src, out, skip=("manifest.json", "manifest.sig")), ver,
                             ("bad_manifest",))
        if kind == "manifest_not_json":
            src, ver = fresh()
            (src / "manifest.json").write_text("{not json")
            return BadBundle(kind, "manifest.json is not JSON", _tar(src, out), ver, ("bad_manifest",))
        if kind == "name_mismatch":
            src, ver = fresh(signed=False)
            m = _manifest(src)
            m["name"] = "someone_else"
            _write_manifest(src, m, signer)
            return BadBundle(kind, "a bundle of model someone_else deployed as mobilenet_v2", _tar(src, out), ver,
                             ("name_mismatch", "unknown_model"))
        if kind == "version_mismatch":
            src, ver = fresh()
            return BadBundle(kind, "the bundle is version N, the command says N+1000", _tar(src, out), ver + 1000,
                             ("version_mismatch",))
        if kind == "version_exists":
            src, _ = fresh(signed=False, version=1)
            m = _manifest(src)
            m["metadata"] = {**m.get("metadata", {}), "rebuilt": True}
            _write_manifest(src, m, signer)
            return BadBundle(kind, "version 1 again with other contents", _tar(src, out), 1, ("version_exists",))
        if kind in ("bomb", "bomb_unlisted_size"):
            src, ver = fresh(signed=False)
            n = bomb_mb * 2**20
            m = _manifest(src)
            listed = n if kind == "bomb" else 1024
            digest = _zeros_sha256(n) if kind == "bomb" else hashlib.sha256(bytes(1024)).hexdigest()
            m["files"].append({"path": "blob.bin", "size": listed, "sha256": digest})
            _write_manifest(src, m, signer)
            info = tarfile.TarInfo("blob.bin")
            info.size = n
            arch = _tar(src, folder / f"{kind}.tar.gz", extra=[(info, _Zeros(n))], gz=True)
            what = (f"a {arch.stat().st_size / 1e6:.0f} MB .tar.gz unpacking to {bomb_mb} MiB "
                    + ("(listed in the manifest)" if kind == "bomb" else "(listed as 1 kB)"))
            return BadBundle(kind, what, arch, ver, ("bundle_too_large_unpacked", "size_mismatch", "disk_full"))
        raise ValueError(kind)

    for kind in BAD_KINDS:
        if kinds is None or kind in kinds:
            bad = make(kind)
            if bad is not None:
                yield bad


BAD_KINDS = ("wrong_sha256", "wrong_sha256_url", "larger_than_declared", "larger_than_declared_url",
             "declared_too_large", "unsigned", "other_key", "signature_not_matching", "truncated", "not_an_archive",
             "not_a_model", "input_disagrees", "dotdot_path", "absolute_path", "symlink", "hardlink",
             "file_larger_than_listed", "file_checksum", "unlisted_member", "missing_file", "no_manifest",
             "manifest_not_json", "name_mismatch", "version_mismatch", "version_exists", "bomb", "bomb_unlisted_size")


def r3_bad_bundles(ctx: Ctx, *, bomb_mb: int = 1536, max_unpacked_mb: float | None = None,
                   kinds: set[str] | None = None, fps: float = 10.0) -> dict[str, Any]:
    from edge_agent.config import StoreConfig

    folder = ctx.folder("r3")
    device = "r3"
    broker = Broker(folder / "broker")
    console = Watcher(broker, [f"{ctx.prefix}/{device}/{t}" for t in ("reply", "events", "results/#")])
    store_section: dict[str, Any] = {"trusted_keys": [str(ctx.keypair("a")[1])]}
    if max_unpacked_mb is not None and "max_unpacked_mb" in StoreConfig.model_fields:
        store_section["max_unpacked_mb"] = max_unpacked_mb
    cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), bundle=ctx.bundle(1, key="a"),
                       telemetry_s=5.0, store=store_section)
    store = folder / "store"
    agent = Agent(cfg)
    files = FileServer(ctx.folder("r3"))
    deployer = Deployer(ctx, console, device, files)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        agent.start()
        wait_serving(console, agent, device, since=0.0, n=10)
        time.sleep(1.0)
        for bad in bad_bundles(ctx, 100, bomb_mb=bomb_mb, kinds=kinds):
            before = store_listing(store)
            t0 = time.monotonic()
            archive = bad.archive.relative_to(ctx.folder("r3"))
            cmd_id = deployer.send(bad.archive, bad.version, bad.via, sha256=bad.sha256, size=bad.size,
                                   url_path=archive.as_posix())
            reply = console.reply(cmd_id, 300)
            t1 = time.monotonic()
            deployer.close()
            time.sleep(0.4)
            after = store_listing(store)
            times = [t for t, _ in console.results(device, t0 - 2.0)]
            versions = {p.get("version") for _, p in console.results(device, t0)}
            code = None if reply is None else ("ok" if reply.get("ok") else reply.get("error", {}).get("code"))
            row = {"kind": bad.kind, "via": bad.via, "what": bad.what, "code": code, "expected": list(bad.expect),
                   "seconds": round(t1 - t0, 2), "max_result_gap_s": round(gaps_between(times, t0, t1 + 0.3), 2),
                   "served_by": sorted(v for v in versions if v is not None),
                   "left_on_disk": sorted(after - before), "removed_from_disk": sorted(before - after),
                   "archive_mb": round(bad.archive.stat().st_size / 1e6, 2)}
            rows.append(row)
            progress(f"R3 {bad.kind}: {code} in {row['seconds']} s, largest result gap {row['max_result_gap_s']} s, "
                     f"{len(row['left_on_disk'])} path(s) left")
            if code not in bad.expect:
                failures.append(f"{bad.kind}: got {code}, expected {' or '.join(bad.expect)}")
            if row["max_result_gap_s"] > PAUSE_S:
                failures.append(f"{bad.kind}: results paused {row['max_result_gap_s']} s")
            if row["left_on_disk"]:
                failures.append(f"{bad.kind}: left {row['left_on_disk'][:5]}")
            if row["served_by"] != [1]:
                failures.append(f"{bad.kind}: results came from versions {row['served_by']}")
            if code == "ok":  # accepted: put v1 back and remove it so the next kind starts from the same store
                console.command(f"{ctx.prefix}/{device}/cmd", "activate", {"model": MODEL_NAME, "version": 1})
                time.sleep(1.0)
                console.command(f"{ctx.prefix}/{device}/cmd", "remove", {"model": MODEL_NAME, "version": bad.version})
                time.sleep(1.0)
            if not agent.alive:
                failures.append(f"the agent exited during {bad.kind}")
                break
        stopped = agent.stop()
    finally:
        deployer.close()
        agent.stop()
        files.close()
        console.close()
        broker.stop()
        for p in ctx.work.glob("r3/bad-*"):
            shutil.rmtree(p, ignore_errors=True)
    codes = [r["code"] for r in rows]
    distinct = len(set(codes))
    out = {"scenario": "R3", "what": "bad bundles deployed over MQTT to an agent with [store] trusted_keys",
           "kinds": len(rows), "refused_as_expected": sum(r["code"] in r["expected"] for r in rows),
           "distinct_codes": distinct, "bomb_mb": bomb_mb,
           "max_result_gap_s": max((r["max_result_gap_s"] for r in rows), default=None),
           "paths_left": sum(len(r["left_on_disk"]) for r in rows), "agent_exit": stopped, "rows": rows}
    return verdict(out, failures)


# -- R4: fuzzed commands --------------------------------------------------------------------------------


def _reject(name: str) -> Any:
    raise ValueError(name)


def readable_id(payload: bytes, max_payload: int = 256 * 1024) -> str | None:
    """The command id the agent can read from ``payload`` (and so answers
    with), by the protocol's rules; None when it cannot (answered with
    ``id: null``, or shed and counted)."""
    from edge_agent.comms.commands import TOKEN_RE

    if len(payload) > max_payload:
        return None
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    cmd_id = data.get("id")
    return cmd_id if isinstance(cmd_id, str) and TOKEN_RE.fullmatch(cmd_id) else None


def busy_readable_id(payload: bytes, max_payload: int = 256 * 1024) -> str | None:
    """The id a ``busy`` refusal reads (plain ``json.loads``, which takes
    ``NaN``): a few messages the dispatcher answers with ``id: null`` get
    their id back when they are refused as busy instead."""
    from edge_agent.comms.commands import TOKEN_RE

    if len(payload) > max_payload:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    cmd_id = data.get("id") if isinstance(data, dict) else None
    return cmd_id if isinstance(cmd_id, str) and TOKEN_RE.fullmatch(cmd_id) else None


def fuzz_messages(rng: random.Random, n: int, tag: str) -> list[tuple[str, bytes]]:
    """``n`` (kind, payload) pairs: valid commands, repeated ids, unknown
    commands, wrong types, random JSON, huge strings, deep nesting, binary,
    NaN, empty. None of them changes the device (a valid ``set``,
    ``activate``... is never generated)."""
    counter = [0]
    sent_ids: list[bytes] = []

    def uid() -> str:
        counter[0] += 1
        return f"{tag}{counter[0]}"

    def rand_json(depth: int = 0) -> Any:
        kind = rng.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return rng.randint(-2**40, 2**40)
        if kind == 1:
            return rng.random() * 1e6
        if kind == 2:
            return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 20)))
        if kind == 3:
            return rng.choice([None, True, False])
        if kind in (4, 5):
            return {rng.choice(["id", "cmd", "args", "ts", "sig", "x", "version", "model", "ü"]): rand_json(depth + 1)
                    for _ in range(rng.randint(0, 5))}
        return [rand_json(depth + 1) for _ in range(rng.randint(0, 5))]

    def wrong_types() -> dict[str, Any]:
        return rng.choice([
            lambda: {"id": rng.randint(0, 10**6), "cmd": "ping"},
            lambda: {"id": True, "cmd": "status"},
            lambda: {"id": uid(), "cmd": ["ping"]},
            lambda: {"id": uid(), "cmd": "ping", "args": "none"},
            lambda: {"id": uid(), "cmd": "ping", "args": {"unexpected": 1}},
            lambda: {"id": uid(), "cmd": "activate", "args": {"model": MODEL_NAME, "version": "3"}},
            lambda: {"id": uid(), "cmd": "activate", "args": {"model": MODEL_NAME, "version": 0}},
            lambda: {"id": uid(), "cmd": "rollback", "args": {"model": 7}},
            lambda: {"id": uid(), "cmd": "remove", "args": {"model": MODEL_NAME, "version": -1}},
            lambda: {"id": uid(), "cmd": "set", "args": {"source": "cam", "fps": "fast"}},
            lambda: {"id": uid(), "cmd": "set", "args": {"source": "cam", "treshold": 0.5}},
            lambda: {"id": uid(), "cmd": "deploy", "args": {"model": MODEL_NAME, "version": 2, "url": "ftp://x/y",
                                                            "sha256": "0" * 64, "size": 10}},
            lambda: {"id": uid(), "cmd": "deploy", "args": {"model": MODEL_NAME, "version": 2, "sha256": "zz"}},
            lambda: {"id": uid(), "cmd": "", "args": {}},
            lambda: {"id": "", "cmd": "ping"},
            lambda: {"id": "bad id with spaces", "cmd": "ping"},
            lambda: {"cmd": "ping"},
        ])()

    makers: list[tuple[str, int, Callable[[], bytes]]] = [
        ("valid", 14, lambda: json.dumps({"id": uid(), "cmd": rng.choice(["ping", "status"])}).encode()),
        ("repeated_id", 6, lambda: rng.choice(sent_ids) if sent_ids else
         json.dumps({"id": uid(), "cmd": "ping"}).encode()),
        ("unknown_command", 5, lambda: json.dumps({"id": uid(), "cmd": rng.choice(["reboot", "rm -rf /", "pïng☃",
                                                                                  "PING", "x" * 64])}).encode()),
        ("wrong_types", 20, lambda: json.dumps(wrong_types()).encode()),
        ("random_json", 12, lambda: json.dumps(rand_json()).encode()),
        ("random_object", 8, lambda: json.dumps({"id": rng.choice([uid(), 5, None, "é" * 3]), **{
            "".join(rng.choice("abcxyz") for _ in range(3)): rand_json(2)
            for _ in range(rng.randint(0, 6))}}).encode()),
        ("huge_string", 3, lambda: json.dumps({"id": uid(), "cmd": "ping",
                                               "args": {"x": "a" * rng.randint(10_000, 200_000)}}).encode()),
        ("over_limit", 1, lambda: json.dumps({"id": uid(), "cmd": "ping", "pad": "b" * 300_000}).encode()),
        ("huge_id", 2, lambda: json.dumps({"id": "i" * rng.randint(129, 5000), "cmd": "ping"}).encode()),
        ("deep_nesting", 3, lambda: rng.choice([
            b"[" * rng.randint(1_000, 100_000),
            ('{"id": "%s", "cmd": "ping", "args": ' % uid()).encode() + b'{"a":' * 3000 + b"1" + b"}" * 3001,
            b'{"a":' * 50_000])),
        ("binary", 15, lambda: rng.randbytes(rng.randint(1, 2000))),
        ("nan", 3, lambda: ('{"id": "%s", "cmd": "ping", "args": {"v": %s}}' % (uid(), rng.choice(
            ["NaN", "Infinity", "-Infinity"]))).encode()),
        ("empty", 2, lambda: rng.choice([b"", b" ", b"null", b"{}", b"[]", b'""'])),
        ("bad_utf8", 6, lambda: b'{"id": "' + uid().encode() + b'", "cmd": "ping\xff\xfe"}'),
    ]
    kinds = [k for k, w, _ in makers for _ in range(w)]
    by_kind = {k: f for k, _, f in makers}
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        payload = by_kind[kind]()
        if kind == "valid":
            sent_ids.append(payload)
        out.append((kind, payload))
    return out


def r4_fuzz(ctx: Ctx, *, fuzz: int = 10_000, bursts: int = 3, burst_share: float = 0.6, pace_per_s: float = 200.0,
            seed: int = 4, fps: float = 10.0) -> dict[str, Any]:
    folder = ctx.folder("r4")
    device = "r4"
    broker = Broker(folder / "broker")
    console = Watcher(broker, [f"{ctx.prefix}/{device}/{t}" for t in ("reply", "telemetry", "results/#")])
    cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), telemetry_s=1.0)
    agent = Agent(cfg)
    rng = random.Random(seed)
    tag = f"z{uuid.uuid4().hex[:5]}-"
    messages = fuzz_messages(rng, fuzz, tag)
    in_bursts = int(len(messages) * burst_share) if bursts else 0
    burst_size = in_bursts // bursts if bursts else 0
    topic = f"{ctx.prefix}/{device}/cmd"
    pings: list[dict[str, Any]] = []
    failures: list[str] = []
    samples: list[float] = []
    stop_sampling = threading.Event()

    def ping(after: str) -> None:
        """A ping at once (answered: busy counts), then pings until one is
        run (``ok``): how long until the agent takes commands again."""
        t = time.monotonic()
        row: dict[str, Any] = {"after": after}
        while time.monotonic() - t < 30:
            cmd_id, _ = console.command(topic, "ping", cmd_id=f"ping-{uuid.uuid4().hex[:8]}")
            reply = console.reply(cmd_id, 30)
            code = None if reply is None else ("ok" if reply.get("ok") else reply["error"]["code"])
            if "seconds" not in row:
                row["seconds"], row["code"] = (round(time.monotonic() - t, 3) if reply else None), code
            if code != "busy":
                row["ok_after_s"] = round(time.monotonic() - t, 3) if code == "ok" else None
                break
            time.sleep(0.1)
        pings.append(row)

    def sample() -> None:
        while not stop_sampling.wait(0.5):
            with suppress(Exception):
                samples.append(agent.usage()["rss_mb"])

    try:
        agent.start()
        wait_serving(console, agent, device, since=0.0, n=10)
        time.sleep(3.0)
        before = agent.usage()
        threading.Thread(target=sample, daemon=True).start()
        t_start = time.monotonic()
        sent = 0
        for b in range(bursts):
            chunk = messages[sent:sent + burst_size]
            infos = [console.client.publish(topic, p, qos=1) for _, p in chunk]
            for info in infos:
                info.wait_for_publish(120)
            sent += len(chunk)
            ping(f"burst {b + 1} ({len(chunk)})")
            progress(f"R4 burst {b + 1}/{bursts}: {len(chunk)} sent; ping answered in {pings[-1]['seconds']} s")
        paced = messages[sent:]
        next_at = time.monotonic()
        for i, (_, payload) in enumerate(paced):
            next_at += 1.0 / pace_per_s
            time.sleep(max(0.0, next_at - time.monotonic()))
            console.client.publish(topic, payload, qos=1)
            if (i + 1) % 1000 == 0:
                ping(f"paced {i + 1}")
        if paced:
            ping(f"paced end ({len(paced)})")
            progress(f"R4 paced: {len(paced)} sent at {pace_per_s:g}/s; last ping in {pings[-1]['seconds']} s")
        t_end = time.monotonic()
        # settle: until no reply arrived for 5 s (bounded)
        last_count, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            count = sum(len(v) for v in console.replies.values())
            if count != last_count:
                last_count, stable_since = count, time.monotonic()
            elif time.monotonic() - stable_since >= 5.0:
                break
            time.sleep(0.5)
        time.sleep(2.0)
        after = agent.usage()
        alive = agent.alive
        stop_sampling.set()
        stopped = agent.stop()
    finally:
        stop_sampling.set()
        agent.stop()
        console.close()
        broker.stop()
    # -- accounting
    expected: dict[str, int] = {}
    either: dict[str, int] = {}  # answered with their id when refused as busy, else with id null
    unreadable = 0
    kinds: dict[str, int] = {}
    for kind, payload in messages:
        kinds[kind] = kinds.get(kind, 0) + 1
        rid = readable_id(payload)
        if rid is None:
            unreadable += 1
            busy_id = busy_readable_id(payload)
            if busy_id is not None:
                either[busy_id] = either.get(busy_id, 0) + 1
        else:
            expected[rid] = expected.get(rid, 0) + 1
    ping_ids = {k for k in console.replies if isinstance(k, str) and k.startswith("ping-")}
    got = {k: len(v) for k, v in console.replies.items() if k is not None and k not in ping_ids}
    missing = {k: n - got.get(k, 0) for k, n in expected.items() if got.get(k, 0) < n}
    extra = {k: n - expected.get(k, 0) - either.get(k, 0) for k, n in got.items()
             if n > expected.get(k, 0) + either.get(k, 0)}
    busy_with_id = sum(min(got.get(k, 0) - expected.get(k, 0), n) for k, n in either.items()
                       if got.get(k, 0) > expected.get(k, 0))
    null_replies = len(console.replies.get(None, []))
    shed = {}
    for _, tel in console.on("/telemetry"):
        shed = tel.get("commands_shed", shed)
    codes: dict[str, int] = {}
    for k, replies in console.replies.items():
        if k in ping_ids:
            continue
        for _, r in replies:
            c = "ok" if r.get("ok") else r.get("error", {}).get("code", "?")
            codes[c] = codes.get(c, 0) + 1
    result_times = [t for t, _ in console.results(device)]
    # The criterion: a ping after each burst (and after the paced stream)
    # is answered within 2 s. Pings in the middle of the paced stream are
    # figures: how far behind the output runs while commands keep coming.
    after_bursts = [p for p in pings if not p["after"].startswith("paced ") or p["after"].startswith("paced end")]
    slow_pings = [p for p in after_bursts if p["seconds"] is None or p["seconds"] > 2.0]
    during = [p["seconds"] for p in pings if p not in after_bursts and p["seconds"] is not None]
    out = {"scenario": "R4", "what": "fuzzed commands in bursts and paced",
           "messages": len(messages), "in_bursts": in_bursts, "bursts": bursts, "paced": len(messages) - in_bursts,
           "pace_per_s": pace_per_s, "kinds": kinds, "readable_ids": sum(expected.values()), "unreadable": unreadable,
           "answered_readable": sum(min(got.get(k, 0), n) for k, n in expected.items()),
           "missing_replies": sum(missing.values()), "extra_replies": sum(extra.values()),
           "null_id_replies": null_replies, "unreadable_answered_busy_with_id": busy_with_id, "shed": shed,
           "reply_codes": dict(sorted(codes.items())),
           "pings": pings, "max_ping_while_paced_s": max(during, default=None),
           "rss_mb": {"before": before["rss_mb"], "after": after["rss_mb"], "peak": max(samples) if samples else None},
           "fds": {"before": before["fds"], "after": after["fds"]},
           "threads": {"before": before["threads"], "after": after["threads"]},
           "max_result_gap_s": round(gaps_between(result_times, t_start, t_end), 2),
           "seconds": round(t_end - t_start, 1), "agent_alive": alive, "agent_exit": stopped,
           "broker_drops": broker.drops(), "missing_examples": list(missing)[:5], "extra_examples": list(extra)[:5]}
    if not alive:
        failures.append("the agent died")
    if missing:
        failures.append(f"{sum(missing.values())} message(s) with a readable id never answered "
                        f"(e.g. {list(missing)[:3]})")
    if extra:
        failures.append(f"{sum(extra.values())} extra repl(ies) (e.g. {list(extra)[:3]})")
    accounted = null_replies + int(shed.get("unreadable", 0)) + busy_with_id
    if accounted != unreadable:
        failures.append(f"{unreadable} unreadable message(s), {null_replies} answered with id null + "
                        f"{shed.get('unreadable', 0)} shed + {busy_with_id} answered busy with the id")
    if slow_pings:
        failures.append(f"{len(slow_pings)} ping(s) after a burst not answered within 2 s: {slow_pings}")
    if any(p.get("ok_after_s") is None for p in after_bursts):
        failures.append("after a burst the agent did not run a ping within 30 s (only busy)")
    if "internal_error" in codes:
        failures.append(f"{codes['internal_error']} internal_error repl(ies)")
    return verdict(out, failures)


# -- R5: the camera gone and back -----------------------------------------------------------------------


def _ffmpeg_children(agent: Agent) -> list[Any]:
    return [c for c in agent.children() if c.name().startswith("ffmpeg")]


def _resumed(console: Watcher, device: str, after_wall: float, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` to the first result of a frame captured after
    ``after_wall``; None when none came within ``timeout``."""
    got = console.first_result(device, after_wall=after_wall, since=since, timeout=timeout)
    return round(got[0] - since, 2) if got else None


def r5_camera_faults(ctx: Ctx, *, repeats: int = 3, down_s: float = 3.0, fps: float = 10.0,
                     parts: tuple[str, ...] = ("pipe", "stream", "file")) -> dict[str, Any]:
    folder = ctx.folder("r5")
    broker = Broker(folder / "broker")
    console = Watcher(broker, [f"{ctx.prefix}/+/results/#"])
    failures: list[str] = []
    out: dict[str, Any] = {"scenario": "R5", "what": "camera gone and back", "repeats": repeats, "down_s": down_s}
    try:
        if "pipe" in parts:  # the camera program killed: the source restarts it
            device = "r5-pipe"
            agent = Agent(agent_config(ctx, folder, device, broker, source=pipe_source(ctx.video, fps),
                                       telemetry_s=5.0))
            rows = []
            try:
                agent.start()
                wait_serving(console, agent, device, since=0.0, n=5)
                for i in range(repeats):
                    programs = _ffmpeg_children(agent)
                    if not programs:
                        failures.append("pipe: no ffmpeg child of the agent to kill")
                        break
                    t, wall = time.monotonic(), time.time()
                    for p in programs:
                        p.kill()
                    took = _resumed(console, device, wall, t, 60)
                    rows.append(took)
                    progress(f"R5 pipe program killed ({i + 1}/{repeats}): results resumed after {took} s")
                    time.sleep(3.0)
                alive = agent.alive
            finally:
                agent.stop()
            out["pipe_killed_resume_s"] = rows
            if not alive or None in rows:
                failures.append(f"pipe: results did not resume after the program was killed ({rows})")
        if "stream" in parts:  # a stream server stopped and started again
            device = "r5-stream"
            port = free_port()
            serve = [*FFMPEG, "-re", "-stream_loop", "-1", "-i", str(ctx.video), "-c:v", "copy", "-f", "nut",
                     f"tcp://127.0.0.1:{port}?listen=1"]
            server = subprocess.Popen(serve, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            src = {"name": "cam", "uri": f"tcp://127.0.0.1:{port}", "model": MODEL_NAME, "fps": fps,
                   "stall_timeout_s": 2.0}
            agent = Agent(agent_config(ctx, folder, device, broker, source=src, telemetry_s=5.0))
            rows2 = []
            try:
                agent.start()
                wait_serving(console, agent, device, since=0.0, n=5)
                for i in range(repeats):
                    server.kill()
                    server.wait(10)
                    time.sleep(down_s)
                    server = subprocess.Popen(serve, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                    t_up, wall = time.monotonic(), time.time()
                    took = _resumed(console, device, wall, t_up, 90)
                    rows2.append(took)
                    progress(f"R5 stream server killed for {down_s:g} s ({i + 1}/{repeats}): results resumed "
                             f"{took} s after it was back")
                    time.sleep(3.0)
                alive = agent.alive
            finally:
                agent.stop()
                server.kill()
                server.wait(10)
            out["stream_server_restarted_resume_s"] = rows2
            if not alive or None in rows2:
                failures.append(f"stream: results did not resume after the server came back ({rows2})")
        if "file" in parts:  # a looping video file replaced, and removed then put back
            device = "r5-file"
            video = folder / "cam.avi"
            shutil.copy(ctx.video, video)
            agent = Agent(agent_config(ctx, folder, device, broker, source=video_source(video, fps), telemetry_s=5.0))
            replaced, restored = [], []
            try:
                agent.start()
                wait_serving(console, agent, device, since=0.0, n=5)
                for i in range(repeats):
                    t = time.monotonic()
                    tmp = folder / "cam.avi.new"
                    shutil.copy(ctx.video, tmp)
                    os.replace(tmp, video)  # as rsync does
                    time.sleep(12.0)  # past the end of the 10 s video: the source opened the new file
                    gap = gaps_between([x for x, _ in console.results(device, t - 5)], t, time.monotonic())
                    replaced.append(round(gap, 2))
                    # removed: the source notices at the end of the video and waits; then put back
                    video.unlink()
                    t_gone = time.monotonic()
                    stopped = wait_until(lambda: console.results(device, t_gone) and
                                         time.monotonic() - console.results(device, t_gone)[-1][0] > 2.0, 20, 0.2)
                    tmp.write_bytes(ctx.video.read_bytes())
                    os.replace(tmp, video)
                    t_back, wall = time.monotonic(), time.time()
                    took = _resumed(console, device, wall, t_back, 60)
                    restored.append(took)
                    progress(f"R5 file replaced ({i + 1}/{repeats}): largest gap {replaced[-1]} s; removed "
                             f"({'results stopped' if stopped else 'results never stopped'}) and put back: resumed "
                             f"after {took} s")
                alive = agent.alive
            finally:
                agent.stop()
            out["file_replaced_max_gap_s"] = replaced
            out["file_restored_resume_s"] = restored
            if not alive or None in restored or any(g > PAUSE_S for g in replaced):
                failures.append(f"file: replaced gaps {replaced}, restored resume {restored}")
    finally:
        console.close()
        broker.stop()
    return verdict(out, failures)


# -- R6: soak ----------------------------------------------------------------------------------------------


def _deploy_file(console: Watcher, ctx: Ctx, device: str, archive: Path, version: int, *, activate: bool,
                 sign_key: Path | None = None) -> dict | None:
    args = {"model": MODEL_NAME, "version": version, "url": archive.resolve().as_uri(), "sha256": sha256_of(archive),
            "size": archive.stat().st_size, "activate": activate}
    cmd_id, _ = console.command(f"{ctx.prefix}/{device}/cmd", "deploy", args, sign_key=sign_key)
    return console.reply(cmd_id, 120)


def r6_soak(ctx: Ctx, *, minutes: float = 30.0, fps: float = 10.0, predict_every_s: float = 1.0,
            swap_every_s: float = 60.0, sample_every_s: float = 10.0, warmup_s: float = 120.0) -> dict[str, Any]:
    folder = ctx.folder("r6")
    device = "r6"
    broker = Broker(folder / "broker")
    console = Watcher(broker, [f"{ctx.prefix}/{device}/{t}" for t in ("reply", "telemetry", "results/#")])
    http_port = free_port()
    cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), telemetry_s=2.0,
                       model={"probation_s": 10.0, "probation_frames": 50},
                       http={"enabled": True, "host": "127.0.0.1", "port": http_port})
    agent = Agent(cfg)
    jpeg = (ctx.assets["photos"] / "chelsea.jpg").read_bytes()
    body = json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode()}]}).encode()
    url = f"http://127.0.0.1:{http_port}/v1/models/{MODEL_NAME}:predict"
    stop = threading.Event()
    predicts = {"ok": 0, "failed": 0, "errors": []}
    samples: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []
    failures: list[str] = []

    def predict_loop() -> None:
        while not stop.wait(predict_every_s):
            try:
                req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                ok = bool(answer.get("predictions"))
            except (OSError, ValueError) as exc:
                ok = False
                if len(predicts["errors"]) < 5:
                    predicts["errors"].append(str(exc)[:200])
            predicts["ok" if ok else "failed"] += 1

    def sample_loop(t0: float) -> None:
        while True:
            with suppress(Exception):
                samples.append({"t_s": round(time.monotonic() - t0, 1), **agent.usage()})
            if stop.wait(sample_every_s):
                return

    threads: list[threading.Thread] = []
    try:
        agent.start()
        wait_serving(console, agent, device, since=0.0, n=5)
        reply = _deploy_file(console, ctx, device, ctx.bundle(2, archive=True), 2, activate=False)
        if not (reply or {}).get("ok"):
            raise RuntimeError(f"installing v2 failed: {reply}")
        t0 = time.monotonic()
        threads = [threading.Thread(target=predict_loop, daemon=True), threading.Thread(target=sample_loop, args=(t0,),
                                                                                        daemon=True)]
        for th in threads:
            th.start()
        end = t0 + minutes * 60
        target = 2
        next_swap = t0 + swap_every_s
        while time.monotonic() < end and agent.alive:
            time.sleep(max(0.0, min(next_swap, end) - time.monotonic()))
            if time.monotonic() >= end:
                break
            t = time.monotonic()
            cmd_id, _ = console.command(f"{ctx.prefix}/{device}/cmd", "activate",
                                        {"model": MODEL_NAME, "version": target})
            r = console.reply(cmd_id, 60)
            swaps.append({"to": target, "ok": bool(r and r.get("ok")), "seconds": round(time.monotonic() - t, 2),
                          "code": None if r is None or r.get("ok") else r["error"]["code"]})
            target = 1 if target == 2 else 2
            next_swap += swap_every_s
            minute = (time.monotonic() - t0) / 60
            if len(swaps) % 5 == 0:
                s = samples[-1] if samples else {}
                progress(f"R6 {minute:.1f}/{minutes:g} min: {len(swaps)} swaps, {predicts['ok']} predicts, "
                         f"RSS {s.get('rss_mb')} MB, fds {s.get('fds')}, threads {s.get('threads')}")
        alive = agent.alive
        stop.set()
        for th in threads:
            th.join(35)
        stopped = agent.stop()
    finally:
        stop.set()
        agent.stop()
        console.close()
        broker.stop()
    duration = minutes * 60
    warm = [s for s in samples if warmup_s <= s["t_s"] < warmup_s + 60] or samples[:6]
    last = [s for s in samples if s["t_s"] >= duration - 60] or samples[-6:]

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        return round(statistics.median(r[key] for r in rows), 1) if rows else None

    start = {k: med(warm, k) for k in ("rss_mb", "fds", "threads")}
    final = {k: med(last, k) for k in ("rss_mb", "fds", "threads")}
    growth = round((final["rss_mb"] / start["rss_mb"] - 1) * 100, 2) if start["rss_mb"] and final["rss_mb"] else None
    results = console.results(device)
    times = [t for t, _ in results]
    errors_total = None
    for _, tel in console.on("/telemetry"):
        with suppress(Exception):
            errors_total = tel["sources"]["cam"]["errors_total"]
    out = {"scenario": "R6", "what": f"soak: {fps:g} fps, telemetry every 2 s, an HTTP predict every "
           f"{predict_every_s:g} s, a swap every {swap_every_s:g} s", "minutes": minutes,
           "start_after_warmup": start, "end": final, "rss_growth_percent": growth,
           "first_sample": samples[0] if samples else None,
           "rss_mb_max": max((s["rss_mb"] for s in samples), default=None),
           "results": len(results),
           "max_result_gap_s": round(gaps_between(times, times[0], times[-1]), 2) if times else None,
           "source_errors_total": errors_total, "predicts": predicts, "swaps": len(swaps),
           "swaps_failed": [s for s in swaps if not s["ok"]], "agent_alive": alive, "agent_exit": stopped,
           "samples": samples}
    if not alive:
        failures.append("the agent died")
    if growth is None or growth > 5.0:
        failures.append(f"RSS grew {growth} % ({start['rss_mb']} -> {final['rss_mb']} MB)")
    if start["fds"] is not None and final["fds"] is not None and final["fds"] > start["fds"] + 2:
        failures.append(f"open fds grew {start['fds']} -> {final['fds']}")
    if start["threads"] is not None and final["threads"] is not None and final["threads"] > start["threads"] + 2:
        failures.append(f"threads grew {start['threads']} -> {final['threads']}")
    if predicts["failed"]:
        failures.append(f"{predicts['failed']} HTTP predict(s) failed: {predicts['errors'][:2]}")
    if out["swaps_failed"]:
        failures.append(f"{len(out['swaps_failed'])} swap(s) failed")
    return verdict(out, failures)


# -- R7: security ------------------------------------------------------------------------------------------


def _connects(broker: Broker, *, tls: dict[str, Path] | None = None, auth: tuple[str, str] | None = None,
              timeout: float = 5.0) -> tuple[bool, str]:
    """Whether a client with these credentials gets a successful CONNACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: Any, u: Any, f: Any, reason: Any, p: Any = None) -> None:
        outcome["ok"], outcome["why"] = not reason.is_failure, str(reason)
        done.set()

    client.on_connect = on_connect
    if tls is not None:
        client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["cert"]) if tls.get("cert") else None,
                       keyfile=str(tls["key"]) if tls.get("key") else None)
    if auth is not None:
        client.username_pw_set(*auth)
    try:
        client.connect(broker.host, broker.port, keepalive=5)
        client.loop_start()
        done.wait(timeout)
    except OSError as exc:  # ssl.SSLError is an OSError: the handshake failed
        return False, f"{type(exc).__name__}: {exc}"[:160]
    finally:
        with suppress(Exception):
            client.loop_stop()
        with suppress(Exception):
            client.disconnect()
    if not done.is_set():
        return False, "no CONNACK (the broker closed the connection)"
    return bool(outcome["ok"]), outcome["why"]


def shipped_acl() -> Path | None:
    """The mosquitto ACL shipped in configs/mosquitto/ (None when absent)."""
    path = REPO / "configs" / "mosquitto" / "acl"
    return path if path.is_file() else None


def r7_security(ctx: Ctx, *, fps: float = 5.0, parts: tuple[str, ...] = ("signed", "tls", "acl"),
                max_age_s: float = 600.0) -> dict[str, Any]:
    folder = ctx.folder("r7")
    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"scenario": "R7", "what": "signed commands, client certificates, the shipped ACL"}

    def row(case: str, expect: str, got: str, note: str = "") -> None:
        rows.append({"case": case, "expected": expect, "got": got, "note": note})
        progress(f"R7 {case}: {got}" + (f" ({note})" if note else ""))
        if got != expect:
            failures.append(f"{case}: expected {expect}, got {got}" + (f" ({note})" if note else ""))

    if "signed" in parts:
        device = "r7"
        broker = Broker(folder / "broker")
        console = Watcher(broker, [f"{ctx.prefix}/{device}/{t}" for t in ("reply", "results/#", "status")])
        console_key, console_pub = ctx.keypair("console")
        rogue_key, _ = ctx.keypair("rogue")
        cfg = agent_config(ctx, folder, device, broker, source=video_source(ctx.video, fps), telemetry_s=5.0,
                           commands={"trusted_keys": [str(console_pub)], "max_age_s": max_age_s},
                           model={"probation_s": 1.0, "probation_frames": 5})
        agent = Agent(cfg)
        topic = f"{ctx.prefix}/{device}/cmd"

        def code_of(reply: dict | None) -> str:
            if reply is None:
                return "no reply"
            return "ok" if reply.get("ok") else reply.get("error", {}).get("code", "?")

        def send(payload: bytes | dict, timeout: float = 30.0, index: int = 0) -> str:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            cmd_id = json.loads(data)["id"]
            console.publish(topic, data)
            got = console.wait_for(lambda: len(console.replies.get(cmd_id, [])) > index and console.replies[cmd_id],
                                   timeout)
            return code_of(got[index][1] if got else None)

        def signed(cmd: str, args: dict, *, key: Path = console_key, ts: float | None = None,
                   cmd_id: str | None = None) -> dict:
            from edge_agent.bundles.signing import load_private_key, sign_command

            msg = {"id": cmd_id or f"s-{uuid.uuid4().hex[:10]}", "cmd": cmd, "args": args,
                   "ts": time.time() if ts is None else ts}
            msg["sig"] = sign_command(load_private_key(key), msg["id"], cmd, args, msg["ts"])
            return msg

        def active() -> int | None:
            got = console.wait_for(lambda: [p for _, p in console.on("/status") if p.get("state") == "online"], 10)
            return got[-1].get("models", {}).get(MODEL_NAME, {}).get("active") if got else None

        def active_by_results(since: float) -> int | None:
            got = console.first_result(device, since=since, timeout=15)
            return got[1]["version"] if got else None

        try:
            agent.start()
            wait_serving(console, agent, device, since=0.0, n=3)
            v2 = ctx.bundle(2, archive=True)
            install = signed("deploy", {"model": MODEL_NAME, "version": 2, "url": v2.resolve().as_uri(),
                                        "sha256": sha256_of(v2), "size": v2.stat().st_size, "activate": False})
            row("signed deploy (v2, not activated)", "ok", send(install, 120))
            row("unsigned", "signature_missing", send({"id": f"u-{uuid.uuid4().hex[:8]}", "cmd": "ping", "args": {}}))
            row("signed by an untrusted key", "untrusted_key", send(signed("ping", {}, key=rogue_key)))
            tampered = signed("activate", {"model": MODEL_NAME, "version": 1})
            tampered["args"] = {"model": MODEL_NAME, "version": 2}
            row("args changed after signing", "signature_invalid", send(tampered))
            garbage = signed("ping", {})
            garbage["sig"] = garbage["sig"].split(":")[0] + ":" + base64.b64encode(os.urandom(64)).decode()
            row("forged signature", "signature_invalid", send(garbage))
            row(f"stale (signed {max_age_s + 100:g} s ago)", "stale_command",
                send(signed("ping", {}, ts=time.time() - max_age_s - 100)))
            future = send(signed("ping", {}, ts=time.time() + 86400))
            rows.append({"case": "future-dated (+1 day)", "expected": "ok or refused", "got": future,
                         "note": "protocol.md accepts a ts in the future (a device without a clock before NTP)"})
            progress(f"R7 future-dated: {future}")
            first = signed("activate", {"model": MODEL_NAME, "version": 2})
            first_bytes = json.dumps(first).encode()
            row("signed activate v2", "ok", send(first_bytes))
            row("signed activate v1", "ok", send(signed("activate", {"model": MODEL_NAME, "version": 1})))
            t = time.monotonic()
            replay = send(first_bytes, index=1)
            time.sleep(2.0)
            serving = active_by_results(time.monotonic())
            row("replay of 'activate v2' (same id and sig), agent running", "v1 serves",
                f"v{serving} serves", f"reply {replay} (the first reply again)")
            agent.stop()
            agent.start()
            t = time.monotonic()
            wait_serving(console, agent, device, since=t, n=3)
            replay = send(first_bytes, index=2)
            time.sleep(2.0)
            serving = active_by_results(time.monotonic())
            row("replay of 'activate v2' after an agent restart", "v1 serves", f"v{serving} serves", f"reply {replay}")
            alive = agent.alive
            if not alive:
                failures.append("the agent died")
        finally:
            agent.stop()
            console.close()
            broker.stop()

    if "tls" in parts:
        from edge_agent.testing import make_certs

        certs = make_certs(folder / "certs", ["r7-dev", "r7-console"])
        broker = Broker(folder / "broker-tls", tls=certs["broker"])
        ok, why = _connects(broker, tls={"ca": certs["broker"]["ca"]})
        row("TLS client without a certificate", "refused", "refused" if not ok else "connected", why)
        ok, why = _connects(broker, tls=certs["rogue"])
        row("TLS client with a certificate from another CA", "refused", "refused" if not ok else "connected", why)
        ok, why = _connects(broker)
        row("plain TCP client on the TLS port", "refused", "refused" if not ok else "connected", why)
        ok, why = _connects(broker, tls=certs["r7-console"])
        row("TLS client with a certificate of the CA", "connected", "connected" if ok else "refused", why)
        c = certs["r7-dev"]
        device = "r7-dev"
        tls = {"ca_certs": str(c["ca"]), "certfile": str(c["cert"]), "keyfile": str(c["key"])}
        cfg = agent_config(ctx, folder, device, broker, source=None, telemetry_s=5.0, mqtt={"tls": tls})
        agent = Agent(cfg)
        console = Watcher(broker, [f"{ctx.prefix}/{device}/reply"], tls=certs["r7-console"])
        try:
            agent.start()
            cmd_id = None
            for _ in range(30):  # until the agent is connected and subscribed
                cmd_id, _ = console.command(f"{ctx.prefix}/{device}/cmd", "ping")
                if console.reply(cmd_id, 2.0):
                    break
            row("the agent over mutual TLS answers a ping", "ok", "ok" if cmd_id and console.reply(cmd_id, 1.0) else
                "no reply")
        finally:
            agent.stop()
            console.close()
            broker.stop()

    if "acl" in parts:
        shipped = shipped_acl()
        if shipped is None:
            rows.append({"case": "shipped ACL (configs/mosquitto/acl)", "expected": "confines each device",
                         "got": "absent", "note": "not shipped yet: not tested"})
            failures.append("no mosquitto ACL shipped in configs/mosquitto/: not tested")
        else:
            out["acl"] = str(shipped.relative_to(REPO))
            r7_acl(ctx, folder / "acl", shipped, row)
    out["rows"] = rows
    return verdict(out, failures)


def r7_acl(ctx: Ctx, folder: Path, acl: Path, row: Callable[..., None]) -> None:
    """The shipped ACL as shipped (its prefix is ``edge``; user name =
    device_id, a password each): devices ``d1`` and ``d2``, the ``console``.
    Each refusal is checked against a positive control on the same
    connections, so "nothing arrived" means the broker refused it."""
    prefix = "edge"
    users = {"d1": "pw-d1", "d2": "pw-d2", "console": "pw-console"}
    broker = Broker(folder / "broker", users=users, extra=[f"acl_file {acl}"])
    clients: list[Watcher] = []

    def client(user: str, topics: list[str]) -> Watcher:
        w = Watcher(broker, topics, auth=(user, users[user]))
        clients.append(w)
        return w

    def arrived(w: Watcher, topic: str, marker: str, timeout: float) -> bool:
        return bool(w.wait_for(lambda: any(t == topic and marker in json.dumps(p) for _, t, p in w.messages), timeout))

    try:
        ok, why = _connects(broker)
        row("ACL broker: anonymous client", "refused", "refused" if not ok else "connected", why)
        console = client("console", [f"{prefix}/#"])
        spy = client("d1", [f"{prefix}/d2/cmd", f"{prefix}/d2/results/#", f"{prefix}/d1/cmd"])
        # a device reading another device's commands (positive control: its own)
        console.publish(f"{prefix}/d2/cmd", json.dumps({"id": "for-d2", "cmd": "ping"}))
        console.publish(f"{prefix}/d1/cmd", json.dumps({"id": "for-d1", "cmd": "ping"}))
        own = arrived(spy, f"{prefix}/d1/cmd", "for-d1", 5)
        row("ACL: d1 reads its own commands", "delivered", "delivered" if own else "not delivered")
        row("ACL: d1 subscribes to d2's commands", "nothing", "received" if arrived(spy, f"{prefix}/d2/cmd", "for-d2",
                                                                                  1.0) else "nothing")
        # a device publishing under another device (positive control: under its own)
        d2 = client("d2", [f"{prefix}/d2/cmd"])
        marker = uuid.uuid4().hex
        spy.publish(f"{prefix}/d2/results/cam", json.dumps({"forged": marker}))
        spy.publish(f"{prefix}/d2/status", json.dumps({"state": "offline", "forged": marker}))
        spy.publish(f"{prefix}/d2/cmd", json.dumps({"id": f"x{marker[:8]}", "cmd": "deploy", "forged": marker}))
        spy.publish(f"{prefix}/all/cmd", json.dumps({"id": f"y{marker[:8]}", "cmd": "rollback", "forged": marker}))
        spy.publish(f"{prefix}/d1/results/cam", json.dumps({"own": marker}))
        own = arrived(console, f"{prefix}/d1/results/cam", marker, 5)
        row("ACL: d1 publishes its own results", "delivered", "delivered" if own else "not delivered")
        time.sleep(1.0)
        for what, topic in (("results", f"{prefix}/d2/results/cam"), ("status", f"{prefix}/d2/status"),
                            ("a command", f"{prefix}/d2/cmd"), ("a fleet-wide command", f"{prefix}/all/cmd")):
            seen = arrived(console, topic, marker, 0.2) or arrived(d2, topic, marker, 0.2)
            row(f"ACL: d1 publishes {what} on {topic}", "dropped", "delivered" if seen else "dropped")
        # the real agent works under it
        cfg = agent_config(ctx, folder, "d1", broker, source=None, telemetry_s=5.0,
                           mqtt={"topic_prefix": prefix, "username": "d1", "password": users["d1"]})
        spy.close()
        clients.remove(spy)
        agent = Agent(cfg)
        try:
            agent.start()
            answered = None
            for _ in range(30):
                cmd_id, _ = console.command(f"{prefix}/d1/cmd", "ping")
                answered = console.reply(cmd_id, 2.0)
                if answered:
                    break
            row("ACL: the real agent as d1 answers a ping", "ok", "ok" if answered and answered.get("ok") else
                "no reply")
        finally:
            agent.stop()
    finally:
        for w in clients:
            w.close()
        broker.stop()


# -- the run ------------------------------------------------------------------------------------------------


def summary_row(r: dict[str, Any]) -> str:
    """One line of figures per scenario, for the table."""
    s = r["scenario"]
    if s == "R1":
        return (f"{r['restarts']} restarts: results {r['results']['unique']} ({r['results']['missing']} lost, "
                f"{r['results']['duplicates']} dup), telemetry {r['telemetry']['unique']} ({r['telemetry']['missing']} "
                f"lost, {r['telemetry']['duplicates']} dup); fresh result {r['first_fresh_result_s']['median']} s "
                f"(max {r['first_fresh_result_s']['max']}) after the broker; {r['replayed_total']} replayed")
    if s == "R2":
        return (f"{r['kills']} kills: {r['runs_ok']} consistent, serving {r['serving_after_restart']}, back in "
                f"{r['restart_to_serving_s']['median']} s (max {r['restart_to_serving_s']['max']}); interrupted "
                f"deploys answered: {r['interrupted_deploys_replied_after_restart']}; versions left "
                f"{r['versions_on_disk_at_end']}")
    if s == "R3":
        return (f"{r['kinds']} kinds: {r['refused_as_expected']} refused with their code ({r['distinct_codes']} "
                f"distinct), largest result gap {r['max_result_gap_s']} s, {r['paths_left']} path(s) left")
    if s == "R4":
        return (f"{r['messages']} messages: {r['answered_readable']}/{r['readable_ids']} answered, "
                f"{r['missing_replies']} missing, {r['extra_replies']} extra, {r['null_id_replies']} id-null + "
                f"{r['shed'].get('unreadable', 0)} shed of {r['unreadable']} unreadable; first ping answered "
                f"{[p['seconds'] for p in r['pings']]} s, run {[p.get('ok_after_s') for p in r['pings']]} s; "
                f"RSS {r['rss_mb']['before']} -> {r['rss_mb']['after']} MB")
    if s == "R5":
        parts = []
        for key, label in (("pipe_killed_resume_s", "pipe killed"), ("stream_server_restarted_resume_s", "server back"),
                           ("file_replaced_max_gap_s", "file replaced (gap)"), ("file_restored_resume_s", "file back")):
            if key in r:
                parts.append(f"{label} {r[key]} s")
        return "; ".join(parts)
    if s == "R6":
        a, b = r["start_after_warmup"], r["end"]
        return (f"{r['minutes']:g} min: RSS {a['rss_mb']} -> {b['rss_mb']} MB ({r['rss_growth_percent']} %), fds "
                f"{a['fds']} -> {b['fds']}, threads {a['threads']} -> {b['threads']}; {r['predicts']['ok']} predicts, "
                f"{r['swaps']} swaps, largest result gap {r['max_result_gap_s']} s")
    if s == "R7":
        return "; ".join(f"{x['case']}: {x['got']}" for x in r["rows"])
    return ""


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["Faults (benchmarks/faults.py): the real agent and a real mosquitto on loopback", ""]
    for r in runs:
        lines.append(f"{r['scenario']}  {r['verdict'].upper():<4}  {r['what']}")
        lines.append(f"      {summary_row(r)}")
        for f in r["failures"]:
            lines.append(f"      FAIL: {f}")
    return "\n".join(lines)


def checkout() -> dict[str, Any]:
    """The commit measured, and the product files changed on top of it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "edge_agent").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "edge_agent_changed": changed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run, e.g. R1,R3 (default: all)")
    p.add_argument("--restarts", type=int, default=20, help="R1: broker restarts")
    p.add_argument("--broker-down-s", type=float, default=2.0, help="R1: seconds the broker stays down")
    p.add_argument("--kills", type=int, default=50, help="R2: agent kills during deploys")
    p.add_argument("--bomb-mb", type=int, default=1536, help="R3: what the decompression bombs unpack to (MiB)")
    p.add_argument("--fuzz", type=int, default=10_000, help="R4: fuzzed commands")
    p.add_argument("--bursts", type=int, default=3, help="R4: bursts (60 %% of the commands), the rest paced")
    p.add_argument("--pace", type=float, default=200.0, help="R4: paced commands per second")
    p.add_argument("--camera-faults", type=int, default=3, help="R5: repeats of each camera fault")
    p.add_argument("--soak-minutes", type=float, default=30.0, help="R6: soak length")
    p.add_argument("--swap-every-s", type=float, default=60.0, help="R6: seconds between swaps")
    p.add_argument("--seed", type=int, default=12, help="R2 and R4: random seed")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one, deleted afterwards)")
    p.add_argument("--json", action="store_true", help="JSON only")
    args = p.parse_args()
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    ctx = Ctx(work)
    measured = checkout()  # at the start: each agent runs the code of the tree as it is when it starts
    info = machine_info(mosquitto=subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                                                 capture_output=True, text=True).stdout.splitlines()[0])
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "R1": lambda: r1_broker_restarts(ctx, restarts=args.restarts, down_s=args.broker_down_s),
        "R2": lambda: r2_kill_during_deploys(ctx, kills=args.kills, seed=args.seed),
        "R3": lambda: r3_bad_bundles(ctx, bomb_mb=args.bomb_mb),
        "R4": lambda: r4_fuzz(ctx, fuzz=args.fuzz, bursts=args.bursts, pace_per_s=args.pace, seed=args.seed),
        "R5": lambda: r5_camera_faults(ctx, repeats=args.camera_faults),
        "R6": lambda: r6_soak(ctx, minutes=args.soak_minutes, swap_every_s=args.swap_every_s),
        "R7": lambda: r7_security(ctx),
    }
    runs = []
    try:
        for name in only:
            progress(f"{name} (load {loadavg()})")
            t0 = time.monotonic()
            try:
                r = runners[name]()
            except Exception as exc:  # a scenario that could not run says why; the others still run
                import traceback

                traceback.print_exc()
                r = verdict({"scenario": name, "what": "(did not complete)", "error": repr(exc)[:2000]},
                            [f"the scenario did not complete: {exc!r}"[:500]])
            finally:
                cleanup()
            r["seconds"] = round(time.monotonic() - t0, 1)
            r["loadavg_after"] = loadavg()
            runs.append(r)
            progress(f"{name}: {r['verdict']} in {r['seconds']} s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "faults", "machine": info, "checkout": measured, "runs": runs}
    emit(report, table(runs), json_only=args.json)
    return 0 if all(r["verdict"] == "pass" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
