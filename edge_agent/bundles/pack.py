"""Making bundles on the workstation: ``edge-agent pack``, writing a staged
bundle out as a directory or an archive, and signing a bundle.

:func:`pack` opens the model with its runtime (to read its tensors, and to
record ``samples.npz``), so this module may import the runtimes and the
preprocessing, only when it packs. The device never imports it: opening and
verifying a bundle is :mod:`edge_agent.bundles.verify`. Its functions keep no
state between calls.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.bundles.manifest import (
    MANIFEST_NAME,
    ClassifyParams,
    DetectParams,
    FileEntry,
    Manifest,
    Preprocessing,
    TensorSpec,
    concrete_input,
    detect_params,
)
from edge_agent.bundles.verify import is_archive, open_bundle, sha256_file, verify_dir
from edge_agent.errors import BundleError, ModelLoadError

SAMPLES_NAME = "samples.npz"


def default_preprocessing(inp: TensorSpec, **overrides: Any) -> Preprocessing:
    """Preprocessing for a model input: explicit options win, the rest is read
    off the input's shape (layout from where the channel axis is, size from
    the spatial dims). Raises BundleError when the size cannot be known."""
    shape = inp.shape
    opts = {k: v for k, v in overrides.items() if v is not None}
    if "layout" not in opts and len(shape) == 4:
        opts["layout"] = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
    layout = opts.get("layout", "nchw")
    if len(shape) == 4:
        channels = shape[1] if layout == "nchw" else shape[3]
        if channels == 1 and "color" not in opts:
            opts["color"] = "gray"
    if "size" not in opts:
        if len(shape) != 4:
            raise BundleError(f"input {inp.name!r} has shape {shape}: give --size WxH", code="unsupported_model")
        h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
        if h is None or w is None:
            raise BundleError(
                f"input {inp.name!r} has dynamic spatial dimensions {shape}: give --size WxH", code="unsupported_model"
            )
        opts["size"] = (w, h)
    return Preprocessing(**opts)


def pack(
    model: Path | str,
    *,
    name: str,
    version: int,
    out: Path | str,
    preprocessing: dict[str, Any] | None = None,
    labels: Path | str | None = None,
    task: str = "classify",
    postprocessing: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    sign_key: Path | str | None = None,
    sample_images: Sequence[Path | str] = (),
    decoder: str = "auto",
    anchors: Path | str | dict[str, Any] | None = None,
    notes: Callable[[str], None] | None = None,
) -> Path:
    """Wrap an .onnx or .tflite file into a bundle at ``out`` (a directory, or
    an archive when ``out`` ends in .tar/.tar.gz). Returns ``out``.

    With ``sign_key`` (an Ed25519 private key file) the staged bundle is
    signed (``manifest.sig``) before it is written out or archived.

    The model is opened with its runtime to read the input/output specs, so a
    file the runtime cannot read is refused here rather than on the device.

    ``sample_images`` are preprocessed and run through the model here; the
    inputs and outputs go into ``samples.npz`` so that the device can check,
    before a version serves, that it computes the same answers.

    ``task="detect"``: ``postprocessing`` naming a ``decoder`` is taken as it
    is (a bundle re-packed, e.g. by the quantizer); otherwise ``decoder``
    (``auto``: from the outputs) and ``anchors`` (a JSON file or object of
    MediaPipe anchor options) choose it (:func:`edge_agent.bundles.detect.choose_decoder`)
    and ``notes`` hears what was found. Class names come from ``labels``,
    else from the model's metadata (Ultralytics' ``names``).
    """
    from edge_agent.runtimes import describe_model, runtime_for_file

    model = Path(model).expanduser()
    out = Path(out).expanduser()
    if not model.is_file():
        raise BundleError(f"model {model}: not found", code="bundle_not_found")
    private_key = None
    if sign_key is not None:  # a bad key fails before any work is done
        from edge_agent.bundles.signing import load_private_key

        private_key = load_private_key(sign_key)
    runtime = runtime_for_file(model)
    try:
        inputs, outputs = describe_model(model, runtime)
    except ModelLoadError as exc:
        # The file given to pack is not a model its runtime can read: the
        # user's mistake (exit 2), not a runtime failure on the device.
        raise BundleError(f"model {model}: not a usable model file ({exc})", code="unsupported_model") from None
    pre: Preprocessing | None = None
    post: ClassifyParams | DetectParams | None = None
    names: list[str] | None = None
    if task == "tensor":
        _check_tensor_options(model, preprocessing, postprocessing, labels, sample_images)
    elif len(inputs) != 1:
        raise BundleError(
            f"model {model}: has {len(inputs)} inputs; a camera model takes exactly one image "
            "(--task tensor serves any model, its inputs and outputs as tensors)", code="unsupported_model"
        )
    else:
        pre_opts = dict(preprocessing or {})
        if task == "detect":
            pre_opts = _pixel_range(inputs[0], pre_opts, notes)
        pre = default_preprocessing(inputs[0], **pre_opts)
    if task == "tensor":
        pass
    elif task == "detect":
        post, names = _detect_params(model, runtime, inputs, outputs, pre, postprocessing, labels, decoder, anchors,
                                     notes)
    else:
        try:
            post = ClassifyParams.model_validate(postprocessing or {})
        except ValidationError as exc:
            raise BundleError(f"cannot pack {model}: {exc.errors()[0]['msg']}", code="bad_manifest") from None

    with tempfile.TemporaryDirectory(prefix="pack-", dir=out.parent if out.parent.exists() else None) as tmp:
        stage = Path(tmp) / "bundle"
        stage.mkdir()
        files = {model.name: model}
        label_name = None
        if labels is not None:
            labels = Path(labels).expanduser()
            if not labels.is_file():
                raise BundleError(f"labels {labels}: not found", code="bundle_not_found")
            label_name = "labels.txt"
            files[label_name] = labels
        elif names:
            label_name = "labels.txt"
            files[label_name] = Path(tmp) / label_name
            files[label_name].write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        files.update(extra_files or {})
        entries = []
        for rel, src in files.items():
            shutil.copyfile(src, stage / rel)
            entries.append(FileEntry(path=rel, sha256=sha256_file(stage / rel), size=(stage / rel).stat().st_size))
        try:
            manifest = Manifest(
                name=name,
                version=version,
                runtime=runtime,
                model_file=model.name,
                files=entries,
                inputs=inputs,
                outputs=outputs,
                preprocessing=pre,
                task=task,
                postprocessing=post,
                labels=label_name,
                created_at=time.time(),
                created_by=f"edge-agent {__version__}",
                metadata=metadata or {},
            )
        except ValidationError as exc:
            raise BundleError(f"cannot pack {model}: {exc.errors()[0]['msg']}", code="bad_manifest") from None
        if sample_images:
            _write_samples(stage / SAMPLES_NAME, model, runtime, manifest, sample_images)
            entry = FileEntry(
                path=SAMPLES_NAME, sha256=sha256_file(stage / SAMPLES_NAME), size=(stage / SAMPLES_NAME).stat().st_size
            )
            manifest = manifest.model_copy(update={"files": [*manifest.files, entry], "samples": SAMPLES_NAME})
        (stage / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        if private_key is not None:
            from edge_agent.bundles.signing import sign_dir

            sign_dir(stage, private_key)
        write_bundle(stage, out)
    return out


def _check_tensor_options(model: Path, preprocessing: dict[str, Any] | None, postprocessing: dict[str, Any] | None,
                          labels: Path | str | None, sample_images: Sequence[Path | str]) -> None:
    """A tensor model takes no frame and gives no result: options about
    those are a mistake, said rather than ignored."""
    given = sorted(k for k, v in (preprocessing or {}).items() if v is not None)
    given += sorted(f"postprocessing {k}" for k, v in (postprocessing or {}).items() if v is not None)
    if labels is not None:
        given.append("labels")
    if sample_images:
        given.append("samples")
    if given:
        raise BundleError(
            f"cannot pack {model} as --task tensor: {', '.join(given)} do not apply (a tensor model takes its "
            "inputs as tensors and answers its outputs; no preprocessing, labels or samples)", code="bad_usage"
        )


def _pixel_range(inp: TensorSpec, opts: dict[str, Any], notes: Callable[[str], None] | None) -> dict[str, Any]:
    """A detector with a quantized uint8 input (TFLite detectors) takes raw
    pixels: where no --mean/--std are given, choose the ones whose
    quantization gives back the pixel values."""
    q = inp.quantization
    if inp.dtype != "uint8" or q is None or opts.get("mean") is not None or opts.get("std") is not None:
        return opts
    std = 1.0 / (255.0 * q.scale)
    mean = q.zero_point / 255.0
    if notes:
        notes(f"input {inp.name!r} is uint8 (scale {q.scale:g}, zero point {q.zero_point}): "
              f"raw pixels, i.e. --mean {mean:.6g} --std {std:.6g}")
    return {**opts, "mean": (mean,) * 3, "std": (std,) * 3}


def _detect_params(
    model: Path,
    runtime: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    pre: Preprocessing,
    postprocessing: dict[str, Any] | None,
    labels: Path | str | None,
    decoder: str,
    anchors: Path | str | dict[str, Any] | None,
    notes: Callable[[str], None] | None,
) -> tuple[DetectParams, list[str] | None]:
    """The detection parameters (given, or chosen from the outputs) and the
    class names the model carries."""
    from edge_agent.bundles.detect import choose_decoder, load_anchors

    given = dict(postprocessing or {})
    if given.get("decoder") not in (None, "auto"):
        try:
            return detect_params(given), None
        except ValidationError as exc:
            raise BundleError(f"cannot pack {model}: {exc.errors()[0]['msg']}", code="bad_manifest") from None
        except ValueError as exc:
            raise BundleError(f"cannot pack {model}: {exc}", code="bad_manifest") from None
    given.pop("decoder", None)
    num_labels = None
    if labels is not None and Path(labels).expanduser().is_file():
        num_labels = sum(1 for _ in Path(labels).expanduser().read_text(encoding="utf-8").splitlines())
    spec = anchors if isinstance(anchors, dict) or anchors is None else load_anchors(anchors)
    choice = choose_decoder(model, runtime, outputs, pre.size, decoder=decoder, anchors=spec, num_labels=num_labels,
                            extra=given)
    if notes:
        notes(f"detector: {choice.params.decoder}: {choice.found}")
        if choice.names is None and labels is None:
            notes("no class names (give --labels FILE): detections are labelled by class index")
    return choice.params, choice.names if labels is None else None


def _write_samples(
    dest: Path, model: Path, runtime: str, manifest: Manifest, images: Sequence[Path | str]
) -> None:
    """Preprocess ``images`` as the agent will and record the model's outputs."""
    import cv2
    import numpy as np

    from edge_agent.pipeline.preprocess import Preprocessor
    from edge_agent.runtimes import create_runtime

    spec = concrete_input(manifest.inputs[0], manifest.preprocessing)
    pre = Preprocessor(manifest.preprocessing, spec)
    rt = create_runtime(runtime, model, [spec], manifest.outputs, threads=1)
    rt.load()
    inputs, outputs = [], []
    try:
        for image in images:
            frame = cv2.imread(str(image), cv2.IMREAD_COLOR)
            if frame is None:
                raise BundleError(f"sample image {image}: not a readable image", code="bad_sample")
            tensor, _ = pre(frame)
            inputs.append(tensor)
            outputs.append(rt.infer(tensor))
    finally:
        rt.close()
    arrays = {"input": np.concatenate(inputs)}
    for k in range(len(outputs[0])):
        arrays[f"output_{k}"] = np.concatenate([o[k] for o in outputs])
    np.savez(dest, **arrays)


