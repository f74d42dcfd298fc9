"""The agent's configuration: every mistake is reported at once, naming the
file and the key, through ``load_config`` and ``edge-agent validate-config``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.cli import main
from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

VALID = """\
device_id = "cam-01"
groups = ["lobby", "floor-2"]

[mqtt]
host = "broker.local"
port = 8883
topic_prefix = "edge"
telemetry_interval_s = 5

[store]
path = "store"
keep_versions = 2

[[models]]
name = "classifier"
bundle = "bundles/classifier.tar.gz"
threads = 4

[[sources]]
name = "front"
uri = "videos/front.avi"
model = "classifier"
fps = 5
loop = true

[[sources]]
name = "cam"
uri = "/dev/video0"
model = "classifier"

[http]
enabled = true
port = 8601
"""

# One file with one mistake of every kind, each on a different key.
MANY_PROBLEMS = """\
device_id = "cam-01"
colour = "red"

[mqtt]
port = "1883"
telemetry_interval_s = -1

[[models]]
name = "classifier"
threads = 0

[[models]]
name = "classifier"

[[sources]]
name = "front"
uri = "0"
model = "detector"
fps = 0
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == 2
    return info.value.problems


def validate(*args: str):
    return CliRunner().invoke(main, ["validate-config", *args])


# ----------------------------------------------------------------- load_config


def test_valid_config_loads_with_its_values(tmp_path: Path) -> None:
    """A correct file must load with exactly the values written, so the agent runs what the operator wrote."""
    cfg = load_config(write(tmp_path, VALID))
    assert isinstance(cfg, AgentConfig)
    assert cfg.device_id == "cam-01"
    assert cfg.groups == ["lobby", "floor-2"]
    assert cfg.mqtt is not None and (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.telemetry_interval_s) == (
        "broker.local",
        8883,
        5.0,
    )
    assert cfg.store.keep_versions == 2
    assert cfg.model("classifier").threads == 4
    assert [s.name for s in cfg.sources] == ["front", "cam"]
    assert cfg.sources[0].fps == 5.0 and cfg.sources[0].loop is True
    assert cfg.sources[1].fps is None and cfg.sources[1].loop is False
    assert cfg.http.enabled is True and cfg.http.port == 8601


def test_left_out_sections_take_defaults(tmp_path: Path) -> None:
    """Without [mqtt] the agent runs offline; other sections fall back to documented defaults."""
    cfg = load_config(write(tmp_path, 'device_id = "solo"\n'))
    assert cfg.mqtt is None
    assert cfg.store.path == Path("/var/lib/edge-agent/models")
    assert cfg.store.keep_versions == 3
    assert cfg.http.enabled is False and (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8501)
    assert cfg.models == [] and cfg.sources == []


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config must mean the same thing whichever directory systemd or a shell starts the agent from."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(write(conf_dir, VALID))
    assert cfg.store.path == conf_dir / "store"
    assert cfg.model("classifier").bundle == conf_dir / "bundles" / "classifier.tar.gz"
    assert cfg.sources[0].uri == str(conf_dir / "videos" / "front.avi")
    # device paths and camera indexes are not file paths and stay as written
    assert cfg.sources[1].uri == "/dev/video0"


