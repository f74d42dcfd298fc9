"""Batching of predict requests (edge_agent.serving.batching): concurrent
requests to one model version are merged into one real ONNX Runtime
inference and split back, each request getting exactly what it would have
got alone."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import BatchingConfig
from edge_agent.runtimes import create_runtime, describe_model
from edge_agent.serving.batching import QUEUE_FULL, RequestBatcher
from edge_agent.serving.errors import ServingError


def linear_onnx(path: Path, seed: int = 0, batch: Any = "N") -> Path:
    """y = tanh(x @ W + b), x [batch, 4] -> y [batch, 3]; ``batch`` "N" is dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Tanh", ["z"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


class OrtRuntime:
    """The agent's ONNX Runtime (``edge_agent.runtimes``) with its ``run``
    counted (the rows of each call), and able to be slowed down or made to fail."""

    def __init__(self, path: Path) -> None:
        inputs, outputs = describe_model(path, "onnx")
        self.real = create_runtime("onnx", path, inputs, outputs, threads=1)
        self.real.load()
        self.calls: list[int] = []
        self.delay_s = 0.0
        self.fail: Exception | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(int(next(iter(inputs.values())).shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return self.real.run(inputs)

    def alone(self, x: np.ndarray) -> np.ndarray:
        """The answer of a direct run, not counted."""
        return self.real.run({"x": x})["y"]


class Model:
    """What the batcher reads of a loaded version: its manifest's tensors
    (as ``pack`` describes the model) and its runtime."""

    def __init__(self, path: Path) -> None:
        self.runtime = OrtRuntime(path)
        self.manifest = SimpleNamespace(inputs=self.runtime.real.inputs, outputs=self.runtime.real.outputs)


@pytest.fixture
def model(tmp_path: Path) -> Model:
    return Model(linear_onnx(tmp_path / "linear.onnx"))


def batcher(**kw: Any) -> RequestBatcher:
    return RequestBatcher(BatchingConfig(enabled=True, **kw))


def concurrently(fn, args: list[Any]) -> list[Any]:
    """``fn(arg)`` for each arg on its own thread, started together; the results (or exceptions) in order."""
    results: list[Any] = [None] * len(args)
    start = threading.Barrier(len(args))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = fn(args[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_merged_results_equal_each_request_run_alone(model: Model) -> None:
    """The point of batching is speed with the same answers: each client gets
    its own rows of the merged inference, bit for bit what it gets alone."""
    rng = np.random.default_rng(1)
    requests = [rng.normal(size=(n, 4)).astype(np.float32) for n in (1, 2, 1, 3, 1, 1, 2, 1)]
    alone = [model.runtime.alone(x) for x in requests]
    b = batcher(max_batch_size=32, batch_timeout_micros=200_000)
    model.runtime.delay_s = 0.05  # a batch in inference: the others gather meanwhile
    out = concurrently(lambda x: b.run(model, {"x": x}), requests)
    for got, want, x in zip(out, alone, requests):
        assert not isinstance(got, Exception), got
        assert got["y"].shape == (x.shape[0], 3)
        np.testing.assert_allclose(got["y"], want, rtol=1e-6, atol=1e-6)
    assert sum(model.runtime.calls) == 12
    assert len(model.runtime.calls) < len(requests), model.runtime.calls  # merged, not one by one
    assert max(model.runtime.calls) > 1
    assert b.stats()["rows"] == 12


def test_batch_holds_at_most_max_batch_size_rows(model: Model) -> None:
    """A batch bigger than configured could exceed the memory or latency the
    operator sized the device for."""
    b = batcher(max_batch_size=4, batch_timeout_micros=100_000)
    requests = [np.full((n, 4), i, np.float32) for i, n in enumerate((1, 2, 3, 1, 2, 1, 3, 2))]
    out = concurrently(lambda x: b.run(model, {"x": x}), requests)
    assert all(not isinstance(o, Exception) for o in out)
    assert max(model.runtime.calls) <= 4 and sum(model.runtime.calls) == 15


def test_request_larger_than_max_batch_size_runs_alone(model: Model) -> None:
    """A big request is served as it would be without batching (TF Serving
    would refuse it), in one inference of its own."""
    b = batcher(max_batch_size=4, batch_timeout_micros=1_000_000)
    x = np.ones((10, 4), np.float32)
    t0 = time.monotonic()
    out = b.run(model, {"x": x})
    assert time.monotonic() - t0 < 0.5  # no wait for others
    assert out["y"].shape == (10, 3) and model.runtime.calls == [10]


def test_timeout_bounds_the_wait_of_a_lone_request(model: Model) -> None:
    """A request that finds no company waits batch_timeout_micros, not longer
    (and a full batch does not wait at all)."""
    b = batcher(max_batch_size=8, batch_timeout_micros=150_000)
    t0 = time.monotonic()
    b.run(model, {"x": np.ones((1, 4), np.float32)})
    waited = time.monotonic() - t0
    assert 0.14 <= waited < 1.0, waited

    t0 = time.monotonic()
    b.run(model, {"x": np.ones((8, 4), np.float32)})  # fills a batch by itself
    assert time.monotonic() - t0 < 0.1


def test_mismatched_shapes_are_not_merged(tmp_path: Path) -> None:
    """Requests whose shapes differ beyond the batch dimension cannot be
    concatenated: they form batches of their own, and each gets its answer
    (or its own error) as alone."""
    import onnx
    from onnx import TensorProto, helper

    path = tmp_path / "sum.onnx"  # x [N, K] -> y [N, 1]: any width K
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1, axes=[1])], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8), path)
    model = Model(path)
    b = batcher(max_batch_size=32, batch_timeout_micros=100_000)
    requests = [np.ones((1, 4), np.float32), np.ones((1, 5), np.float32), np.ones((2, 4), np.float32),
                np.ones((1, 5), np.float32)]
    out = concurrently(lambda x: b.run(model, {"x": x}), requests)
    assert [o["y"].ravel().tolist() for o in out] == [[4.0], [5.0], [4.0, 4.0], [5.0]]
    assert sorted(model.runtime.calls) == [2, 3]  # one batch of width 5, one of width 4


