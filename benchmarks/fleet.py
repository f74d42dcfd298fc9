"""Fleet deploy: one ~4 MB bundle to N devices over MQTT, broadcast (one
transfer for all, the console's way) against unicast (one transfer per
device), through one mosquitto on a loopback port.

Setup. Each simulated device is the real agent's MQTT side: an
``edge_agent.agent.Agent`` built from a config made in code, with its own
model store, MQTT connection (persistent session, will, retained status),
MQTT plane, transfer receiver and model manager, serving a tiny ONNX
classifier (``edge_agent.testing.tiny_onnx_classifier``, 16x16) and no
source (no camera, no frames: probation is left pending, which a deploy's
reply does not wait for). Only the camera pipeline is absent; every step of
a deploy runs as on a device: join the transfer, receive and verify
chunks, ask for missing ones, hash the file, extract and verify the
bundle, install it into the store, load it with ONNX Runtime (1 thread) and
activate it.

Lightweight, honestly: several agents share one Python process (10 per
process by default, spread over ``ceil(N / 10)`` worker processes), and all
of them share this machine's cores with mosquitto and the console. Fewer
processes would save memory (about 200 MB per worker process) but the
agents' threads (five each) then fight for one interpreter lock: at 100
agents per process half the CPU went to futex waits and context switches
(``perf``), and a device whose threads are not scheduled for 2 s asks for
chunks it has not read yet. The workers run at ``nice 19``: on a real fleet
every device has its own CPU, and here a broker left with 1/50th of two
cores would make every device wait for it. Their stores live under
``--root`` (default ``/dev/shm``, a RAM disk) so that N x 3 copies of a 4 MB
bundle measure the transfer and the agents, not this VM's virtual disk;
the stores are deleted afterwards. Telemetry is set to once an hour and the
spool is off, so they do not compete with the deploy.

Measured per N (default 50, 200, 500):

* ``broadcast``: :func:`edge_agent.fleet.deploy` to ``--all``, exactly what
  ``edge-agent fleet deploy BUNDLE --all`` does: the command, then one
  transfer whose chunks every device receives; seconds from the command to
  the last device's ``ok`` reply, bytes the console published (chunks,
  re-published chunks and meta), ``need`` requests served, when the last
  device had the whole file (``all_received_s``), and the CPU seconds the
  broker, the devices and the console used during the deploy;
* ``unicast``: the same bundle (as the next version) with one transfer and
  one command per device, all at once: the cost a console pays without
  broadcast. Skipped above ``--unicast-max`` devices (default 200; at 500
  the console alone would publish 2 GB).

Run from the repository root::

    .venv/bin/python benchmarks/fleet.py                 # N = 50, 200, 500
    .venv/bin/python benchmarks/fleet.py --devices 50 --json

JSON goes to stdout, then a readable table; progress to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _bench import REPO, emit, machine_info

PER_PROCESS = 10
BUNDLE_MB = 4.0


def progress(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


# -- bundles -------------------------------------------------------------------------


def make_bundles(folder: Path, versions: list[int]) -> dict[int, Path]:
    """v1 (tiny, installed at start) and each later version as a ~4 MB .tar
    archive: the tiny model packed with 4 MB of random bytes (an extra file)."""
    from edge_agent.bundles.pack import pack
    from edge_agent.testing import tiny_onnx_classifier

    pre = {"size": (16, 16), "resize": "stretch"}
    out = {}
    for version in [1, *versions]:
        model = tiny_onnx_classifier(folder / f"clf-{version}.onnx", size=(16, 16), seed=version)
        extra = None
        if version > 1:
            blob = folder / f"blob-{version}.bin"
            blob.write_bytes(os.urandom(int(BUNDLE_MB * 1024 * 1024)))
            extra = {"blob.bin": blob}
        out[version] = pack(model, name="clf", version=version, preprocessing=dict(pre), extra_files=extra,
                            out=folder / (f"clf-{version}" if version == 1 else f"clf-{version}.tar"))
    return out


# -- worker: many agents in one process ------------------------------------------------------


def device_config(device: str, *, port: int, prefix: str, root: Path, v1: Path, idle_s: float) -> Any:
    from edge_agent.config import parse_config

    return parse_config({
        "device_id": device,
        "groups": ["bench"],
        "log_level": "error",
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix, "telemetry_interval_s": 3600,
                 "session_expiry_s": 0, "keepalive_s": 120},
        "store": {"path": str(root / device), "keep_versions": 1},
        "models": [{"name": "clf", "bundle": str(v1), "threads": 1, "swap": "availability"}],
        "commands": {"workers": 1},
        "transfer": {"idle_s": idle_s},
        "spool": {"enabled": False},
    })


def worker(args: argparse.Namespace) -> int:
    """Start ``--count`` agents, say ``ready``, run until stdin closes."""
    import logging

    from edge_agent.agent import Agent

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    # The simulated devices share this machine's cores with the broker and
    # the console; on a real fleet each has its own CPU. Give way to them,
    # or the broker and the console each get 1/50th of the CPU and
    # everything waits for them (at nice 10, 50 worker processes together
    # still outweighed them five to one).
    os.nice(args.nice)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    agents = []
    try:
        for i in range(args.first, args.first + args.count):
            cfg = device_config(f"d{i:04d}", port=args.port, prefix=args.prefix, root=Path(args.root), v1=Path(args.v1),
                                idle_s=args.idle)
            agent = Agent(cfg)
            agent.start()
            agents.append(agent)
        print("ready", flush=True)
        sys.stdin.read()
    finally:
        for agent in agents:
            agent.shutdown()
    return 0


# -- the run -------------------------------------------------------------------------------------


def start_fleet(n: int, *, port: int, prefix: str, root: Path, v1: Path, per_process: int,
                switch_interval: float = 0.0, idle_s: float = 2.0, nice: int = 19) -> list[subprocess.Popen]:
    procs = []
    for k in range(math.ceil(n / per_process)):
        first = k * per_process
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--nice", str(nice), "--port", str(port),
               "--prefix", prefix,
               "--root", str(root), "--v1", str(v1), "--first", str(first), "--count", str(min(per_process, n - first)),
               "--switch-interval", str(switch_interval), "--idle", str(idle_s)]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise SystemExit("a worker process failed to start its agents (see stderr)")
    return procs


def stop_fleet(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.stdin:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_online(console: Any, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    deadline = t0 + timeout
    with console.cond:
        while sum(i.online for i in console.devices.values()) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {sum(i.online for i in console.devices.values())} of {n} devices came online")
            console.cond.wait(0.5)
    return time.monotonic() - t0


class StepClock:
    """When each device first reported each deploy step (seconds from t0)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.first: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

        self.now: dict[str, Any] = {}
        self._stop = threading.Event()
        if os.environ.get("FLEET_BENCH_TRACE"):
            threading.Thread(target=self._trace, daemon=True).start()

    def __call__(self, st: Any) -> None:
        with self._lock:
            self.first.setdefault(st.step, {}).setdefault(st.device, time.monotonic() - self.t0)
            self.now[st.device] = st

    def _trace(self) -> None:
        """FLEET_BENCH_TRACE=1: every 2 s, how many devices are at each step."""
        while not self._stop.wait(2.0):
            with self._lock:
                steps: dict[str, int] = {}
                got = sorted(st.received or 0 for st in self.now.values() if st.step == "transfer")
                for st in self.now.values():
                    steps[st.step] = steps.get(st.step, 0) + 1
            low = f" received min {got[0] / 1e6:.1f} MB median {got[len(got) // 2] / 1e6:.1f} MB" if got else ""
            progress(f"  {time.monotonic() - self.t0:5.1f}s {steps}{low}")

    def stop(self) -> None:
        self._stop.set()

    def last(self, step: str) -> float | None:
        """When the last device reached ``step``."""
        times = self.first.get(step, {})
        return round(max(times.values()), 2) if times else None


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def broadcast(console: Any, bundle: Path, n: int, timeout: float, rate: float | None = None,
              window: int = 2 * 1024 * 1024) -> dict[str, Any]:
    from edge_agent import fleet as f

    prepared = f.prepare_bundle(bundle)
    clock = StepClock()
    try:
        report = f.deploy(console, prepared, f.Target("all"), timeout=timeout, join_wait_s=10.0, progress=clock,
                           rate_bytes_s=rate, window_bytes=window)
    finally:
        clock.stop()
    return summarize("broadcast", report.outcomes, n, time.monotonic() - clock.t0, report.bytes_sent, prepared.size,
                     needs=report.needs, chunks_published=report.chunks_published, rate_bytes_s=rate, window_bytes=window,
                     all_received_s=clock.last("verifying"), all_activating_s=clock.last("activating"))


