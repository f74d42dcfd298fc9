"""int8 TFLite through onnx2tf in its own environment (quantize/tflite/).

The device runs full-integer TFLite models through LiteRT, so what matters is
that the file really is int8 in and out, holds only builtin ops (a Flex op
would fail on the device, not here), still classifies real photos, and that
mixed precision buys back agreement with fp32 on photos it never saw.

The real-model tests need the converter env (``scripts/setup_onnx2tf.sh``)
and are skipped, saying so, without it. Prepared models and sensitivity
rankings are cached under ``~/.cache/edge-agent/tflite`` keyed by the sha256
of the model, the calibration data and the converter's versions, so a second
run takes well under a minute (the first about three).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.bundles.manifest import Preprocessing, TensorSpec
from edge_agent.pipeline.preprocess import Preprocessor
from quantize import tflite
from quantize.data import make_views
from quantize.errors import QuantizeError, QuantizeInputError
from quantize.tflite import worker

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
LABELS = Path(__file__).resolve().parents[1] / "testassets" / "data" / "imagenet_labels.txt"
CACHE = tflite.DEFAULT_CACHE.expanduser()
BUILTIN_INT8_OPS = {"PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"}


# ---------------------------------------------------------------- data


# The product's own preprocessing (what `edge-agent quantize` calibrates the
# converter with): ImageNet crop, NHWC RGB in [0, 1], mean/std left to the
# converter.
CROP01 = Preprocessor(
    Preprocessing(size=(224, 224), resize="crop", crop_fraction=0.875, layout="nhwc", color="rgb"),
    TensorSpec(name="input", shape=[1, 224, 224, 3], dtype="float32"),
)


def crop01(bgr: np.ndarray) -> np.ndarray:
    return CROP01(bgr)[0][0]


def normalise(x01: np.ndarray) -> np.ndarray:
    return ((x01 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)


@pytest.fixture(scope="module")
def photo_split(assets: dict[str, Path]) -> dict[str, np.ndarray]:
    """Calibration on every other photo, checks on the others (chelsea among
    them): 8 views each, NHWC in [0, 1]."""
    names = sorted(p.stem for p in assets["photos"].glob("*.jpg"))
    calib_names, check_names = names[0::2], names[1::2]
    if "chelsea" in calib_names:
        calib_names.remove("chelsea")
        check_names.append("chelsea")
    assert not set(calib_names) & set(check_names)

    def load(group: list[str], seed: int) -> np.ndarray:
        out = []
        for i, name in enumerate(group):
            bgr = cv2.imread(str(assets["photos"] / f"{name}.jpg"))
            assert bgr is not None, name
            out += [crop01(v) for v in make_views(bgr, 8, seed=seed + i)]
        return np.stack(out)

    return {"calibration": load(calib_names, 100), "check": load(check_names, 0)}


@pytest.fixture(scope="module")
def fp32_top1(assets: dict[str, Path], photo_split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """fp32 ONNX Runtime top-1 on both sets: the reference for agreement."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(assets["mobilenet_v2"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return {
        key: np.array([sess.run(None, {name: normalise(x).transpose(2, 0, 1)[None]})[0][0].argmax() for x in data])
        for key, data in photo_split.items()
    }


def tflite_logits(path: Path, x01: np.ndarray) -> np.ndarray:
    """Run a (int8) .tflite on normalised NHWC images in this env's LiteRT."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=2)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    logits = []
    for x in normalise(x01):
        x = x[None]
        if inp["dtype"] == np.int8:
            scale, zp = inp["quantization"]
            x = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] == np.int8:
            scale, zp = out["quantization"]
            y = (y - zp) * scale
        logits.append(y[0])
    return np.stack(logits)


# ---------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def converter_env() -> Path:
    try:
        return tflite.find_converter_env()
    except QuantizeError as exc:
        pytest.skip(f"{exc} (scripts/test.sh and 'scripts/setup.sh dev' create it)")


@pytest.fixture(scope="module")
def converter(converter_env: Path, assets: dict[str, Path], photo_split: dict[str, np.ndarray]):
    """One worker with MobileNetV2 prepared (taken from the cache after the first run)."""
    with tflite.TfliteConverter(converter_env, cache_dir=CACHE) as conv:
        conv.prepare(assets["mobilenet_v2"], photo_split["calibration"], IMAGENET_MEAN, IMAGENET_STD)
        yield conv


@pytest.fixture(scope="module")
def plain(converter: tflite.TfliteConverter, tmp_path_factory: pytest.TempPathFactory) -> tflite.TfliteArtifact:
    return converter.quantize(tmp_path_factory.mktemp("tflite") / "mobilenet_v2_int8.tflite")


def agreement(path: Path, x01: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(tflite_logits(path, x01).argmax(1) == reference))


# ---------------------------------------------------------------- no converter needed


def test_missing_converter_env_says_how_to_create_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A user without the converter env must get one line naming the fix, not a traceback from deep inside."""
    missing = tmp_path / "no-such-venv"
    monkeypatch.setenv(tflite.ENV_VAR, str(missing))
    with pytest.raises(QuantizeError) as info:
        tflite.find_converter_env()
    message = str(info.value)
    assert "\n" not in message
    assert "scripts/setup_onnx2tf.sh" in message and str(missing) in message
    assert info.value.code == "converter_env_missing" and info.value.exit_code == 1

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not used")
    with pytest.raises(QuantizeError, match="setup_onnx2tf.sh"):
        tflite.convert_int8(model, np.zeros((1, 8, 8, 3), np.float32), 0.5, 0.5, tmp_path / "out.tflite")


