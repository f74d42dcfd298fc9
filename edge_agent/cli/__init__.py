"""The ``edge-agent`` command line (CONTRACT §1).

Heavy modules are imported inside each command, so ``edge-agent run`` on a Pi
loads only what serving needs. Exit codes: 0 success, 1 runtime failure, 2 bad
usage or bad config. A user error prints one clear message, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from edge_agent import __version__
from edge_agent.cli.common import CONFIG_ENV, CONFIG_HELP, DEFAULT_CONFIG, config_option, user_errors

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="edge-agent", message="%(prog)s %(version)s")
def main() -> None:
    """edge-agent: run int8 vision models on fleets of edge devices."""


@main.command()
@config_option
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text (the journal's default) or one JSON object per line "
              "[default: the config's logging.format, else text].")
@user_errors
def run(config_path: str, log_format: str | None) -> None:
    """Run the agent (what systemd starts).

    SIGTERM/SIGINT stop it cleanly; SIGHUP re-reads the config. Under
    systemd (NOTIFY_SOCKET set) it speaks the notify protocol and the
    watchdog (docs/deployment.md).
    """
    import faulthandler

    from edge_agent.agent import run_agent
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError, EdgeAgentError
    from edge_agent.logs import setup_logging

    config = load_config(config_path)
    setup_logging(config.log_level, log_format or config.logging.format)
    # systemd's watchdog ends a stuck agent with SIGABRT: dump every
    # thread's stack to the journal first, so the stuck call is on record.
    faulthandler.enable(all_threads=True)
    try:
        code = run_agent(config, config_path)
    except ConfigError as exc:
        # Found only once the models are read (a source bound to a tensor model): still the config's fault.
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(exc.exit_code)
    except EdgeAgentError as exc:
        # The config was valid: whatever stops the agent now is a runtime failure.
        logging.getLogger("edge_agent").error("cannot run: %s", exc)
        code = 1
    sys.exit(code)


@main.command("validate-config")
@click.argument("path", required=False)
@click.option("--config", "config_path", default=None, envvar=CONFIG_ENV, show_envvar=True,
              help=CONFIG_HELP + f" [default: {DEFAULT_CONFIG}]")
@user_errors
def validate_config(path: str | None, config_path: str | None) -> None:
    """Check a config file and print every problem in it."""
    from edge_agent.config import load_config

    target = path or config_path or DEFAULT_CONFIG
    config = load_config(target)
    click.echo(
        f"{target}: OK (device {config.device_id}, {len(config.models)} model(s), "
        f"{len(config.sources)} source(s), mqtt {'on' if config.mqtt else 'off'})"
    )


def _parse_size(_ctx: Any, _param: Any, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
        if w < 1 or h < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected WxH, e.g. 224x224") from None
    return w, h


def _parse_triple(_ctx: Any, _param: Any, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected three numbers a,b,c") from None
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r}: expected three numbers a,b,c")
    return parts  # type: ignore[return-value]


def preprocessing_options(func: F) -> F:
    """The preprocessing options shared by ``pack`` and ``quantize``."""
    options = [
        click.option("--size", callback=_parse_size, help="Model input size WxH (default: from the model)."),
        click.option("--resize", type=click.Choice(["stretch", "crop", "letterbox"]), help="How a frame is fitted."),
        click.option(
            "--crop-fraction",
            type=click.FloatRange(0, 1, min_open=True),
            help="With --resize crop: the short side is scaled to size/fraction before the centre crop "
            "(ImageNet: 0.875, i.e. 256 then 224).",
        ),
        click.option(
            "--pad-value",
            type=click.IntRange(0, 255),
            help="With --resize letterbox: the grey of the padding bands (default 0; Ultralytics YOLO: 114).",
        ),
        click.option("--mean", callback=_parse_triple, help="Per-channel mean of pixels in [0, 1]."),
        click.option("--std", callback=_parse_triple, help="Per-channel std of pixels in [0, 1]."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Tensor layout."),
        click.option("--color", type=click.Choice(["rgb", "bgr", "gray"]), help="Channel order."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Model name (as sources refer to it).")
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="Integer version.")
@click.option("--out", required=True, type=click.Path(), help="Bundle directory, or .tar / .tar.gz archive.")
@preprocessing_options
@click.option("--labels", type=click.Path(dir_okay=False), help="Text file, one label per line in class order.")
@click.option("--task", type=click.Choice(["classify", "detect", "tensor"]), default="classify", show_default=True,
              help="classify or detect: a camera model; tensor: any model, its inputs and outputs as tensors, "
              "served over HTTP and gRPC only (no preprocessing options).")
@click.option("--top-k", type=click.IntRange(min=1), help="Classes reported per result (classify).")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Minimum score reported.")
@click.option(
    "--decoder",
    type=click.Choice(["auto", "yolo", "ssd", "tflite-postprocess"]),
    default="auto",
    show_default=True,
    help="Detection decoder (--task detect); auto: recognised from the model's outputs.",
)
@click.option(
    "--anchors",
    type=click.Path(dir_okay=False),
    help="JSON file describing raw SSD outputs: MediaPipe SsdAnchorsCalculatorOptions fields and the box "
    "coder's (docs/bundle.md).",
)
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Ed25519 private key (from edge-agent keygen): sign the bundle (manifest.sig).",
)
@click.option(
    "--sample",
    "samples",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Image to record with the model's outputs (repeatable); the device checks them before serving.",
)
@user_errors
def pack(
    model: str,
    name: str,
    version: int,
    out: str,
    labels: str | None,
    task: str,
    top_k: int | None,
    threshold: float | None,
    decoder: str,
    anchors: str | None,
    sign_key: str | None,
    samples: tuple[str, ...],
    **pre: Any,
) -> None:
    """Wrap an .onnx or .tflite MODEL into a model bundle."""
    from edge_agent.bundles.pack import pack as pack_bundle

    post: dict[str, Any] = {}
    if top_k is not None:
        if task != "classify":
            raise click.UsageError("--top-k applies to --task classify")
        post["top_k"] = top_k
    if threshold is not None:
        post["threshold"] = threshold
    if task != "detect" and (decoder != "auto" or anchors):
        raise click.UsageError("--decoder and --anchors apply to --task detect")
    path = pack_bundle(
        Path(model),
        name=name,
        version=version,
        out=Path(out),
        preprocessing=pre,
        labels=Path(labels) if labels else None,
        task=task,
        postprocessing=post,
        sign_key=Path(sign_key) if sign_key else None,
        sample_images=[Path(s) for s in samples],
        decoder=decoder,
        anchors=Path(anchors) if anchors else None,
        notes=lambda line: click.echo(line, err=True),
    )
    signed = ""
    if sign_key:
        from edge_agent.bundles.signing import key_id, load_private_key

        signed = f", signed with key {key_id(load_private_key(Path(sign_key)).public_key())}"
    click.echo(f"wrote bundle {name} v{version} to {path}{signed}")


@main.command()
@click.option(
    "--out",
    "prefix",
    required=True,
    type=click.Path(dir_okay=False),
    help="Path prefix: writes PREFIX.key (private, mode 0600) and PREFIX.pub (public).",
)
@user_errors
def keygen(prefix: str) -> None:
    """Make an Ed25519 key pair for signing bundles.

    Sign with the private key (pack --sign-key PREFIX.key); give the devices
    the public key (PREFIX.pub). Existing files are never overwritten.
    """
    from edge_agent.bundles.signing import generate_keypair

    if not Path(prefix).name or prefix.endswith("/"):
        raise click.BadParameter(f"{prefix!r}: give a file name prefix, e.g. keys/fleet", param_hint="--out")
    private, public = Path(prefix + ".key"), Path(prefix + ".pub")
    kid = generate_keypair(private, public)
    click.echo(f"wrote private key {private} (keep it secret) and public key {public}")
    click.echo(f"key id {kid}")


@main.command()
@click.argument("model", metavar="MODEL_OR_BUNDLE", type=click.Path())
@click.option("--calibration", required=True, type=click.Path(), help="Folder of images (or class folders), video or .npz.")
@click.option("--out", required=True, type=click.Path(), help="Output directory: bundles, report.json, report.html.")
@click.option("--eval", "evaluation", type=click.Path(), help="Evaluation pictures, disjoint from calibration "
              "(default: every 5th calibration picture, held out). Class folders give labels and accuracy.")
@click.option("--name", help="Bundle name (default: the input bundle's, or the file name).")
@click.option("--version", "version", type=click.IntRange(min=1), help="Bundle version (default: input bundle's + 1, or 1).")
@preprocessing_options
@click.option("--labels", type=click.Path(dir_okay=False), help="Labels file (for a plain .onnx input).")
@click.option("--task", type=click.Choice(["classify", "detect"]), help="Task (for a plain .onnx input; default classify).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="Calibration method for activation ranges (default: minmax for a classifier, percentile for a "
                   "detector).")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weights instead of per-channel.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Quality gate: minimum agreement with fp32 of every int8 artifact: top-1 agreement (classifiers), mAP@0.5 against the fp32 boxes (detectors).")
@click.option("--no-mixed-precision", is_flag=True, help="Do not keep sensitive layers in float to meet the gate.")
@click.option("--no-bias-correction", is_flag=True, help="Do not fold the measured mean error of each int8 layer into its bias.")
@click.option("--no-float-residual", is_flag=True, help="Quantize the residual (skip) connections too (default: Adds stay float).")
@click.option("--no-equalize", is_flag=True, help="Do not rescale wide channels of residual streams before calibrating.")
@click.option("--target", "targets", multiple=True, type=click.Choice(["onnx", "tflite"]),
              help="Artifacts to make (default: both).")
@click.option("--prune", help="magnitude:S (zero the smallest weights, sparsity S) or channels:R (remove a fraction R of conv channels).")
@click.option("--sign-key", type=click.Path(dir_okay=False), help="Ed25519 private key: sign the bundles.")
@click.option("--calibration-limit", type=click.IntRange(min=1), default=300, show_default=True,
              help="Use at most this many calibration pictures (evenly spaced).")
@user_errors
def quantize(model: str, calibration: str, out: str, evaluation: str | None, name: str | None, version: int | None,
             labels: str | None, task: str | None, method: str, per_tensor: bool, min_agreement: float,
             no_mixed_precision: bool, no_bias_correction: bool, no_float_residual: bool, no_equalize: bool, targets: tuple[str, ...],
             prune: str | None, sign_key: str | None, calibration_limit: int, **pre: Any) -> None:
    """Make int8 ONNX and int8 TFLite bundles from an fp32 ONNX model, with a
    measured report and a quality gate (exit 1 when it fails)."""
    import contextlib

    from quantize.pipeline import QuantizeOptions, run as run_quantize

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # ONNX Runtime's quantizer logs advice on the root logger; ours are named.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name != "root")

    @contextlib.contextmanager
    def progress(label: str, total: int):
        with click.progressbar(length=total, label=f"{label:<18}", file=sys.stderr) as bar:
            yield bar.update

    opts = QuantizeOptions(
        model=Path(model), calibration=Path(calibration), out=Path(out),
        evaluation=Path(evaluation) if evaluation else None, name=name, version=version, preprocessing=pre,
        labels=Path(labels) if labels else None, task=task, method=method, per_channel=not per_tensor,
        min_agreement=min_agreement, mixed_precision=not no_mixed_precision, targets=targets or ("onnx", "tflite"),
        prune=prune, sign_key=Path(sign_key) if sign_key else None, calibration_limit=calibration_limit,
        bias_correction=not no_bias_correction, float_residual=not no_float_residual, equalize=not no_equalize,
    )
    run_quantize(opts, progress=progress, echo=click.echo)


@main.command()
@click.argument("models", metavar="MODEL_OR_BUNDLE...", nargs=-1, required=True, type=click.Path())
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True, help="Runtime threads per model.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Interleaved rounds (each times every model once).")
@click.option("--runs", type=click.IntRange(1), default=20, show_default=True, help="Timed runs per model and round.")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed runs before each timing.")
@click.option("--image", type=click.Path(dir_okay=False), help="A picture to time frames with (default: a 640x480 test frame).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report only.")
@user_errors
def bench(models: tuple[str, ...], threads: int, rounds: int, runs: int, warmup: int, image: str | None,
          as_json: bool) -> None:
    """Latency and throughput of models side by side on this device.

    Give model files (.onnx, .tflite), bundles, or a directory of bundles
    (what `edge-agent quantize --out` writes); the first model is the
    baseline, e.g. the fp32 bundle, then the int8 ones. Models are timed in
    interleaved rounds so that ratios stay fair on a busy device.
    """
    import json

    from edge_agent import bench as bench_mod

    frame = bench_mod.load_image(image) if image else None
    say = (lambda _msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    report = bench_mod.run(models, threads=threads, rounds=rounds, runs=runs, warmup=warmup, image=frame,
                           progress=say)
    click.echo(json.dumps(report, indent=2) if as_json else bench_mod.table(report))


from edge_agent.cli.models import models as _models_group  # noqa: E402

main.add_command(_models_group)

from edge_agent.cli.fleet import fleet as _fleet_group  # noqa: E402

main.add_command(_fleet_group)


if __name__ == "__main__":  # pragma: no cover
    main()
