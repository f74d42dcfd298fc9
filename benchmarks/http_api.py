#!/usr/bin/env python3
"""What the local HTTP and gRPC APIs cost: a predict request against the
same work done in-process.

One process, the real MobileNetV2 (fp32 ONNX, the demo's bundle and
preprocessing) and real photos (the 9 photos of things of
the ``photos`` asset of ``testassets``, each sent as a JPEG of quality 95).
Variants, interleaved in ``--rounds`` rounds (each variant ``--requests``
requests per round, one client, one after the other):

``direct``
    in-process, what the API does for one ``{"b64": ...}`` instance:
    base64-decode, ``cv2.imdecode``, ``LoadedModel.process`` (preprocess,
    inference, postprocess) on the agent's loaded model. The floor.
``http_b64``
    ``POST /v1/models/mobilenet_v2:predict`` with ``{"instances": [{"b64":
    ...}]}`` to the real agent (``[http] enabled``, no camera), over a kept-
    alive loopback connection (``http.client``), answer parsed
    (``json.loads``); the answer carries the 1000 logits and the top classes.
``http_tensor``
    the same request with the preprocessed tensor (3×224×224 floats as JSON,
    about 3 MB) instead of the JPEG: what a client that preprocesses itself
    pays.
``direct_tensor``
    in-process, what the gRPC API does for a tensor: the serving core's
    ``Predictor.predict`` on the preprocessed tensor (no decoding, no
    preprocessing): the floor for ``grpc_tensor``.
``grpc_tensor``
    the preprocessed tensor over gRPC (``[grpc] enabled``): TF Serving's
    ``PredictionService.Predict`` through the generated stub on a kept-open
    channel, the tensor as ``tensor_content`` (600 KB of float32, what
    ``tf.make_tensor_proto`` sends), the logits answered as a TensorProto;
    top-1 is their argmax. Left out (with a note) when grpcio is missing.

Per variant: median and p90 latency over all requests, and the median over
rounds of (variant / floor) within the round: the overhead ratio, where the
floor is ``direct_tensor`` for ``grpc_tensor`` (the same work in-process:
no decoding) and ``direct`` for the rest. The answers are checked: the
top-1 of every HTTP and gRPC answer must equal the direct one for the same
photo.

``.venv/bin/python benchmarks/http_api.py [--threads 1] [--rounds 5] [--requests 40]``
prints a JSON object, then a table (``--json-only``: the JSON only).

``--batching``: instead, what ``[batching]`` does for concurrent clients.
``--clients`` (default 8) threads, each with its own kept-alive connection,
send ``{"instances": [{"b64": JPEG}]}`` predicts one after the other, as fast
as answers come, to a MobileNetV2 whose batch dimension is dynamic
(``testassets.mobilenet.dynamic_batch_copy``, the demo's preprocessing).
Two agents run side by side, ``unbatched`` (``[batching]`` off: each request
its own ``session.run``, concurrently) and ``batched`` (``enabled``,
``max_batch_size = --clients``, ``batch_timeout_micros = --timeout-micros``,
``num_batch_threads = --batch-threads``), same runtime ``--threads``;
interleaved in ``--rounds`` rounds of ``--requests`` requests per client.
Per variant: requests per second (median over rounds), p50 and p99 latency
over every request, and the rows per merged inference. Every answer's top-1
(argmax of ``predictions``) is checked against the model run in-process.

``--transport`` picks how the clients reach the agents (``--batching`` only):
``rest`` (the default; the client threads run in the benchmark's process,
beside the agents), ``grpc`` (TF Serving's ``Predict`` with the tensor as
``tensor_content``; the client threads run in **a process of their own**,
started once, so their Python work does not hold the agents' GIL; the
agents run ``[grpc] enabled`` with their default 8 workers), or
``inprocess`` (no transport: the client threads call the agent's serving
core, ``Agent.predictor.predict``, directly, in the benchmark's process:
what batching does where the model alone is the bottleneck). ``grpc`` and
``inprocess`` need the tensor MLP (``--model mlp``).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import _bench  # noqa: F401  (the checkout on sys.path)
from _bench import MODEL_NAME, emit, machine_info, pack_mobilenet

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import testassets  # noqa: E402

PHOTOS = ["chelsea", "coffee", "dog", "eagle", "rocket", "horses", "china", "kite", "camera"]
VARIANTS = ("direct", "http_b64", "http_tensor", "direct_tensor", "grpc_tensor")
# What each variant is compared with: the same work in-process (a tensor
# sent over gRPC skips the decoding and preprocessing ``direct`` does).
FLOOR = {"grpc_tensor": "direct_tensor", "direct_tensor": "direct_tensor"}


def progress(message: str) -> None:
    print(f"[http] {message}", file=sys.stderr, flush=True)


def has_grpc() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        progress("grpcio is not installed (pip install 'edge-agent[grpc]'): the grpc variant is left out")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of the model (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--requests", type=int, default=40, help="requests per variant and round (default 40)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON object only, no table")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: ~/.cache/edge-agent)")
    parser.add_argument("--batching", action="store_true",
                        help="concurrent clients, [batching] on against off (see the module docstring)")
    parser.add_argument("--clients", type=int, default=8, help="--batching: concurrent clients (default 8)")
    parser.add_argument("--timeout-micros", type=int, default=2000,
                        help="--batching: batch_timeout_micros (default 2000)")
    parser.add_argument("--batch-threads", type=int, default=1, help="--batching: num_batch_threads (default 1)")
    parser.add_argument("--model", choices=("mlp", "mobilenet"), default="mlp",
                        help="--batching: the tensor MLP (default) or MobileNetV2 fed JPEGs")
    parser.add_argument("--transport", choices=("rest", "grpc", "inprocess"), default="rest",
                        help="--batching: REST (default), gRPC from a client process apart, or the serving "
                             "core called in-process (see the module docstring)")
    args = parser.parse_args(argv)
    if min(args.threads, args.rounds, args.requests, args.clients, args.batch_threads) < 1:
        parser.error("--threads, --rounds, --requests, --clients and --batch-threads must be >= 1")
    if args.batching:
        return batching_main(args)

    from edge_agent.agent import Agent
    from edge_agent.config import parse_config

    cache = args.cache if args.cache is not None else testassets.default_cache_dir()
    assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "photos"})
    machine = machine_info()
    jpegs = []
    for name in PHOTOS:
        ok, buf = cv2.imencode(".jpg", cv2.imread(str(assets["photos"] / f"{name}.jpg")),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        jpegs.append(base64.b64encode(buf.tobytes()).decode())

    with tempfile.TemporaryDirectory(prefix="edge-agent-http-bench-") as tmp:
        bundle = pack_mobilenet(assets, Path(tmp) / "bundle")
        agent = Agent(parse_config({
            "device_id": "http-bench", "log_level": "warning",
            "store": {"path": str(Path(tmp) / "store")},
            "models": [{"name": MODEL_NAME, "bundle": str(bundle), "threads": args.threads}],
            "http": {"enabled": True, "port": 0},
            "grpc": {"enabled": has_grpc(), "port": 0},
        }))
        agent.start()
        try:
            report = measure(agent, jpegs, args)
        finally:
            agent.shutdown()
    report["machine"] = machine
    emit(report, table(report), json_only=args.json_only)
    return 0


def measure(agent: Any, jpegs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    host, port = agent.http.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    with agent.models.acquire(MODEL_NAME) as model:
        frames = [cv2.imdecode(np.frombuffer(base64.b64decode(j), np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
        tensors = [model.preprocess(f)[0][0].tolist() for f in frames]
        expected = [model.process(f).payload["top"][0]["index"] for f in frames]
    bodies = {
        "http_b64": [json.dumps({"instances": [{"b64": j}]}).encode() for j in jpegs],
        "http_tensor": [json.dumps({"instances": [t]}).encode() for t in tensors],
    }

    def direct(i: int) -> int:
        with agent.models.acquire(MODEL_NAME) as m:
            frame = cv2.imdecode(np.frombuffer(base64.b64decode(jpegs[i]), np.uint8), cv2.IMREAD_COLOR)
            return m.process(frame).payload["top"][0]["index"]

    def over_http(variant: str) -> Callable[[int], int]:
        def call(i: int) -> int:
            conn.request("POST", f"/v1/models/{MODEL_NAME}:predict", body=bodies[variant][i],
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"{variant}: HTTP {resp.status}: {answer}")
            return answer["results"][0]["top"][0]["index"]

        return call

    run = {"direct": direct, "http_b64": over_http("http_b64"), "http_tensor": over_http("http_tensor")}
    channel = None
    if agent.grpc is not None:
        channel, run["grpc_tensor"], bodies["grpc_tensor"] = over_grpc(agent, tensors)
        predictor, arrays = agent.grpc.predictor, [np.asarray([t], np.float32) for t in tensors]
        with agent.models.acquire(MODEL_NAME) as m:
            input_name = m.manifest.inputs[0].name

        def direct_tensor(i: int) -> int:
            outputs = predictor.predict(MODEL_NAME, {input_name: arrays[i]}).outputs
            return int(np.argmax(next(iter(outputs.values())).reshape(-1)))

        run["direct_tensor"] = direct_tensor
    variants_run = [v for v in VARIANTS if v in run]
    for variant in variants_run:  # warm-up: connection, caches
        for i in range(len(jpegs)):
            run[variant](i)
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    mismatches = {v: 0 for v in VARIANTS}
    for r in range(args.rounds):
        for variant in variants_run:
            this = []
            for k in range(args.requests):
                i = k % len(jpegs)
                t0 = time.perf_counter()
                top = run[variant](i)
                this.append((time.perf_counter() - t0) * 1000.0)
                mismatches[variant] += top != expected[i]
            times[variant].append(this)
        progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {statistics.median(times[v][-1]):.2f} ms" for v in variants_run))
    conn.close()
    if channel is not None:
        channel.close()
    variants = {}
    for v in variants_run:
        flat = sorted(t for rnd in times[v] for t in rnd)
        floor = FLOOR.get(v, "direct")
        ratio = statistics.median(
            statistics.median(a) / statistics.median(b) for a, b in zip(times[v], times[floor])
        )
        variants[v] = {
            "median_ms": round(statistics.median(flat), 3),
            "p90_ms": round(flat[int(0.9 * (len(flat) - 1))], 3),
            "requests": len(flat),
            "vs_floor": round(ratio, 3),
            "floor": floor,
            "top1_mismatches": mismatches[v],
            "request_bytes": None if v.startswith("direct") else int(statistics.median(len(b) for b in bodies[v])),
        }
    return {
        "settings": {"threads": args.threads, "rounds": args.rounds, "requests": args.requests,
                     "photos": PHOTOS},
        "variants": variants,
    }


def over_grpc(agent: Any, tensors: list[Any]) -> tuple[Any, Callable[[int], int], list[bytes]]:
    """A channel to the agent's gRPC API, the call for the ``grpc_tensor``
    variant, and its serialized requests (for their size)."""
    import grpc

    from edge_agent.grpc.protos import predict_pb2, prediction_service_pb2_grpc
    from edge_agent.grpc.tensors import from_numpy, to_numpy

    host, port = agent.grpc.address
    channel = grpc.insecure_channel(f"{host}:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with agent.models.acquire(MODEL_NAME) as model:
        input_name = model.manifest.inputs[0].name
    requests = []
    for t in tensors:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL_NAME
        from_numpy(np.asarray([t], np.float32), req.inputs[input_name])
        requests.append(req)

    def call(i: int) -> int:
        response = stub.Predict(requests[i], timeout=60)
        logits = to_numpy(next(iter(response.outputs.values())))
        return int(np.argmax(logits.reshape(-1)))

    return channel, call, [r.SerializeToString() for r in requests]


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"HTTP and gRPC predict against in-process, MobileNetV2 fp32, {s['threads']} thread(s), "
        f"{s['rounds']} rounds x {s['requests']} requests per variant",
        f"  {'variant':<13} {'median ms':>10} {'p90 ms':>8} {'x floor':>8} {'floor':<14} {'request KB':>11} "
        f"{'top-1 diff':>11}",
    ]
    for name, v in report["variants"].items():
        kb = "-" if v["request_bytes"] is None else f"{v['request_bytes'] / 1024:.0f}"
        lines.append(f"  {name:<13} {v['median_ms']:10.2f} {v['p90_ms']:8.2f} {v['vs_floor']:8.2f} {v['floor']:<14} {kb:>11} "
                     f"{v['top1_mismatches']:>11}")
    return "\n".join(lines)


# -- --batching: concurrent clients, [batching] on against off -----------------

BATCHING_VARIANTS = ("unbatched", "batched")


def batching_main(args: argparse.Namespace) -> int:
    if args.transport != "rest" and args.model != "mlp":
        raise SystemExit(f"--transport {args.transport} needs --model mlp (tensors, not JPEGs)")
    if args.transport == "grpc" and not has_grpc():
        raise SystemExit("--transport grpc needs grpcio (pip install 'edge-agent[grpc]')")
    from edge_agent.agent import Agent
    from edge_agent.bundles.pack import pack
    from edge_agent.config import parse_config
    from _bench import PREPROCESSING
    from testassets.mobilenet import dynamic_batch_copy

    cache = args.cache if args.cache is not None else testassets.default_cache_dir()
    assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "photos"})
    machine = machine_info()
    jpegs = []
    for name in PHOTOS:
        ok, buf = cv2.imencode(".jpg", cv2.imread(str(assets["photos"] / f"{name}.jpg")),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        jpegs.append(base64.b64encode(buf.tobytes()).decode())
    with tempfile.TemporaryDirectory(prefix="edge-agent-http-batching-") as tmp:
        work = Path(tmp)
        if args.model == "mlp":
            onnx = mlp_onnx(work / "mlp.onnx")
            bundle = pack(onnx, name=MODEL_NAME, version=1, out=work / "bundle", task="tensor")
            rng = np.random.default_rng(0)
            inputs = [rng.normal(size=(MLP_WIDTHS[0],)).astype(np.float32) for _ in range(len(PHOTOS))]
            bodies = [json.dumps({"instances": [x.tolist()]}).encode() for x in inputs]
            if args.transport == "grpc":
                bodies = grpc_requests(inputs)
            elif args.transport == "inprocess":
                bodies = [x[None] for x in inputs]  # type: ignore[misc]
        else:
            onnx = dynamic_batch_copy(assets["mobilenet_v2"], work / "mobilenet_v2_dynamic.onnx")
            bundle = pack(onnx, name=MODEL_NAME, version=1, out=work / "bundle", preprocessing=dict(PREPROCESSING),
                          labels=assets["imagenet_labels"], task="classify")
            bodies = [json.dumps({"instances": [{"b64": j}]}).encode() for j in jpegs]
        import onnxruntime as ort

        direct = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        if args.model == "mlp":
            expected = [int(np.argmax(direct.run(None, {"x": x[None]})[0][0])) for x in inputs]
        else:
            expected = None
        agents = {}
        try:
            for variant in BATCHING_VARIANTS:
                agents[variant] = agent = Agent(parse_config({
                    "device_id": f"http-bench-{variant}", "log_level": "warning",
                    "store": {"path": str(work / f"store-{variant}")},
                    "models": [{"name": MODEL_NAME, "bundle": str(bundle), "threads": args.threads}],
                    "http": {"enabled": True, "port": 0},
                    **({"grpc": {"enabled": True, "port": 0}} if args.transport == "grpc" else {}),
                    "batching": {"enabled": variant == "batched", "max_batch_size": args.clients,
                                 "batch_timeout_micros": args.timeout_micros,
                                 "num_batch_threads": args.batch_threads},
                }))
                agent.start()
            report = measure_batching(agents, jpegs, bodies, expected, args)
        finally:
            for agent in agents.values():
                agent.shutdown()
    report["machine"] = machine
    emit(report, batching_table(report), json_only=args.json_only)
    return 0


Round = tuple[float, list[float], list[tuple[int, int]]]
#: one client thread's work: ``client(c, start)`` waits on ``start`` once connected and gives back its
#: latencies (ms), its (input, top-1) pairs, and the errors it met
Client = Callable[[int, threading.Barrier], tuple[list[float], list[tuple[int, int]], list[str]]]


def _run_clients(clients: int, client: Client) -> Round:
    """``clients`` threads running ``client``, timed from the moment all of
    them are ready; the wall time, every latency (ms), and (input, top-1)
    pairs. Raises when a request failed (or a client thread did)."""
    start = threading.Barrier(clients + 1)
    results: list[Any] = [None] * clients

    def run(c: int) -> None:
        results[c] = client(c, start)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [e for r in results for e in (r[2] if r is not None else ["a client thread failed (see above)"])]
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return wall, [x for r in results for x in r[0]], [x for r in results for x in r[1]]


def _clients_round(address: tuple[str, int], bodies: list[bytes], clients: int, requests: int) -> Round:
    """``clients`` threads, each sending ``requests`` predicts on its own
    connection; the wall time, every latency (ms), and (photo, top-1) pairs."""

    def client(c: int, start: threading.Barrier) -> tuple[list[float], list[tuple[int, int]], list[str]]:
        conn = http.client.HTTPConnection(*address, timeout=120)
        mine, seen, errors = [], [], []
        start.wait()
        for k in range(requests):
            i = (c + k) % len(bodies)
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/models/{MODEL_NAME}:predict", body=bodies[i],
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            mine.append((time.perf_counter() - t0) * 1000.0)
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}: {raw[:200]!r}")
                continue
            seen.append((i, int(np.argmax(json.loads(raw)["predictions"][0]))))
        conn.close()
        return mine, seen, errors

    return _run_clients(clients, client)


def grpc_requests(inputs: list[np.ndarray]) -> list[bytes]:
    """Serialized PredictRequests, one per input row (x [1, 512] as ``tensor_content``)."""
    from edge_agent.grpc.protos import predict_pb2
    from edge_agent.grpc.tensors import from_numpy

    out = []
    for x in inputs:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL_NAME
        from_numpy(x[None], req.inputs["x"])
        out.append(req.SerializeToString())
    return out


def _grpc_clients_round(address: tuple[str, int], requests_bytes: list[bytes], clients: int, requests: int
                        ) -> Round:
    """(In the client process.) ``clients`` threads, each with its own
    channel (its own connection), sending ``requests`` Predicts one after
    the other; as :func:`_clients_round`."""
    import grpc

    from edge_agent.grpc.protos import predict_pb2, prediction_service_pb2_grpc
    from edge_agent.grpc.tensors import to_numpy

    reqs = [predict_pb2.PredictRequest.FromString(b) for b in requests_bytes]
    channels = [grpc.insecure_channel(f"{address[0]}:{address[1]}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(clients)]

    def client(c: int, start: threading.Barrier) -> tuple[list[float], list[tuple[int, int]], list[str]]:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channels[c])
        stub.Predict(reqs[c % len(reqs)], timeout=60)  # the connection is up before the clock starts
        mine, seen, errors = [], [], []
        start.wait()
        for k in range(requests):
            i = (c + k) % len(reqs)
            t0 = time.perf_counter()
            try:
                response = stub.Predict(reqs[i], timeout=120)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code()}: {exc.details()}")
                continue
            mine.append((time.perf_counter() - t0) * 1000.0)
            seen.append((i, int(np.argmax(to_numpy(response.outputs["logits"]).reshape(-1)))))
        return mine, seen, errors

    try:
        return _run_clients(clients, client)
    finally:
        for ch in channels:
            ch.close()


def _inprocess_round(agent: Any, inputs: list[np.ndarray], clients: int, requests: int) -> Round:
    """``clients`` threads calling the agent's serving core directly
    (``Predictor.predict``: validation, the batcher when enabled, the
    runtime), as :func:`_clients_round`."""

    def client(c: int, start: threading.Barrier) -> tuple[list[float], list[tuple[int, int]], list[str]]:
        mine, seen = [], []
        start.wait()
        for k in range(requests):
            i = (c + k) % len(inputs)
            t0 = time.perf_counter()
            out = agent.predictor.predict(MODEL_NAME, {"x": inputs[i]}).outputs["logits"]
            mine.append((time.perf_counter() - t0) * 1000.0)
            seen.append((i, int(np.argmax(out[0]))))
        return mine, seen, []

    return _run_clients(clients, client)


MLP_WIDTHS = (512, 2048, 2048, 2048, 10)


def mlp_onnx(path: Path) -> Path:
    """A tensor model whose cost is its weights: x [N, 512] -> three ReLU
    layers of 2048 -> 10 logits, 9.4 M float32 parameters (38 MB), as an
    embedding or recommendation head. One row is a matrix-vector product per
    layer that streams every weight from memory; N rows reuse each weight N times."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(MLP_WIDTHS, MLP_WIDTHS[1:])):
        inits += [numpy_helper.from_array((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if b != MLP_WIDTHS[-1]:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def measure_batching(agents: dict[str, Any], jpegs: list[str], bodies: list[bytes], expected: list[int] | None,
                     args: argparse.Namespace) -> dict[str, Any]:
    if expected is None:  # MobileNetV2: the in-process answer for each photo
        with agents["unbatched"].models.acquire(MODEL_NAME) as model:
            frames = [cv2.imdecode(np.frombuffer(base64.b64decode(j), np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
            expected = [model.process(f).payload["top"][0]["index"] for f in frames]
    pool = None
    if args.transport == "grpc":  # the clients in a process of their own, started once
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(1)
        addresses = {v: a.grpc.address for v, a in agents.items()}

        def one_round(v: str, n: int) -> tuple[float, list[float], list[tuple[int, int]]]:
            return pool.apply(_grpc_clients_round, (addresses[v], bodies, args.clients, n))
    elif args.transport == "inprocess":
        def one_round(v: str, n: int) -> tuple[float, list[float], list[tuple[int, int]]]:
            return _inprocess_round(agents[v], bodies, args.clients, n)  # type: ignore[arg-type]
    else:
        addresses = {v: a.http.address for v, a in agents.items()}

        def one_round(v: str, n: int) -> tuple[float, list[float], list[tuple[int, int]]]:
            return _clients_round(addresses[v], bodies, args.clients, n)
    try:
        return _measure_rounds(agents, expected, args, one_round)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _measure_rounds(agents: dict[str, Any], expected: list[int], args: argparse.Namespace,
                    one_round: Callable[[str, int], tuple[float, list[float], list[tuple[int, int]]]]
                    ) -> dict[str, Any]:
    for v in BATCHING_VARIANTS:  # warm-up
        one_round(v, 3)
    rps: dict[str, list[float]] = {v: [] for v in BATCHING_VARIANTS}
    latencies: dict[str, list[float]] = {v: [] for v in BATCHING_VARIANTS}
    mismatches = {v: 0 for v in BATCHING_VARIANTS}
    before = {v: dict(agents[v].predictor.batcher.stats()) if agents[v].predictor.batcher else None
              for v in BATCHING_VARIANTS}
    for r in range(args.rounds):
        for v in BATCHING_VARIANTS:
            wall, lat, tops = one_round(v, args.requests)
            rps[v].append(len(lat) / wall)
            latencies[v].extend(lat)
            mismatches[v] += sum(top != expected[i] for i, top in tops)
        progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {rps[v][-1]:.1f} req/s" for v in BATCHING_VARIANTS))
    variants = {}
    for v in BATCHING_VARIANTS:
        flat = sorted(latencies[v])
        batcher = agents[v].predictor.batcher
        rows_per_batch = None
        if batcher is not None:
            after = batcher.stats()
            batches = after["batches"] - before[v]["batches"]
            rows_per_batch = round((after["rows"] - before[v]["rows"]) / batches, 2) if batches else None
        variants[v] = {
            "requests_per_s": round(statistics.median(rps[v]), 2),
            "requests_per_s_rounds": [round(x, 2) for x in rps[v]],
            "p50_ms": round(float(np.percentile(flat, 50)), 2),
            "p99_ms": round(float(np.percentile(flat, 99)), 2),
            "requests": len(flat),
            "rows_per_batch": rows_per_batch,
            "top1_mismatches": mismatches[v],
        }
    return {
        "settings": {"mode": "batching", "clients": args.clients, "threads": args.threads, "rounds": args.rounds,
                     "requests_per_client": args.requests, "max_batch_size": args.clients,
                     "batch_timeout_micros": args.timeout_micros, "num_batch_threads": args.batch_threads,
                     "transport": args.transport, "model": args.model,
                     "clients_in": {"rest": "the benchmark's process, beside the agents",
                                    "grpc": "a process of their own",
                                    "inprocess": "the benchmark's process, no transport"}[args.transport]},
        "variants": variants,
    }


TRANSPORT_NAMES = {"rest": "REST", "grpc": "gRPC", "inprocess": "in-process (Predictor.predict)"}


def batching_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['clients']} concurrent {TRANSPORT_NAMES[s['transport']]} clients (in {s['clients_in']}), "
        f"{'MLP 512-2048x3-10 tensors' if s['model'] == 'mlp' else 'MobileNetV2 fp32 dynamic batch, JPEGs'}, "
        f"{s['threads']} runtime thread(s), "
        f"{s['rounds']} rounds x {s['requests_per_client']} requests per client; batched: max_batch_size "
        f"{s['max_batch_size']}, batch_timeout_micros {s['batch_timeout_micros']}, num_batch_threads "
        f"{s['num_batch_threads']}",
        f"  {'variant':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/batch':>11} {'top-1 diff':>11}",
    ]
    for name, v in report["variants"].items():
        rows = "-" if v["rows_per_batch"] is None else f"{v['rows_per_batch']:.2f}"
        lines.append(f"  {name:<10} {v['requests_per_s']:8.1f} {v['p50_ms']:8.1f} {v['p99_ms']:8.1f} {rows:>11} "
                     f"{v['top1_mismatches']:>11}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