def test_calibration_data_is_checked_before_any_work(tmp_path: Path) -> None:
    """Calibration in the wrong form (HWC, 0-255) would quietly calibrate nonsense ranges."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    with pytest.raises(QuantizeInputError, match="NHWC"):
        tflite.convert_int8(model, np.zeros((8, 8, 3), np.float32), 0.5, 0.5, tmp_path / "o.tflite")
    with pytest.raises(QuantizeInputError, match=r"\[0, 1\]"):
        tflite.convert_int8(model, np.full((1, 8, 8, 3), 255.0, np.float32), 0.5, 0.5, tmp_path / "o.tflite")
    with pytest.raises(QuantizeInputError, match="3 channels"):
        tflite.convert_int8(model, np.zeros((1, 8, 8, 3), np.float32), (0.5, 0.5), 0.5, tmp_path / "o.tflite")


def test_flex_and_custom_ops_are_refused_by_name() -> None:
    """The device's LiteRT has no TensorFlow kernels: a Flex or custom op must stop the build, naming the op."""
    tflite.check_ops(["PAD", "CONV_2D", "QUANTIZE", "DEQUANTIZE", "FULLY_CONNECTED"])
    with pytest.raises(QuantizeError) as info:
        tflite.check_ops(["CONV_2D", "FlexErf", "TFLite_Detection_PostProcess"], "m.tflite")
    assert "FlexErf" in str(info.value) and "TFLite_Detection_PostProcess" in str(info.value)
    assert info.value.code == "unsupported_ops"
    assert tflite.forbidden_ops(["CUSTOM", "ADD"]) == ["CUSTOM"]


def test_worker_is_standalone() -> None:
    """The worker runs in the converter env, where nothing of edge-agent is installed: at module level it may import
    only the standard library and numpy (TensorFlow and friends only inside the steps), and nothing of ours at all."""
    import ast

    tree = ast.parse(Path(worker.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top - set(sys.stdlib_module_names) == {"numpy"}, top
    anywhere = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    anywhere |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not anywhere & {"edge_agent", "quantize", "pydantic", "click"}, anywhere


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P needs 3.11 (the converter env has >= 3.12)")
def test_worker_answers_in_json_lines_and_keeps_stdout_for_them(tmp_path: Path) -> None:
    """Started the way the converter starts it (here with this environment's python, which is enough without a
    model), the worker replies on stdout in JSON lines only, refuses work before ``prepare`` with a code, and
    ends on ``exit``."""
    from quantize.tflite.session import worker_command, worker_environment

    requests = [{"cmd": "quantize", "out": str(tmp_path / "x.tflite")}, {"cmd": "exit"}]
    done = subprocess.run(
        worker_command(sys.executable), input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True, text=True, env=worker_environment(), cwd=tmp_path, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"ok": False, "error": "no model prepared", "code": "conversion_failed"},
    ]


def test_worker_names_layers_like_the_quantization_debugger() -> None:
    """``float_nodes`` take the names QuantizationDebugger gives: the NumericVerify tensor's name without its prefix,
    its trailing digit and its index."""
    assert worker.verified_layer("NumericVerify/model/conv_1;Conv2D1:42") == "model/conv_1;Conv2D"
    assert worker.verified_layer("NumericVerify/logits:7") == "logits"


def test_worker_sensitivity_score_is_the_kl_divergence_of_the_softmax() -> None:
    """Isolation sensitivity ranks layers by KL(fp32 || candidate): zero for the same outputs, larger the more the
    candidate's probabilities move."""
    ref = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    assert worker.kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert worker.kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-12)
    near, far = worker.kl(ref, ref * 0.9), worker.kl(ref, ref[:, ::-1])
    assert 0 < near < far


