"""The agent's configuration: typed models that reject unknown keys.

``load_config(path)`` reads a TOML file and returns an :class:`AgentConfig`, or
raises :class:`~edge_agent.errors.ConfigError` listing *every* problem, each
naming the file, the key and what is wrong. Relative paths in the file are
resolved against the file's own directory and ``~`` is expanded, so a config
works the same whichever directory the agent was started from.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A device, group, source or model name (they end up in MQTT topics and
directory names); the fleet console checks its targets with it too."""


def _check_name(value: str) -> str:
    """Names end up in MQTT topics and directory names: keep them tame."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ``~`` and make a relative path relative to the config file."""
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


Name = Annotated[str, AfterValidator(_check_name)]
# Paths are written as TOML strings: the one place a str is converted.
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve_path)]


class _Section(BaseModel):
    # strict: TOML values are typed, so a quoted number or ``port = true`` is a
    # mistake to report, not something to coerce (true would become port 1).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TlsConfig(_Section):
    ca_certs: ConfigPath | None = Field(None, description="CA bundle that signed the broker's certificate.")
    certfile: ConfigPath | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    keyfile: ConfigPath | None = Field(None, description="Private key of the client certificate.")
    insecure: bool = Field(False, description="Skip the broker host-name check (testing only).")

    @model_validator(mode="after")
    def _cert_and_key(self) -> "TlsConfig":
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile must be given together")
        return self


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    topic_prefix: str = Field("edge", min_length=1, description="First level of every topic.")
    telemetry_interval_s: float = Field(10.0, gt=0, description="Seconds between telemetry messages.")
    username: str | None = Field(None, description="Broker user name.")
    password: str | None = Field(None, description="Broker password.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    results_qos: Literal[0, 1] = Field(0, description="QoS of per-frame result messages.")
    session_expiry_s: int = Field(
        86400, ge=0, description="How long the broker keeps this device's session (and QoS 1 commands) while it is away."
    )
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plain TCP.")

    @model_validator(mode="after")
    def _prefix(self) -> "MqttConfig":
        if self.password is not None and self.username is None:
            raise ValueError("password is set without a username")
        if any(ch in self.topic_prefix for ch in "+#") or self.topic_prefix.strip("/") != self.topic_prefix:
            raise ValueError("topic_prefix must not contain '+' or '#' nor start or end with '/'")
        return self


class StoreConfig(_Section):
    path: ConfigPath = Field(Path("/var/lib/edge-agent/models"), description="Directory of the versioned model store.")
    keep_versions: int = Field(3, ge=1, description="Old versions kept for rollback.")
    trusted_keys: list[ConfigPath] = Field(
        default_factory=list,
        description="Ed25519 public keys (from `edge-agent keygen`); when set, every bundle must be signed by one.",
    )
    control_socket: ConfigPath | None = Field(
        None, description="Unix socket of the running agent's local control path (default: <path>/agent.sock)."
    )
    max_bundle_mb: float = Field(512.0, gt=0, description="Largest bundle a deploy may bring.")
    max_unpacked_mb: float = Field(
        1024.0, gt=0, description="Largest size a bundle may unpack to (its files summed, as its manifest lists them)."
    )
    min_free_mb: float = Field(
        64.0, ge=0, description="Free space a deploy must leave on the store's disk once the bundle is unpacked."
    )

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * 1e6)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_mb * 1e6)

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.path / "agent.sock"