def unicast(console: Any, bundle: Path, devices: list[str], timeout: float) -> dict[str, Any]:
    """One transfer and one command per device, all at once."""
    from edge_agent import fleet as f
    from edge_agent.comms.transfer import TransferSender, build_meta

    prepared = f.prepare_bundle(bundle)
    meta = build_meta(prepared.archive, tid="unicast", chunk_size=f.chunk_size_for(prepared.size))  # hashed once
    before = console.link.bytes
    t0 = time.monotonic()
    senders = []
    ids = {}
    try:
        for device in devices:
            tid = uuid.uuid4().hex
            cmd_id = f.new_command_id("deploy")
            ids[device] = cmd_id
            args = {"model": prepared.model, "version": prepared.version, "sha256": prepared.sha256,
                    "size": prepared.size, "transfer": tid}
            console.publish_command(console.command_topic(device), cmd_id, "deploy", args, expiry_s=timeout)
            senders.append(TransferSender(console.link, console.prefix, prepared.archive, tid=tid, meta=meta))
        time.sleep(0.5)  # let the devices join before the chunks flow, as broadcast does
        for sender in senders:
            sender.start()
        deadline = t0 + timeout
        with console.cond:
            while not all(console.replies.get(ids[d], {}).get(d) for d in devices):
                if time.monotonic() > deadline:
                    break
                console.cond.wait(0.5)
        seconds = time.monotonic() - t0
    finally:
        for sender in senders:
            sender.close()
    outcomes = []
    for device in devices:
        got = console.reply(ids[device], device)
        outcomes.append(f.outcome_of(device, got[0], None) if got else
                        f.Outcome(device, False, code="timeout"))
    return summarize("unicast", outcomes, len(devices), seconds, console.link.bytes - before, prepared.size,
                     needs=sum(len(s.needs) for s in senders), chunks_published=sum(s.published for s in senders))