def write_bundle(stage: Path, out: Path) -> None:
    """Move a staged bundle directory to ``out`` (dir or archive), replacing
    nothing: an existing ``out`` is an error rather than silently overwritten."""
    if out.exists():
        raise BundleError(f"{out} already exists; remove it or choose another --out", code="bad_usage")
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_archive(out):
        mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
        tmp_out = out.with_name(out.name + ".partial")
        with tarfile.open(tmp_out, mode) as tar:
            for item in sorted(stage.iterdir()):
                tar.add(item, arcname=item.name)
        os.replace(tmp_out, out)
    else:
        shutil.copytree(stage, out)


# ----------------------------------------------------------------- signing


def sign_bundle(bundle: Path | str, private_key_path: Path | str) -> Path:
    """Sign a bundle with the Ed25519 private key at ``private_key_path``.

    The bundle is verified first (manifest schema, every file's size and
    sha256): only a bundle that verifies gets signed. A directory gets
    ``manifest.sig`` beside its ``manifest.json`` (an older signature is
    replaced) and the signature's path is returned. An archive is unpacked,
    signed and written back in place (atomically; its sha256 changes) and its
    path is returned. ``edge-agent pack --sign-key`` signs the staged
    directory before it writes the archive, which is the cheaper order.
    """
    from edge_agent.bundles.signing import load_private_key, sign_dir

    bundle = Path(bundle).expanduser()
    key = load_private_key(private_key_path)
    if bundle.is_dir():
        verify_dir(bundle)
        return sign_dir(bundle, key)
    with open_bundle(bundle) as opened:  # refuses what is neither a bundle dir nor an archive
        sign_dir(opened.root, key)
        assert is_archive(bundle)
        tmp_out = bundle.with_name(f".signing-{os.getpid()}-{bundle.name}")
        tmp_out.unlink(missing_ok=True)
        try:
            write_bundle(opened.root, tmp_out)
            os.replace(tmp_out, bundle)
        except BaseException:
            tmp_out.unlink(missing_ok=True)
            raise
    return bundle