def test_worker_sensitivity_for_detector_outputs_is_the_noise_to_signal_ratio() -> None:
    """A detector's raw outputs (boxes and scores, no class logits) are
    ranked by mean squared error over the float output's variance: a softmax
    over 6300 x 85 numbers is no distribution, and a constant shift (KL's
    blind spot) moves every box."""
    ref = np.array([[0.2, 0.4, 0.9, 0.01], [0.5, 0.5, 0.1, 0.7]])
    assert worker.nsr(ref, ref) == 0.0
    assert worker.nsr(ref, ref + 0.1) > 0 and worker.kl(ref, ref + 0.1) == pytest.approx(0.0, abs=1e-12)
    assert worker.nsr(ref, ref * 1.01) < worker.nsr(ref, ref * 1.2)
    assert set(worker.SCORES) == {"kl", "nsr"}


# ---------------------------------------------------------------- real converter


FLEX_MODEL = r"""
import sys, tensorflow as tf
@tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
def f(x):
    return tf.reshape(tf.linalg.det(tf.reshape(x, [1, 2, 2])), [1, 1]) + 1.0
c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
open(sys.argv[1], "wb").write(c.convert())
"""


def test_a_real_flex_model_is_read_and_refused(converter_env: Path) -> None:
    """A .tflite that TensorFlow made with a Select-TF (Flex) op is read without an interpreter and refused, naming it."""
    path = CACHE / "flex_matrix_determinant.tflite"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
        env.pop("PYTHONPATH", None)
        tmp = path.with_suffix(".part")
        subprocess.run([str(converter_env / "bin" / "python"), "-c", FLEX_MODEL, str(tmp)], check=True, env=env, capture_output=True, timeout=300)
        tmp.replace(path)
    ops = tflite.list_ops(path)
    assert "FlexMatrixDeterminant" in ops
    with pytest.raises(QuantizeError, match="FlexMatrixDeterminant"):
        tflite.check_ops(ops, path.name)


def test_int8_mobilenet_is_full_integer_with_builtin_ops(plain: tflite.TfliteArtifact, converter: tflite.TfliteConverter, tmp_path: Path) -> None:
    """The artifact must be int8 in and out (the device quantizes its input with the recorded params) and need only builtin ops."""
    info = tflite.read_model(plain.path)
    assert [t.dtype for t in info.inputs] == ["int8"] and [t.dtype for t in info.outputs] == ["int8"]
    assert plain.input_shape == (1, 224, 224, 3) and plain.output_shape == (1, 1000)
    assert set(plain.ops) <= BUILTIN_INT8_OPS, plain.ops
    assert plain.input_quant[0] > 0 and -128 <= plain.input_quant[1] <= 127
    assert plain.output_quant[0] > 0 and plain.float_nodes == ()
    fp32 = converter.export_float(tmp_path / "fp32.tflite")
    assert plain.path.stat().st_size < 0.3 * fp32.stat().st_size


def test_int8_mobilenet_classifies_chelsea_through_litert(plain: tflite.TfliteArtifact, assets: dict[str, Path]) -> None:
    """Through the agent's own LiteRT runtime, with the artifact's quant params, a real cat photo is still a cat."""
    from edge_agent.bundles.manifest import Quantization, TensorSpec
    from edge_agent.runtimes.litert import LiteRTRuntime

    inp = TensorSpec(name=plain.input_name, shape=list(plain.input_shape), dtype="int8", quantization=Quantization(scale=plain.input_quant[0], zero_point=plain.input_quant[1]))
    out = TensorSpec(name=plain.output_name, shape=list(plain.output_shape), dtype="int8", quantization=Quantization(scale=plain.output_quant[0], zero_point=plain.output_quant[1]))
    runtime = LiteRTRuntime(plain.path, [inp], [out], threads=1)
    runtime.load()
    try:
        x = normalise(crop01(cv2.imread(str(assets["photos"] / "chelsea.jpg"))))[None]
        logits = runtime.infer(x)[0]
    finally:
        runtime.close()
    labels = LABELS.read_text().splitlines()
    assert labels[int(logits.argmax())] in CAT_CLASSES


def test_int8_mobilenet_stays_close_to_fp32_on_unseen_photos(plain: tflite.TfliteArtifact, photo_split: dict[str, np.ndarray], fp32_top1: dict[str, np.ndarray]) -> None:
    """A regression guard on views of photos not used for calibration. Plain full-int8 MobileNetV2 is known to be
    weak on low-confidence photos (about half keep their top-1 on this set: textures, microscopy, the moon); the
    fp32 answer must still be in the int8 top-5 almost always."""
    logits = tflite_logits(plain.path, photo_split["check"])
    ref = fp32_top1["check"]
    assert len(ref) >= 100
    assert np.mean(logits.argmax(1) == ref) >= 0.45
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert np.mean([r in row for r, row in zip(ref, top5)]) >= 0.85