def test_non_file_uris_and_home_paths(tmp_path: Path) -> None:
    """Camera indexes and stream URLs must not be mangled into paths; ~ means the user's home."""
    text = """\
[store]
path = "~/models"
[[models]]
name = "m"
[[sources]]
name = "idx"
uri = "0"
model = "m"
[[sources]]
name = "net"
uri = "rtsp://10.0.0.5/stream1"
model = "m"
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.store.path == Path.home() / "models"
    assert [s.uri for s in cfg.sources] == ["0", "rtsp://10.0.0.5/stream1"]


def test_unknown_key_is_named_with_its_section(tmp_path: Path) -> None:
    """A typo must not pass silently: the message names the file and the full key path."""
    path = write(tmp_path, '[mqtt]\nhost = "h"\nprot = 1883\n')
    assert problems_of(path) == [f"{path}: mqtt.prot: unknown key"]


def test_unknown_key_inside_a_list_item_names_the_item(tmp_path: Path) -> None:
    """In a list of sources the operator needs to know which one is wrong, by index and by name."""
    text = '[[models]]\nname = "m"\n[[sources]]\nname = "front"\nuri = "0"\nmodel = "m"\nfsp = 5\n'
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}: sources[0] (front).fsp: unknown key"]


@pytest.mark.parametrize(
    ("toml", "key", "got"),
    [
        ('[mqtt]\nport = "abc"\n', "mqtt.port", "'abc'"),
        ('[mqtt]\nport = "1883"\n', "mqtt.port", "'1883'"),
        ("[mqtt]\nport = true\n", "mqtt.port", "True"),
        ('[[models]]\nname = "m"\nthreads = 2.5\n', "models[0] (m).threads", "2.5"),
        ('[[models]]\nname = "m"\n[[sources]]\nname = "s"\nuri = "0"\nmodel = "m"\nloop = 1\n', "sources[0] (s).loop", "1"),
        ("mqtt = 5\n", "mqtt", "5"),
        ('groups = "lobby"\n', "groups", "'lobby'"),
    ],
)
def test_wrong_type_is_an_error(tmp_path: Path, toml: str, key: str, got: str) -> None:
    """TOML has real types: a string, bool or float where another type belongs is a mistake, not something to coerce (port = true must not mean port 1)."""
    path = write(tmp_path, toml)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {key}: ")
    assert f"(got {got})" in problems[0]


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal to 65535"),
        ("[mqtt]\nport = 0\n", "mqtt.port", "greater than or equal to 1"),
        ("[mqtt]\ntelemetry_interval_s = 0\n", "mqtt.telemetry_interval_s", "greater than 0"),
        ("[store]\nkeep_versions = 0\n", "store.keep_versions", "greater than or equal to 1"),
        ('[[models]]\nname = "m"\n[[sources]]\nname = "s"\nuri = "0"\nmodel = "m"\nthreshold = 1.5\n', "sources[0] (s).threshold", "less than or equal to 1"),
        ('log_level = "verbose"\n', "log_level", "'debug', 'info', 'warning' or 'error'"),
        ('device_id = "cam 01"\n', "device_id", "not a valid name"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_limit(tmp_path: Path, toml: str, key: str, words: str) -> None:
    """An out-of-range value must say which key and what the allowed range is, so it can be fixed without the docs."""
    path = write(tmp_path, toml)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {key}: ")
    assert words in problems[0]


def test_source_naming_an_unknown_model(tmp_path: Path) -> None:
    """A source served by a model that does not exist would never produce results: say so, listing the models."""
    text = '[[models]]\nname = "classifier"\n[[sources]]\nname = "front"\nuri = "0"\nmodel = "detector"\n'
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}: sources[0] (front).model: no model named 'detector' (models: classifier)"
    ]


def test_duplicate_names_are_errors(tmp_path: Path) -> None:
    """Two sources (or models) with one name would publish to the same topic / overwrite each other in the store."""
    text = (
        '[[models]]\nname = "m"\n[[models]]\nname = "m"\n'
        '[[sources]]\nname = "cam"\nuri = "0"\nmodel = "m"\n'
        '[[sources]]\nname = "cam"\nuri = "1"\nmodel = "m"\n'
    )
    path = write(tmp_path, text)
    assert sorted(problems_of(path)) == sorted(
        [f"{path}: models[1].name: 'm' is used twice", f"{path}: sources[1].name: 'cam' is used twice"]
    )


def test_missing_required_key(tmp_path: Path) -> None:
    """A source without a model cannot run; the message must name the missing key."""
    path = write(tmp_path, '[[models]]\nname = "m"\n[[sources]]\nname = "s"\nuri = "0"\n')
    assert problems_of(path) == [f"{path}: sources[0] (s).model: required key is missing"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Fixing a config one error per run is miserable on a device: all problems come in one report."""
    path = write(tmp_path, MANY_PROBLEMS)
    problems = problems_of(path)
    keys = [p.removeprefix(f"{path}: ").split(": ")[0] for p in problems]
    assert sorted(keys) == sorted(
        [
            "colour",
            "mqtt.port",
            "mqtt.telemetry_interval_s",
            "models[0] (classifier).threads",
            "models[1].name",
            "sources[0] (front).fps",
            "sources[0] (front).model",
        ]
    )
    assert all(p.startswith(f"{path}: ") for p in problems)


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    """A syntax error must point at the file and where in it, not raise a parser traceback."""
    path = write(tmp_path, 'device_id = "cam-01"\n[mqtt\nport = 1883\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in problem


def test_missing_file(tmp_path: Path) -> None:
    """A wrong --config path must say the file is not there rather than run with defaults."""
    path = tmp_path / "nope.toml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """A binary or Latin-1 file is a config error with the file named, not a UnicodeDecodeError."""
    path = tmp_path / "agent.toml"
    path.write_bytes(b'device_id = "caf\xe9"\n')
    assert problems_of(path) == [f"{path}: not UTF-8 text"]


# ------------------------------------------------------------- validate-config


def test_cli_valid_config_exits_0_with_a_summary(tmp_path: Path) -> None:
    """An operator checking a good file gets exit 0 and a one-line summary of what will run."""
    path = write(tmp_path, VALID)
    result = validate(str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: OK (device cam-01, 1 model(s), 2 source(s), mqtt on)\n"
    assert result.stderr == ""


def test_cli_demo_config_validates() -> None:
    """The shipped demo config must always be valid, or the documented demo fails on its first step."""
    result = validate("--config", str(REPO / "configs" / "demo.toml"))
    assert result.exit_code == 0, result.output
    assert "OK (device demo, 1 model(s), 1 source(s), mqtt off)" in result.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    """Users copy the configs in configs/ as their starting point: each must pass validate-config."""
    result = validate(str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{path}: OK")


def test_cli_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    """validate-config is how an operator finds all mistakes: every one on stderr, exit code 2, no traceback."""
    path = write(tmp_path, MANY_PROBLEMS)
    result = validate(str(path))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 7, result.stderr
    assert all(line.startswith(f"error: {path}: ") for line in lines)
    for key in ("colour: unknown key", "mqtt.port", "models[1].name", "sources[0] (front).model: no model named 'detector'"):
        assert key in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mqtt]\nhost = "h"\nprot = 1883\n', "mqtt.prot: unknown key"),
        ('[mqtt]\nport = "abc"\n', "mqtt.port: Input should be a valid integer"),
        ("[mqtt]\nport = 70000\n", "mqtt.port: Input should be less than or equal to 65535"),
        ('[[sources]]\nname = "s"\nuri = "0"\nmodel = "ghost"\n', "sources[0] (s).model: no model named 'ghost'"),
        ('[[models]]\nname = "m"\n[[models]]\nname = "m"\n', "models[1].name: 'm' is used twice"),
        ('[mqtt\n', "invalid TOML"),
    ],
)
def test_cli_each_kind_of_error(tmp_path: Path, text: str, expected: str) -> None:
    """Each kind of mistake reaches the operator as 'error: FILE: KEY: what', exit 2, never a traceback."""
    path = write(tmp_path, text)
    result = validate(str(path))
    assert result.exit_code == 2
    assert f"error: {path}: {expected}" in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), "a clean exit, not an uncaught exception"


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    """A mistyped path is a usage error (exit 2) naming the path."""
    path = tmp_path / "missing.toml"
    result = validate("--config", str(path))
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: file not found\n"
    assert "Traceback" not in result.output


def test_cli_positional_path_wins_over_config_option(tmp_path: Path) -> None:
    """validate-config PATH checks PATH even when --config is also given (the explicit argument is what the user is looking at)."""
    good = write(tmp_path, VALID, "good.toml")
    result = validate(str(good), "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{good}: OK")