def test_an_error_reaches_every_waiting_caller(model: Model) -> None:
    """A failed merged inference must fail each request in it, not leave the
    others hanging on an answer that never comes."""
    from edge_agent.errors import InferenceError

    b = batcher(max_batch_size=32, batch_timeout_micros=100_000)
    model.runtime.fail = InferenceError("onnxruntime failed on linear.onnx: boom")
    out = concurrently(lambda x: b.run(model, {"x": x}), [np.ones((1, 4), np.float32)] * 5)
    assert all(isinstance(o, InferenceError) and "boom" in str(o) for o in out), out
    assert len(model.runtime.calls) < 5
    model.runtime.fail = None
    assert b.run(model, {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)  # and it serves after


def test_two_versions_are_never_mixed(tmp_path: Path) -> None:
    """During a hot swap, requests holding the old version and requests
    holding the new one are in flight together: each must be answered by the
    version it acquired, so a batch never spans two."""
    old, new = Model(linear_onnx(tmp_path / "v1.onnx", seed=1)), Model(linear_onnx(tmp_path / "v2.onnx", seed=2))
    b = batcher(max_batch_size=32, batch_timeout_micros=100_000)
    x = np.ones((1, 4), np.float32)
    want = {id(m): m.runtime.alone(x) for m in (old, new)}
    models = [old, new] * 4
    out = concurrently(lambda m: (m, b.run(m, {"x": x})), models)
    for m, got in out:
        np.testing.assert_allclose(got["y"], want[id(m)], rtol=1e-6)
    assert sum(old.runtime.calls) == 4 and sum(new.runtime.calls) == 4
    assert len(old.runtime.calls) < 4 and len(new.runtime.calls) < 4


def test_full_queue_is_refused_with_unavailable(model: Model) -> None:
    """When batches pile up faster than the model runs them, a request is
    refused at once with TF Serving's UNAVAILABLE (HTTP 503, a client
    retries) instead of queueing without bound on a small device."""
    b = batcher(max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=2, num_batch_threads=1)
    model.runtime.delay_s = 0.3
    out = concurrently(lambda x: b.run(model, {"x": x}), [np.ones((1, 4), np.float32)] * 5)
    refused = [o for o in out if isinstance(o, ServingError)]
    assert refused and all(o.code == "UNAVAILABLE" and o.message == QUEUE_FULL for o in refused)
    served = [o for o in out if isinstance(o, dict)]
    assert len(served) == 2 and len(refused) == 3


def test_model_without_a_dynamic_batch_dimension_runs_directly(tmp_path: Path) -> None:
    """A model whose batch dimension is fixed cannot take merged requests: each
    runs at once, without waiting for a batch."""
    model = Model(linear_onnx(tmp_path / "fixed.onnx", batch=1))
    b = batcher(max_batch_size=8, batch_timeout_micros=1_000_000)
    t0 = time.monotonic()
    out = concurrently(lambda x: b.run(model, {"x": x}), [np.ones((1, 4), np.float32)] * 3)
    assert all(o["y"].shape == (1, 3) for o in out)
    assert time.monotonic() - t0 < 0.5 and model.runtime.calls == [1, 1, 1]


def test_batching_section_is_validated_like_the_others(tmp_path: Path) -> None:
    """A typo in [batching] (or a nonsense size) must stop the agent with the
    key named and exit code 2, not run silently unbatched or unbounded."""
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError

    ok = tmp_path / "ok.toml"
    ok.write_text("[batching]\nenabled = true\nmax_batch_size = 8\nbatch_timeout_micros = 500\n"
                  "num_batch_threads = 2\nmax_enqueued_batches = 4\n")
    cfg = load_config(ok).batching
    assert (cfg.enabled, cfg.max_batch_size, cfg.batch_timeout_micros, cfg.num_batch_threads,
            cfg.max_enqueued_batches) == (True, 8, 500, 2, 4)
    default = tmp_path / "default.toml"
    default.write_text("")
    assert load_config(default).batching.enabled is False

    bad = tmp_path / "bad.toml"
    bad.write_text("[batching]\nenabled = true\nmax_batch_sise = 8\nmax_batch_size = 0\n"
                   'batch_timeout_micros = "1ms"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.exit_code == 2
    problems = "\n".join(info.value.problems)
    assert "batching.max_batch_sise: unknown key" in problems
    assert "batching.max_batch_size" in problems and "batching.batch_timeout_micros" in problems


def test_predictor_merges_concurrent_predicts_with_named_inputs(tmp_path: Path) -> None:
    """What HTTP and gRPC call: the Predictor with a batcher, on a model with
    two named inputs; concurrent predicts are merged and each answer is the
    one of its own inputs, counted per row in the version's stats."""
    from test_serving import FakeManager, loaded, two_inputs

    from edge_agent.serving import Predictor

    model = loaded(two_inputs(tmp_path / "two.onnx"), "two")
    real_run, calls = model.runtime.run, []

    def counted(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(int(inputs["a"].shape[0]))
        time.sleep(0.02)
        return real_run(inputs)

    model.runtime.run = counted
    b = batcher(max_batch_size=16, batch_timeout_micros=100_000)
    predictor = Predictor(FakeManager(two=model), batcher=b)
    rng = np.random.default_rng(5)
    requests = [(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(-5, 5, size=(n, 3)))
                for n in (1, 2, 1, 1, 3, 1)]
    out = concurrently(lambda ab: predictor.predict("two", {"a": ab[0], "b": ab[1]}), requests)
    for (a, bb), result in zip(requests, out):
        assert not isinstance(result, Exception), result
        assert result.version == 1
        np.testing.assert_allclose(result.outputs["sum"], a + bb, rtol=1e-6)
        np.testing.assert_allclose(result.outputs["prod"], a * bb, rtol=1e-6)
    assert sum(calls) == 9 and len(calls) < len(requests)
    assert model.stats.snapshot()[0] == 9


def test_agent_gives_its_predictor_the_configured_batcher_and_a_reload_replaces_it(tmp_path: Path) -> None:
    """HTTP and gRPC share the agent's one Predictor, so both are batched
    together; an operator tuning [batching] sees the change without a restart."""
    from edge_agent.agent import Agent
    from edge_agent.config import parse_config

    def config(**batching: Any):
        return parse_config({"device_id": "batch-test", "store": {"path": str(tmp_path / "store")},
                             "batching": batching})

    agent = Agent(config())
    assert agent.predictor.batcher is None
    assert agent.reload(config(enabled=True, max_batch_size=4)) == ["batching on"]
    assert isinstance(agent.predictor.batcher, RequestBatcher) and agent.predictor.batcher.max_batch_size == 4
    assert agent.reload(config(enabled=False)) == ["batching off"]
    assert agent.predictor.batcher is None


def test_inference_time_is_the_model_run_not_the_wait_for_a_batch(tmp_path: Path) -> None:
    """``edge_agent_model_inference_seconds`` (and probation's median) read
    the version's inference times: with [batching] on, a request that waits
    ``batch_timeout_micros`` for company must not be counted as a slow model,
    or a roll-out's probation would blame the new version for the queue. The
    time recorded is the merged run's, shared by its rows."""
    from test_serving import FakeManager, loaded, two_inputs

    from edge_agent.serving import Predictor

    model = loaded(two_inputs(tmp_path / "two.onnx"), "two")
    real_run = model.runtime.run

    def slow(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.04)
        return real_run(inputs)

    model.runtime.run = slow
    predictor = Predictor(FakeManager(two=model), batcher=batcher(max_batch_size=64, batch_timeout_micros=400_000))
    rng = np.random.default_rng(9)
    requests = [(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(-5, 5, size=(n, 3))) for n in (1, 2, 1, 4)]
    t0 = time.perf_counter()
    out = concurrently(lambda ab: predictor.predict("two", {"a": ab[0], "b": ab[1]}), requests)
    assert time.perf_counter() - t0 >= 0.4  # every request waited for the batch to fill
    assert not any(isinstance(r, Exception) for r in out), out
    frames, errors, times_ms = model.stats.snapshot()
    assert (frames, errors) == (8, 0)
    assert max(times_ms) < 40.0, times_ms  # per row: a share of one model run (~40 ms), not 400 ms of waiting
    assert sum(times_ms) == pytest.approx(sum(times_ms[:1]) * 8, rel=0.5)  # shared evenly among rows
    assert 35.0 <= sum(times_ms) < 200.0, sum(times_ms)  # the merged runs' time, once