def test_layers_can_be_kept_in_float_with_int8_io(converter: tflite.TfliteConverter, converter_env: Path, assets: dict[str, Path], photo_split: dict[str, np.ndarray], tmp_path: Path) -> None:
    """``float_nodes`` keeps named layers in float (DEQUANTIZE/QUANTIZE around them) while input and output stay int8;
    an unknown name is refused."""
    layers = converter.layers()
    assert len(layers) > 50 and layers[1].op == "CONV_2D"
    art = tflite.convert_int8(
        assets["mobilenet_v2"], photo_split["calibration"], IMAGENET_MEAN, IMAGENET_STD, tmp_path / "one_float.tflite",
        float_nodes=[layers[1].name], env=converter_env, cache_dir=CACHE,
    )
    assert art.float_nodes == (layers[1].name,) and art.float_layers == (layers[1].label,)
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(art.ops)
    assert [t.dtype for t in tflite.read_model(art.path).inputs + tflite.read_model(art.path).outputs] == ["int8", "int8"]
    with pytest.raises(QuantizeInputError, match="unknown float node"):
        converter.quantize(tmp_path / "x.tflite", ["no/such/layer"])


@pytest.mark.slow  # ~28 s on 2 cores: the mixed-precision search over MobileNetV2
def test_mixed_precision_buys_back_agreement(converter_env: Path, assets: dict[str, Path], photo_split: dict[str, np.ndarray], fp32_top1: dict[str, np.ndarray], plain: tflite.TfliteArtifact, tmp_path: Path) -> None:
    """The search evaluates on calibration views only, keeps the most sensitive layers in float, and the result agrees
    with fp32 clearly better than plain int8 on photos the search never saw. The target is out of reach here on
    purpose: the best candidate comes back with ``target_met=False``."""
    calib = photo_split["calibration"]

    def evaluate(path: Path) -> float:
        return agreement(path, calib, fp32_top1["calibration"])

    art = tflite.convert_int8_mixed(
        assets["mobilenet_v2"], calib, IMAGENET_MEAN, IMAGENET_STD, tmp_path / "mixed.tflite",
        evaluate=evaluate, target=0.999, max_float_nodes=8, env=converter_env, cache_dir=CACHE,
    )
    tried = dict(art.trials)
    assert list(tried)[:4] == [0, 1, 2, 4] and 8 in tried
    assert art.target_met is False and art.agreement == max(tried.values())
    assert 0 < len(art.float_nodes) <= 8 and len(art.float_layers) == len(art.float_nodes)
    assert art.agreement > tried[0] + 0.05
    info = tflite.read_model(art.path)
    assert [t.dtype for t in info.inputs + info.outputs] == ["int8", "int8"]
    assert set(art.ops) <= BUILTIN_INT8_OPS | {"QUANTIZE", "DEQUANTIZE"}
    check, ref = photo_split["check"], fp32_top1["check"]
    assert agreement(art.path, check, ref) > agreement(plain.path, check, ref) + 0.1
    # The fully int8 candidate is kept beside it, for the latency comparison.
    assert art.full_int8_path == tmp_path / "mixed.full_int8.tflite" and art.full_int8_path.is_file()
    assert agreement(art.full_int8_path, calib, fp32_top1["calibration"]) == tried[0]


def test_mixed_precision_returns_plain_int8_when_it_already_meets_the_target(converter_env: Path, assets: dict[str, Path], photo_split: dict[str, np.ndarray], tmp_path: Path) -> None:
    """No layer is kept in float when plain int8 is good enough: one candidate, no search."""
    calls: list[Path] = []

    def evaluate(path: Path) -> float:
        calls.append(path)
        return 1.0

    art = tflite.convert_int8_mixed(
        assets["mobilenet_v2"], photo_split["calibration"], IMAGENET_MEAN, IMAGENET_STD, tmp_path / "m.tflite",
        evaluate=evaluate, target=0.95, env=converter_env, cache_dir=CACHE,
    )
    assert len(calls) == 1 and art.float_nodes == () and art.target_met is True and art.trials == ((0, 1.0),)
    assert art.full_int8_path is None and not (tmp_path / "m.full_int8.tflite").exists()


def test_a_broken_model_fails_with_the_converters_words(converter_env: Path, tmp_path: Path) -> None:
    """When the converter itself fails the user gets its reason, not a bare exit status."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(QuantizeError, match=r"TFLite conversion failed \(prepare\)") as info:
        tflite.convert_int8(bad, np.zeros((1, 8, 8, 3), np.float32), 0.5, 0.5, tmp_path / "o.tflite", env=converter_env)
    assert info.value.code == "conversion_failed"