class ModelConfig(_Section):
    name: Name = Field(description="The model's name; sources refer to it.")
    bundle: ConfigPath | None = Field(
        None,
        description="Bundle (directory or .tar/.tar.gz) installed into the store at start "
        "when the store holds no version of this model yet.",
    )
    threads: int = Field(2, ge=1, le=64, description="Runtime intra-op threads.")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime execution providers, in order of preference.",
    )
    version_policy: Literal["latest", "specific"] = Field(
        "latest", description="latest: serve the active version (newest when none is chosen); specific: only `versions`."
    )
    latest: int = Field(1, ge=1, le=16, description="With `latest`: versions kept loaded (the active one and those just below).")
    versions: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="With `specific`: the versions that may serve."
    )
    swap: Literal["auto", "availability", "resource"] = Field(
        "auto",
        description="availability: load the new version while the old serves; resource: unload first "
        "(a gap, for tight memory); auto: availability when free memory allows.",
    )
    probation_frames: int = Field(100, ge=1, description="Frames a newly activated version must serve to pass probation.")
    probation_s: float = Field(60.0, gt=0, description="Or seconds, whichever comes first.")
    probation_max_errors: int = Field(1, ge=1, description="Inference errors during probation that trigger a rollback.")
    max_latency_factor: float = Field(
        3.0, gt=1, description="Median latency during probation above this times the previous version's: roll back."
    )
    smoke_tolerance: float | None = Field(
        None, gt=0, description="Override the bundle's tolerance for its sample outputs (fraction of the output range)."
    )
    batch_size: int = Field(
        1, ge=1, le=64, description="Micro-batching: up to this many frames of the sources this model serves go "
        "through one inference (the model's input needs a dynamic batch dimension; else frames go one by one). "
        "1: no batching."
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="With batch_size > 1: the longest the first frame of a batch waits for others."
    )

    @model_validator(mode="after")
    def _policy(self) -> "ModelConfig":
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs a non-empty `versions` list")
        if self.version_policy == "latest" and self.versions:
            raise ValueError("`versions` is only used with version_policy = 'specific'")
        return self


Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class ZoneConfig(_Section):
    """A zone of a detector source: a polygon in the source frame's pixels
    (``[x, y]`` corners in order, the last joined to the first). A detection
    is in the zone when its anchor point is inside the polygon."""

    name: Name = Field(description="The zone's name; events and detections name it.")
    points: list[Point] = Field(description="The polygon's corners, [x, y] in source-frame pixels (at least 3).")
    anchor: Literal["bottom_center", "center"] = Field(
        "bottom_center",
        description="The point of a box that must lie in the polygon: bottom_center (where a person or a car "
        "stands on the ground, as Frigate does) or center.",
    )

    @field_validator("points")
    @classmethod
    def _polygon(cls, value: list[list[float]]) -> list[list[float]]:
        if len(value) < 3:
            raise ValueError(f"a zone needs at least 3 points, got {len(value)}")
        area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(value, value[1:] + value[:1]))
        if abs(area2) < 1e-9:
            raise ValueError("the points enclose no area (all on one line)")
        return value


class EventsConfig(_Section):
    """The debounce of a tracked source's detection events, in processed frames."""

    min_frames: int = Field(
        3, ge=1, le=1000,
        description="Frames a track must be seen before object_appeared, and seen in (or out of) a zone "
        "before object_entered (or object_left).",
    )
    lost_frames: int = Field(
        5, ge=1, le=10000,
        description="Frames without its detection before a track is object_gone (and leaves the zones it was in).",
    )
    iou: float = Field(
        0.3, gt=0, le=1, description="Least IoU between a track's predicted box and a detection to match them."
    )