def summarize(mode: str, outcomes: list[Any], n: int, seconds: float, sent: int, size: int, **extra: Any) -> dict[str, Any]:
    ok = sum(o.ok for o in outcomes)
    failed: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            failed[o.code or "error"] = failed.get(o.code or "error", 0) + 1
    return {"mode": mode, "devices": n, "ok": ok, "failed": failed, "seconds": round(seconds, 2),
            "bytes_sent": sent, "bundle_bytes": size, "sent_per_bundle": round(sent / size, 2), **extra}


def run_size(n: int, *, bundles: dict[int, Path], root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from edge_agent import fleet as f

    from edge_agent.testing import Mosquitto

    folder = Path(tempfile.mkdtemp(prefix="bench-fleet-mq-"))
    # max_queued_messages: a device session may hold a whole 4 MB transfer
    # plus its commands while its process is busy, and the console's session
    # receives every device's progress events (500 devices, 2 a second each):
    # past the limit mosquitto drops messages for that client.
    broker = Mosquitto(folder, extra=["max_queued_messages 20000", "max_inflight_messages 64"])
    port = broker.port
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    stores = root / f"edge-fleet-bench-{prefix}"
    stores.mkdir(parents=True)
    results = []
    procs: list[subprocess.Popen] = []
    try:
        progress(f"N={n}: starting {n} agents in {math.ceil(n / args.per_process)} process(es)")
        t0 = time.monotonic()
        console = f.Console(f.BrokerSettings(port=port, prefix=prefix, keepalive_s=120)).connect()
        procs = start_fleet(n, port=port, prefix=prefix, root=stores, v1=bundles[1], per_process=args.per_process,
                            switch_interval=args.switch_interval, idle_s=args.idle, nice=args.nice)
        wait_online(console, n, 120)
        progress(f"N={n}: {n} agents online after {time.monotonic() - t0:.1f} s")
        pids = {"broker": [broker.proc.pid], "devices": [p.pid for p in procs], "console": [os.getpid()]}
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        r = broadcast(console, bundles[2], n, args.timeout, args.rate, int(args.window_mb * 1024 * 1024))
        r["cpu_s"] = {k: round(cpu_seconds(v) - cpu0[k], 1) for k, v in pids.items()}
        progress(f"N={n}: broadcast {r['ok']}/{n} ok in {r['seconds']} s, {r['bytes_sent'] / 1e6:.1f} MB sent")
        results.append(r)
        if n <= args.unicast_max:
            time.sleep(2)
            devices = sorted(console.devices)
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            r = unicast(console, bundles[3], devices, args.timeout)
            r["cpu_s"] = {k: round(cpu_seconds(v) - cpu0[k], 1) for k, v in pids.items()}
            progress(f"N={n}: unicast {r['ok']}/{n} ok in {r['seconds']} s, {r['bytes_sent'] / 1e6:.1f} MB sent")
            results.append(r)
        console.close()
    finally:
        stop_fleet(procs)
        broker.stop()
        shutil.rmtree(stores, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[50, 200, 500], help="fleet sizes")
    parser.add_argument("--unicast-max", type=int, default=200, help="largest N also measured by unicast")
    parser.add_argument("--per-process", type=int, default=PER_PROCESS, help="agents per worker process")
    parser.add_argument("--root", default="/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir(),
                        help="where the device stores go (deleted afterwards)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per deploy")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="sys.setswitchinterval in the worker processes (0: Python's default)")
    parser.add_argument("--rate", type=float, help="cap the broadcast's first pass at this many bytes/s "
                        "(the console's --rate); default: paced only by the devices' progress")
    parser.add_argument("--window-mb", type=float, default=2.0,
                        help="the console's pacing window (fleet.deploy window_bytes), MiB")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="the devices' [transfer] idle_s: silence before they ask for missing chunks")
    parser.add_argument("--nice", type=int, default=19,
                        help="niceness of the worker processes that simulate the devices (the broker and the "
                        "console run at the caller's)")
    parser.add_argument("--json", action="store_true", help="JSON only")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("port", "first", "count"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    for name in ("prefix", "v1"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        progress("packing the bundles")
        bundles = make_bundles(work, [2, 3])
        info = machine_info(mosquitto=subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                                                     capture_output=True, text=True).stdout.splitlines()[0])
        runs = []
        for n in args.devices:
            runs.extend(run_size(n, bundles=bundles, root=Path(args.root), args=args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "fleet", "bundle_mb": BUNDLE_MB, "per_process": args.per_process, "machine": info,
              "runs": runs}
    lines = [f"{'mode':<10} {'N':>5} {'ok':>5} {'seconds':>8} {'MB sent':>8} {'x bundle':>8} {'needs':>6}"]
    for r in runs:
        lines.append(f"{r['mode']:<10} {r['devices']:>5} {r['ok']:>5} {r['seconds']:>8.1f} "
                     f"{r['bytes_sent'] / 1e6:>8.1f} {r['sent_per_bundle']:>8.2f} {r['needs']:>6}")
    emit(report, "\n".join(lines), json_only=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
