"""Test doubles for the agent, shipped in the package so that tests of any
component (and users' own tests) can use the same ones.

* :class:`SlowRuntime` wraps a real :class:`~edge_agent.runtimes.Runtime` and
  sleeps a fixed time in every inference: a stand-in for a slow device, to
  exercise frame skipping and rate limits with real outputs.
* :func:`slowed` returns a copy of a :class:`~edge_agent.models.servable.LoadedModel`
  whose runtime is a :class:`SlowRuntime`.
* :class:`StaticModels` hands out fixed loaded models through the same
  ``acquire(name)`` context manager as :class:`~edge_agent.models.manager.ModelManager`,
  so a :class:`~edge_agent.pipeline.worker.SourceWorker` can run without a store.
* :class:`RecordingSink` keeps every result a pipeline emits.
* :func:`tiny_onnx_classifier` writes a small ONNX classifier built in code
  (needs the ``onnx`` package, imported only when called).
* :class:`Mosquitto` runs a real broker on a free loopback port (tests and
  ``benchmarks/fleet.py``).

Nothing here is used by the agent itself.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from edge_agent.errors import ModelNotAvailable
from edge_agent.runtimes import Runtime

if TYPE_CHECKING:
    from edge_agent.models.servable import LoadedModel


class SlowRuntime(Runtime):
    """A real runtime that takes ``delay_s`` longer per inference.

    The sleep happens before the wrapped ``infer``, so outputs are the real
    model's. ``calls`` counts inferences (warm-up excluded: ``load`` is passed
    straight through). Thread-safe as far as the wrapped runtime is.
    """

    def __init__(self, inner: Runtime, delay_s: float) -> None:
        super().__init__(
            inner.model_path, inner.inputs, inner.outputs, threads=inner.threads, providers=inner.providers
        )
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self.inner = inner
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def load(self) -> None:
        self.inner.load()

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        with self._lock:
            self.calls += 1
        return self.inner.infer(tensor)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        with self._lock:
            self.calls += 1
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


def slowed(model: "LoadedModel", delay_s: float) -> "LoadedModel":
    """A copy of ``model`` that sleeps ``delay_s`` in every inference (the
    runtime is shared with the original, not reloaded)."""
    return dataclasses.replace(model, runtime=SlowRuntime(model.runtime, delay_s), refs=0)


class StaticModels:
    """A fixed set of loaded models behind ``acquire(name)``, like a
    ModelManager that never changes version. Counts acquisitions."""

    def __init__(self, *models: "LoadedModel") -> None:
        self._models = {m.name: m for m in models}
        self.acquired = 0

    @contextmanager
    def acquire(self, name: str, label: str | None = None) -> Iterator["LoadedModel"]:
        model = self._models.get(name)
        if model is None:
            raise ModelNotAvailable(f"model {name} is not loaded")
        self.acquired += 1
        yield model


class RecordingSink:
    """Keeps ``(source, result, monotonic time)`` for every emitted result.
    Thread-safe; ``results`` returns a snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._items: list[tuple[str, dict[str, Any], float]] = []

    def emit(self, source: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._items.append((source, result, time.monotonic()))
            self._lock.notify_all()

    def first_after(self, after: float, match: Callable[[dict[str, Any]], bool], timeout: float) -> float | None:
        """The time of the first result emitted at or after ``after`` (monotonic)
        that ``match``es, waiting up to ``timeout`` s for it; None if none came.
        Looks at each result once, without copying the list (benchmarks call
        it in the process they measure)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            i = len(self._items)
            while i > 0 and self._items[i - 1][2] >= after:
                i -= 1
            while True:
                while i < len(self._items):
                    _, result, t = self._items[i]
                    if match(result):
                        return t
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or not self._lock.wait(left):
                    return None

    @property
    def items(self) -> list[tuple[str, dict[str, Any], float]]:
        with self._lock:
            return list(self._items)

    @property
    def results(self) -> list[dict[str, Any]]:
        return [r for _, r, _ in self.items]


def tiny_onnx_classifier(
    path: Path | str,
    *,
    size: tuple[int | str, int | str] = (8, 8),
    classes: int = 4,
    seed: int = 0,
    slow: int = 0,
    fail_above: float | None = None,
    batch: int | str = 1,
) -> Path:
    """Write a Conv(3x3) -> GlobalAveragePool -> Flatten classifier taking
    float32 ``[1, 3, H, W]`` (``size`` is (W, H); a string makes that
    dimension dynamic) and emitting logits ``[1, classes]``. Deterministic
    for a given ``seed``. Returns ``path``.

    ``slow``: that many extra 32-channel 3x3 convolutions first: a genuinely
    slower model computing similar answers (lifecycle latency tests).
    ``fail_above``: the model raises in the runtime (a Gather index out of
    range) whenever the mean of its input exceeds this value, and works
    otherwise: a model that passes a smoke test on a grey frame but fails on
    bright camera frames (probation tests).
    ``batch``: the batch dimension (a string makes it dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, height = size
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((classes, 3, 3, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")
    inits = [weight, bias]
    nodes = []
    x = "input"
    if slow:
        wide = 32
        inits.append(numpy_helper.from_array((rng.standard_normal((wide, 3, 3, 3)) * 0.1).astype(np.float32), "S_in"))
        nodes.append(helper.make_node("Conv", [x, "S_in"], ["s0"], pads=[1, 1, 1, 1]))
        for i in range(slow):
            w = (rng.standard_normal((wide, wide, 3, 3)) * 0.05).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"S{i}"))
            nodes.append(helper.make_node("Conv", [f"s{i}", f"S{i}"], [f"s{i + 1}"], pads=[1, 1, 1, 1]))
        inits.append(numpy_helper.from_array((rng.standard_normal((3, wide, 1, 1)) * 0.05).astype(np.float32), "S_out"))
        nodes.append(helper.make_node("Conv", [f"s{slow}", "S_out"], ["s_out"]))
        nodes.append(helper.make_node("Add", ["input", "s_out"], ["slowed"]))
        x = "slowed"
    nodes += [
        helper.make_node("Conv", [x, "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits" if fail_above is None else "clean"]),
    ]
    if fail_above is not None:
        inits += [
            numpy_helper.from_array(np.array(fail_above, np.float32), "limit"),
            numpy_helper.from_array(np.array(1000, np.int64), "far"),
            numpy_helper.from_array(np.zeros(1, np.float32), "table"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
            helper.make_node("Greater", ["mean", "limit"], ["over"]),
            helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["over_i", "far"], ["index"]),
            helper.make_node("Gather", ["table", "index"], ["picked"]),
            helper.make_node("Mul", ["picked", "zero"], ["nothing"]),
            helper.make_node("Add", ["clean", "nothing"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (``mosquitto_passwd``) for ``users``."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(path), user,
                        password], check=True, capture_output=True)
    return path


class Mosquitto:
    """A mosquitto of our own on a free loopback port (tests and benchmarks):
    ``stop()`` and ``start()`` again on the same port; ``extra`` config lines."""

    def __init__(self, folder: Path, *, persistence: bool = False, tls: dict[str, Path] | None = None,
                 users: dict[str, str] | None = None, extra: Sequence[str] = (),
                 config: Callable[[str, int], str] | None = None) -> None:
        """``config``: the whole configuration instead, from the host and port
        it must listen on (a shipped file with its paths filled in)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        self.conf = self.folder / "mosquitto.conf"
        self.proc: subprocess.Popen | None = None
        if config is not None:
            self.conf.write_text(config(self.host, self.port))
            self.start()
            return
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'false' if users else 'true'}",
                 "log_dest stderr"]
        if users:
            lines.append(f"password_file {password_file(self.folder / 'passwd', users)}")
        if os.geteuid() == 0:
            lines.append("user root")  # run as root (CI): keep reading the test's private temp files
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      "require_certificate true", "use_identity_as_username true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.folder}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines += extra
        self.conf.write_text("\n".join(lines) + "\n")
        self.start()

    def start(self) -> None:
        log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.folder / "mosquitto.log").read_text())
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def make_certs(folder: Path, clients: Sequence[str] = ("device-1",)) -> dict[str, dict[str, Path]]:
    """Certificates for TLS tests and benchmarks: a CA with a broker
    certificate (127.0.0.1 and localhost) and one client certificate per name
    in ``clients`` (the CN is the name), plus ``rogue``: a client certificate
    from another CA. Each entry is ``{"ca", "cert", "key"}``; valid two days."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name: str, key: Any, cert: Any) -> tuple[Path, Path]:
        k, c = folder / f"{name}.key", folder / f"{name}.crt"
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return k, c

    def authority(cn: str) -> tuple[Any, Any, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert, write(cn.replace(" ", "-"), key, cert)[1]

    def leaf(ca: tuple[Any, Any, Path], cn: str, server: bool = False) -> dict[str, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2)))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        k, c = write(cn, key, b.sign(ca[0], hashes.SHA256()))
        return {"ca": ca[2], "cert": c, "key": k}

    ca = authority("edge-agent test CA")
    other = authority("edge-agent rogue CA")
    out = {"broker": leaf(ca, "broker", server=True), "rogue": {**leaf(other, "rogue"), "ca": ca[2]}}
    for name in clients:
        out[name] = leaf(ca, name)
    return out