class SourceConfig(_Section):
    """One camera, stream, file, folder or program. Exactly one of ``uri`` and
    ``command``; ``format``, ``width``, ``height`` and ``pixel_format`` belong to
    ``command`` (the raw geometry to ``format = "raw"``)."""

    name: Name = Field(description="The source's name; results go to results/<name>.")
    # Declared before `uri`, `format` before the raw geometry: their validators read it.
    command: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        min_length=1,
        description="A program and its arguments (argv, no shell) whose stdout carries the frames, "
        "e.g. rpicam-vid, gst-launch-1.0 or ffmpeg; instead of `uri`.",
    )
    uri: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="A camera index ('0') or /dev/videoN, an rtsp:// or http(s):// stream, "
        "a video file or a folder of images.",
    )
    model: Name = Field(description="The model that serves this source.")
    label: Name | None = Field(None, description="Serve by this version label (e.g. 'canary') instead of the active version.")
    format: Literal["mjpeg", "raw"] = Field(
        "mjpeg", description="With `command`: what its stdout carries, concatenated JPEG frames or raw frames."
    )
    width: int | None = Field(
        None, ge=1, le=16384, validate_default=True, description="With format = 'raw': frame width in pixels."
    )
    height: int | None = Field(
        None, ge=1, le=16384, validate_default=True, description="With format = 'raw': frame height in pixels."
    )
    pixel_format: Literal["bgr24", "rgb24", "gray"] | None = Field(
        None, validate_default=True, description="With format = 'raw': the pixel layout (3, 3 or 1 bytes a pixel)."
    )
    stall_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A live source (camera, stream, command) that delivers no frame for this long is "
        "restarted: the capture reopened, the program killed and started again.",
    )

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                'must be a list of arguments, run without a shell, e.g. ["rpicam-vid", "-t", "0", "--codec", '
                f'"mjpeg", "-o", "-"], not one string (got {value!r})'
            )
        return value

    @field_validator("uri")
    @classmethod
    def _file_uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Exactly one of uri and command; a file or folder path is resolved
        like every other path in the file."""
        if "command" not in info.data:
            return value  # `command` itself is wrong: reported on its own
        command = info.data["command"]
        if value is None:
            if command is None:
                raise ValueError("required key is missing (or give `command`, a program whose stdout carries the frames)")
            return None
        if command is not None:
            raise ValueError("give either `uri` or `command`, not both")
        value = value.strip()
        if value.isdigit() or "://" in value or value.startswith("/dev/"):
            return value
        return str(_resolve_path(Path(value), info))

    @field_validator("width", "height", "pixel_format")
    @classmethod
    def _raw_geometry(cls, value: Any, info: ValidationInfo) -> Any:
        """A raw stream has no frame boundaries of its own: its size and pixel
        format must be given, and only there do they mean anything."""
        if "format" not in info.data or "command" not in info.data:
            return value  # reported on their own
        raw = info.data["format"] == "raw" and info.data["command"] is not None
        if raw and value is None:
            what = {"width": "frame width in pixels", "height": "frame height in pixels",
                    "pixel_format": '"bgr24", "rgb24" or "gray"'}[info.field_name or ""]
            raise ValueError(f'required with format = "raw" ({what})')
        if not raw and value is not None:
            raise ValueError('only used with `command` and format = "raw"')
        return value

    @model_validator(mode="after")
    def _format_needs_command(self) -> "SourceConfig":
        if self.command is None and "format" in self.model_fields_set:
            raise ValueError("format: only used with `command` (what the program's stdout carries)")
        return self

    @property
    def frame_bytes(self) -> int | None:
        """Bytes of one raw frame (format = "raw"), else None."""
        if self.format != "raw" or self.width is None or self.height is None or self.pixel_format is None:
            return None
        return self.width * self.height * (1 if self.pixel_format == "gray" else 3)

    fps: float | None = Field(None, gt=0, description="Inference rate cap; frames in between are skipped.")
    loop: bool = Field(False, description="Replay a file or folder when it ends.")
    realtime: bool = Field(
        True,
        description="Play a file or folder at its own frame rate, skipping what inference cannot keep up "
        "with, as a camera would. false: hand every frame to inference (benchmarks, batch jobs).",
    )
    source_fps: float | None = Field(
        None, gt=0, description="Replay rate of a file or folder in realtime mode (default: the video's own, 5 for a folder)."
    )
    top_k: int | None = Field(
        None, ge=1, le=1000, description="Classes (or detections) reported per result (default: the bundle's)."
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Minimum score for a reported class or detection (default: the bundle's)."
    )
    log_results: bool = Field(
        False,
        description="Log one line per result (logger edge_agent.results). Off by default: a line per frame per "
        "camera in the journal wears an SD card; results go to MQTT (and the spool) either way.",
    )
    # Detector sources: filters, zones, tracking and events (docs/detection.md).
    labels: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="Detectors: report only these labels (the model's class names)."
    )
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description="Detectors: per-label score threshold, above the model's (or the source's `threshold`).",
    )
    min_box_area: float = Field(0.0, ge=0, description="Detectors: drop boxes smaller than this, in pixels² of the source frame.")
    track: bool = Field(False, description="Detectors: a tracker per source; every detection gets a track_id, events are published.")
    zones: list[ZoneConfig] = Field(default_factory=list, description="Detectors: named polygons in source-frame pixels.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Detectors with track = true: the events' debounce.")

    @property
    def detection_filters(self) -> bool:
        """Whether this source filters, zones or tracks detections."""
        return bool(self.labels or self.thresholds or self.min_box_area or self.track or self.zones)


class CommandsConfig(_Section):
    max_payload: int = Field(256 * 1024, ge=1024, description="Largest command accepted, in bytes (payload_too_large).")
    memory: int = Field(1024, ge=1, description="Command ids remembered so that a repeat is answered, not run again.")
    workers: int = Field(2, ge=1, le=16, description="Commands executed at once (a deploy takes one for its duration).")
    max_waiting: int = Field(
        256, ge=1, le=100_000, description="Commands waiting for a worker; one more is answered `busy` (not run), "
        "or shed and counted when its id cannot be read."
    )
    trusted_keys: list[ConfigPath] = Field(
        default_factory=list,
        description="Ed25519 public keys (from `edge-agent keygen`); when set, every command over MQTT must be "
        "signed by one of them (`edge-agent fleet --sign-key`).",
    )
    max_age_s: float = Field(
        86400.0, ge=0, description="With trusted_keys: a command signed longer ago than this is refused "
        "(stale_command); 0: no limit."
    )


class SpoolConfig(_Section):
    enabled: bool = Field(True, description="Keep results, events and telemetry on disk while the broker is away.")
    path: ConfigPath | None = Field(None, description="The spool's SQLite file (default: <store.path>/.spool.db).")
    max_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024, description="Bound of the spooled messages' size.")


class DownloadConfig(_Section):
    retries: int = Field(5, ge=0, le=100, description="Retries after a transient failure (resuming with Range).")
    timeout_s: float = Field(30.0, gt=0, description="Socket time-out of each request.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")
    max_backoff_s: float = Field(60.0, ge=0, description="Longest retry delay.")


class TransferConfig(_Section):
    staging: ConfigPath | None = Field(
        None, description="Where MQTT transfers are assembled (default: <store.path>/.transfers)."
    )
    idle_s: float = Field(2.0, gt=0, description="Silence before asking for missing chunks.")
    max_idle_s: float = Field(30.0, gt=0, description="Longest wait between two requests.")
    deadline_s: float = Field(3600.0, gt=0, description="A transfer not complete by then fails.")


class HttpConfig(_Section):
    enabled: bool = Field(False, description="Serve the local HTTP API.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8501, ge=0, le=65535, description="Port to bind (0: any free port, logged at start).")
    max_body_mb: float = Field(32.0, gt=0, description="Largest predict request body accepted, in MB.")
    idle_timeout_s: float = Field(30.0, gt=0, description="A connection idle (or stalled mid-request) this long is closed.")


class BatchingConfig(_Section):
    """Batching of predict requests (HTTP and gRPC), TF Serving's batching
    parameters by their names (edge_agent.serving.batching)."""

    enabled: bool = Field(False, description="Merge concurrent predict requests to one model version into one "
                          "inference (models whose inputs and outputs have a dynamic first dimension).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most rows (first-dimension entries) in one merged "
                                "inference; a request with more runs alone.")
    batch_timeout_micros: int = Field(2000, ge=0, le=10_000_000, description="Longest the first request of a batch "
                                      "waits for others, in microseconds (a batch waiting for a thread takes more meanwhile).")
    num_batch_threads: int = Field(1, ge=1, le=64, description="Merged inferences that may run at once.")
    max_enqueued_batches: int = Field(16, ge=1, le=100_000, description="Batches per model version and input "
                                      "shape waiting to run (the open one included); a request finding them all "
                                      "taken is refused with UNAVAILABLE (HTTP 503), as TF Serving does.")


class ServerTlsConfig(_Section):
    certfile: ConfigPath = Field(description="The server's certificate chain (PEM).")
    keyfile: ConfigPath = Field(description="The server certificate's private key (PEM).")
    client_ca_certs: ConfigPath | None = Field(
        None, description="CA bundle of the client certificates to require (mutual TLS); absent: any client may call."
    )


class GrpcConfig(_Section):
    enabled: bool = Field(False, description="Serve TF Serving's gRPC API (PredictionService, ModelService); "
                          "needs the grpc extra (grpcio, protobuf).")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8500, ge=0, le=65535, description="Port to bind (0: any free port, logged at start).")
    max_message_mb: float = Field(32.0, gt=0, description="Largest request message accepted, in MB "
                                  "(a larger one is refused with RESOURCE_EXHAUSTED).")
    workers: int = Field(8, ge=1, le=256, description="Requests served at once; more wait for a free worker.")
    tls: ServerTlsConfig | None = Field(None, description="TLS settings; absent means plain TCP (h2c).")


class LoggingConfig(_Section):
    format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record (the journal's default); json: one JSON object "
        "per line (ts, level, logger, message, thread, exc) for Loki, Elasticsearch and the like."
    )


class WatchdogConfig(_Section):
    stall_s: float = Field(
        60.0, gt=0, description="A frame that takes longer than this to process, or a capture thread stuck in one "
        "call this long (and 3x the source's stall_timeout_s), stops the systemd watchdog pings."
    )


class AgentConfig(_Section):
    device_id: Name = Field(default_factory=lambda: _default_device_id(), description="This device's id in topics.")
    groups: list[Name] = Field(default_factory=list, description="Fleet groups this device answers to.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    mqtt: MqttConfig | None = Field(None, description="Broker connection; absent: run offline, log results only.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The versioned model store.")
    models: list[ModelConfig] = Field(default_factory=list, description="Models the agent serves.")
    sources: list[SourceConfig] = Field(default_factory=list, description="Cameras and streams.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="Local HTTP API.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Batching of predict requests.")
    grpc: GrpcConfig = Field(default_factory=GrpcConfig, description="TF Serving's gRPC API.")
    commands: CommandsConfig = Field(default_factory=CommandsConfig, description="The MQTT command plane.")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="Store-and-forward while the broker is away.")
    download: DownloadConfig = Field(default_factory=DownloadConfig, description="Bundle downloads by URL.")
    transfer: TransferConfig = Field(default_factory=TransferConfig, description="Bundle delivery over MQTT.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log format.")
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig, description="The systemd watchdog.")

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def _default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].lstrip("-_.")
    return host or "edge-device"


def _format_loc(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """('sources', 0, 'fps') -> 'sources[0].fps', adding the item's name when it has one."""
    out = ""
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    out += f" ({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            if part.startswith(("function-", "constrained-")) or part in ("str", "int", "float", "bool"):
                continue
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _format_error(err: dict[str, Any], data: dict[str, Any]) -> str:
    loc = _format_loc(tuple(err["loc"]), data)
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def _cross_problems(data: dict[str, Any]) -> list[str]:
    """Checks across sections, run on the raw mapping so that they are reported
    together with the per-key problems rather than after those are fixed."""
    problems = []
    sections = {k: data.get(k) for k in ("models", "sources")}
    for kind, items in sections.items():
        problems += [f"{kind}[{i}].name: {name!r} is used twice" for i, name in _repeated_names(items)]
    models = sections["models"] if isinstance(sections["models"], list) else []
    model_names = {m.get("name") for m in models if isinstance(m, dict)}
    sources = sections["sources"] if isinstance(sections["sources"], list) else []
    for i, src in enumerate(sources):
        if isinstance(src, dict) and isinstance(src.get("model"), str) and src["model"] not in model_names:
            known = ", ".join(sorted(n for n in model_names if isinstance(n, str))) or "none configured"
            problems.append(f"sources[{i}] ({src.get('name')}).model: no model named {src['model']!r} (models: {known})")
        if isinstance(src, dict):
            problems += _detection_problems(f"sources[{i}] ({src.get('name')})", src)
    return problems


def _repeated_names(items: Any) -> list[tuple[int, str]]:
    """(index, name) of every table in the raw list ``items`` whose ``name``
    an earlier one already has."""
    seen: set[str] = set()
    repeated = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str):
            if name in seen:
                repeated.append((i, name))
            seen.add(name)
    return repeated


def _detection_problems(where: str, src: dict[str, Any]) -> list[str]:
    """A detector source's keys that only make sense together: zone names
    used once, labels listed once, a threshold only for a listed label."""
    problems = [f"{where}.zones[{j}] ({name}).name: used twice (zone names must differ)"
                for j, name in _repeated_names(src.get("zones"))]
    labels, thresholds = src.get("labels"), src.get("thresholds")
    if isinstance(labels, list):
        dupes = sorted({x for x in labels if isinstance(x, str) and labels.count(x) > 1})
        if dupes:
            problems.append(f"{where}.labels: {', '.join(map(repr, dupes))} listed twice")
        if isinstance(thresholds, dict):
            unlisted = [k for k in thresholds if k not in labels]
            if unlisted:
                problems.append(f"{where}.thresholds: {', '.join(map(repr, unlisted))} not in `labels` "
                                "(a label left out of `labels` is never reported)")
    return problems


def parse_config(data: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """Validate an already-parsed mapping; errors name ``source`` as the file."""
    problems: list[str] = []
    config = None
    try:
        config = AgentConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [_format_error(e, data) for e in exc.errors()]
    problems += _cross_problems(data)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    assert config is not None
    return config


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate a TOML config file. Raises ConfigError (exit code 2)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
