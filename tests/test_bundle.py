"""Model bundles: packing (API and ``edge-agent pack``) and the verification
that every bundle goes through before the agent reads a byte of its model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.bundles import open_bundle
from edge_agent.bundles.manifest import MANIFEST_NAME
from edge_agent.bundles.pack import pack
from edge_agent.cli import main
from edge_agent.errors import BundleError
from edge_agent.testing import tiny_onnx_classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    return tiny_onnx_classifier(tmp_path / "tiny.onnx", size=(8, 8), classes=4)


@pytest.fixture()
def tiny_bundle(tiny_model: Path, tmp_path: Path) -> Path:
    labels = tmp_path / "labels.txt"
    labels.write_text("apple\nbanana\ncherry\ndate\n")
    return pack(tiny_model, name="tiny", version=3, out=tmp_path / "bundle", labels=labels)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_of(path: Path) -> str:
    with pytest.raises(BundleError) as info:
        open_bundle(path)
    assert info.value.exit_code == 2
    return info.value.code


def pack_cli(*args: str):
    return CliRunner().invoke(main, ["pack", *args])


# ------------------------------------------------------------------- packing


def test_pack_directory_records_specs_and_checksums(tiny_bundle: Path, tiny_model: Path) -> None:
    """The manifest is the device's only source of truth: it must state the model's tensors, preprocessing and each file's sha256/size."""
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["labels.txt", MANIFEST_NAME, "tiny.onnx"]
    assert (data["format"], data["format_version"]) == ("edge-agent-bundle", 1)
    assert (data["name"], data["version"], data["runtime"], data["task"]) == ("tiny", 3, "onnx", "classify")
    assert data["model_file"] == "tiny.onnx" and data["labels"] == "labels.txt"
    files = {f["path"]: f for f in data["files"]}
    assert files["tiny.onnx"]["sha256"] == sha256(tiny_model)
    assert files["tiny.onnx"]["size"] == tiny_model.stat().st_size
    assert files["labels.txt"]["sha256"] == sha256(tiny_bundle / "labels.txt")
    assert data["inputs"] == [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32", "quantization": None}]
    assert data["outputs"] == [{"name": "logits", "shape": [1, 4], "dtype": "float32", "quantization": None}]
    # read off the model's input: NCHW, 8x8, and the documented defaults otherwise
    pre = data["preprocessing"]
    assert (pre["size"], pre["layout"], pre["resize"], pre["color"]) == ([8, 8], "nchw", "stretch", "rgb")


def test_open_verifies_and_exposes_the_bundle(tiny_bundle: Path) -> None:
    """A freshly packed bundle must open cleanly and give the model path and labels in class order."""
    with open_bundle(tiny_bundle) as bundle:
        assert bundle.root == tiny_bundle
        assert bundle.model_path == tiny_bundle / "tiny.onnx"
        assert bundle.manifest.version == 3
        assert bundle.labels() == ["apple", "banana", "cherry", "date"]


def test_pack_targz_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    """The transport form (.tar.gz, manifest at the root) must open to the same manifest, and clean up its extraction."""
    out = pack(tiny_model, name="tiny", version=1, out=tmp_path / "tiny.tar.gz", preprocessing={"resize": "letterbox"})
    with tarfile.open(out, "r:gz") as tar:
        assert sorted(tar.getnames()) == [MANIFEST_NAME, "tiny.onnx"]
    with open_bundle(out, workdir=tmp_path) as bundle:
        root = bundle.root
        assert root != out and root.parent == tmp_path
        assert bundle.manifest.preprocessing.resize == "letterbox"
        assert bundle.model_path.read_bytes() == tiny_model.read_bytes()
    assert not root.exists(), "the extraction directory must be removed on close"


def test_pack_plain_tar(tiny_model: Path, tmp_path: Path) -> None:
    """An uncompressed .tar is also a bundle (CONTRACT §4)."""
    out = pack(tiny_model, name="tiny", version=1, out=tmp_path / "tiny.tar")
    with tarfile.open(out, "r:") as tar:  # not gzip
        assert MANIFEST_NAME in tar.getnames()
    with open_bundle(out) as bundle:
        assert bundle.manifest.name == "tiny"


def test_pack_real_mobilenet(assets: dict[str, Path], tmp_path: Path) -> None:
    """Packing the real MobileNetV2 must read its 224x224 NCHW input, 1000 logits and keep the ImageNet preprocessing."""
    out = pack(
        assets["mobilenet_v2"],
        name="mobilenet_v2",
        version=7,
        out=tmp_path / "mobilenet.tar.gz",
        preprocessing={"resize": "crop", "crop_fraction": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        labels=assets["imagenet_labels"],
    )
    with open_bundle(out) as bundle:
        m = bundle.manifest
        assert m.inputs[0].shape == [1, 3, 224, 224]
        assert m.outputs[0].shape == [1, 1000]
        assert m.preprocessing.size == (224, 224) and m.preprocessing.layout == "nchw"
        assert m.preprocessing.mean == IMAGENET_MEAN and m.preprocessing.crop_fraction == 0.875
        assert m.file("mobilenet_v2.onnx").sha256 == sha256(assets["mobilenet_v2"])
        labels = bundle.labels()
        assert labels is not None and len(labels) == 1000 and labels[285] == "Egyptian cat"


# -------------------------------------------------------------- verification


def test_tampered_model_same_size_is_checksum_mismatch(tiny_bundle: Path) -> None:
    """A flipped byte that keeps the size is exactly what a size check misses; only the sha256 catches it."""
    model = tiny_bundle / "tiny.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert code_of(tiny_bundle) == "checksum_mismatch"


def test_truncated_model_is_size_mismatch(tiny_bundle: Path) -> None:
    """An interrupted copy must be refused with a code that says what happened."""
    model = tiny_bundle / "tiny.onnx"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"'tiny.onnx' is \d+ bytes, the manifest says \d+") as info:
        open_bundle(tiny_bundle)
    assert info.value.code == "size_mismatch"


def test_missing_listed_file(tiny_bundle: Path) -> None:
    """A bundle whose labels (or model) vanished must not load half-way."""
    (tiny_bundle / "labels.txt").unlink()
    assert code_of(tiny_bundle) == "missing_file"


def test_listed_file_replaced_by_symlink_is_missing(tiny_bundle: Path, tiny_model: Path) -> None:
    """A link inside a bundle could point anywhere on the device: it does not count as the listed file."""
    target = tiny_bundle / "tiny.onnx"
    target.unlink()
    target.symlink_to(tiny_model)
    assert code_of(tiny_bundle) == "missing_file"


def test_extra_unlisted_file(tiny_bundle: Path) -> None:
    """Files the manifest does not vouch for must not ride along into the store."""
    (tiny_bundle / "payload.sh").write_text("echo hi\n")
    assert code_of(tiny_bundle) == "unexpected_file"


def test_extra_unlisted_file_in_subdirectory(tiny_bundle: Path) -> None:
    """The unlisted-file check must look into subdirectories too."""
    (tiny_bundle / "sub").mkdir()
    (tiny_bundle / "sub" / "x.bin").write_bytes(b"\0")
    assert code_of(tiny_bundle) == "unexpected_file"


def test_manifest_not_json(tiny_bundle: Path) -> None:
    """A corrupt manifest is a bad bundle, reported as such, not a JSONDecodeError."""
    (tiny_bundle / MANIFEST_NAME).write_text("{not json")
    assert code_of(tiny_bundle) == "bad_manifest"


def test_manifest_missing(tiny_bundle: Path) -> None:
    """A directory without a manifest is not a bundle."""
    (tiny_bundle / MANIFEST_NAME).unlink()
    assert code_of(tiny_bundle) == "bad_manifest"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: m.pop("runtime"), id="missing-runtime"),
        pytest.param(lambda m: m.update(version=0), id="version-0"),
        pytest.param(lambda m: m.update(format_version=2), id="unknown-format-version"),
        pytest.param(lambda m: m.update(surprise=1), id="unknown-key"),
        pytest.param(lambda m: m.update(model_file="other.onnx"), id="model-file-not-listed"),
        pytest.param(lambda m: m["files"][0].update(path="../tiny.onnx"), id="path-escapes"),
        pytest.param(lambda m: m["files"][0].update(sha256="XYZ"), id="bad-sha"),
        pytest.param(lambda m: m["preprocessing"].update(std=[0, 1, 1]), id="std-zero"),
    ],
)
def test_manifest_schema_violations(tiny_bundle: Path, mutate) -> None:
    """Every loader relies on the manifest schema; a manifest that breaks it must be refused before anything else."""
    path = tiny_bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    assert code_of(tiny_bundle) == "bad_manifest"


def test_not_found_and_not_a_bundle(tmp_path: Path, tiny_model: Path) -> None:
    """A wrong path and a file that is neither a directory nor an archive get distinct codes."""
    assert code_of(tmp_path / "nothing") == "bundle_not_found"
    assert code_of(tiny_model) == "bad_archive"


def _archive_with(tmp_path: Path, tiny_bundle: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(tiny_bundle.iterdir()):
            tar.add(item, arcname=item.name)
        tar.addfile(extra, io.BytesIO(data) if extra.isfile() else None)
    return archive


def test_archive_member_escaping_with_dotdot(tmp_path: Path, tiny_bundle: Path) -> None:
    """A '../evil' member (zip-slip) must be refused before anything is written outside the extraction dir."""
    member = tarfile.TarInfo("../evil")
    member.size = 4
    archive = _archive_with(tmp_path, tiny_bundle, member, b"evil")
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(BundleError, match="outside the bundle") as info:
        open_bundle(archive, workdir=workdir)
    assert info.value.code == "bad_archive"
    assert not (tmp_path / "evil").exists() and not (workdir / "evil").exists()
    assert list(workdir.iterdir()) == [], "the failed extraction must be cleaned up"


def test_archive_with_absolute_member(tmp_path: Path, tiny_bundle: Path) -> None:
    """An absolute member path would overwrite a system file when extracted naively."""
    member = tarfile.TarInfo(str(tmp_path / "abs-evil"))
    member.size = 1
    archive = _archive_with(tmp_path, tiny_bundle, member, b"x")
    assert code_of(archive) == "bad_archive"
    assert not (tmp_path / "abs-evil").exists()


def test_archive_with_symlink(tmp_path: Path, tiny_bundle: Path) -> None:
    """A symlink member could make a later write land anywhere: archives carry regular files only."""
    member = tarfile.TarInfo("link")
    member.type = tarfile.SYMTYPE
    member.linkname = "/etc/passwd"
    archive = _archive_with(tmp_path, tiny_bundle, member)
    with pytest.raises(BundleError, match="not a regular file") as info:
        open_bundle(archive)
    assert info.value.code == "bad_archive"


def test_corrupt_archive(tmp_path: Path) -> None:
    """A half-downloaded archive must be a bad_archive error, not a tarfile exception."""
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage" * 20)
    assert code_of(archive) == "bad_archive"


def test_tampered_file_inside_archive(tmp_path: Path, tiny_bundle: Path) -> None:
    """Verification applies to archives as well as directories: a changed model inside a .tar.gz is caught."""
    model = tiny_bundle / "tiny.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        for item in sorted(tiny_bundle.iterdir()):
            tar.add(item, arcname=item.name)
    assert code_of(archive) == "checksum_mismatch"


# ---------------------------------------------------------------- pack (CLI)


def test_cli_pack_writes_a_bundle_with_options(tiny_model: Path, tmp_path: Path) -> None:
    """`edge-agent pack` must record the preprocessing options given on the command line in the manifest."""
    out = tmp_path / "cli.tar.gz"
    result = pack_cli(
        str(tiny_model), "--name", "tiny", "--version", "2", "--out", str(out),
        "--resize", "crop", "--crop-fraction", "0.5", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
        "--color", "bgr", "--top-k", "2", "--threshold", "0.1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote bundle tiny v2 to {out}\n"
    with open_bundle(out) as bundle:
        pre = bundle.manifest.preprocessing
        assert (pre.resize, pre.crop_fraction, pre.mean, pre.std, pre.color) == (
            "crop", 0.5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bgr"
        )
        assert (bundle.manifest.postprocessing.top_k, bundle.manifest.postprocessing.threshold) == (2, 0.1)


def test_cli_pack_dynamic_spatial_dims_needs_size(tmp_path: Path) -> None:
    """A model with dynamic H/W cannot be served without knowing the frame size: refuse with a message that says to give --size."""
    model = tiny_onnx_classifier(tmp_path / "dyn.onnx", size=("W", "H"))
    out = tmp_path / "dyn"
    result = pack_cli(str(model), "--name", "dyn", "--version", "1", "--out", str(out))
    assert result.exit_code == 2
    assert "dynamic spatial dimensions" in result.stderr and "--size WxH" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    # with --size it packs, and the size is recorded as (W, H)
    result = pack_cli(str(model), "--name", "dyn", "--version", "1", "--out", str(out), "--size", "16x12")
    assert result.exit_code == 0, result.output
    with open_bundle(out) as bundle:
        assert bundle.manifest.preprocessing.size == (16, 12)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("notes.txt", b"just some notes\n", "unsupported file type '.txt'"),
        ("garbage.onnx", b"this is not a protobuf" * 8, "garbage.onnx"),
        ("garbage.tflite", b"this is not a flatbuffer" * 8, "garbage.tflite"),
    ],
)
def test_cli_pack_non_model_file(tmp_path: Path, name: str, content: bytes, words: str) -> None:
    """Packing something that is not a model is the user's mistake: exit 2 with the file named, no traceback, nothing written."""
    model = tmp_path / name
    model.write_bytes(content)
    out = tmp_path / "out"
    result = pack_cli(str(model), "--name", "x", "--version", "1", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and words in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_pack_refuses_existing_out(tiny_model: Path, tmp_path: Path) -> None:
    """Packing must never silently overwrite an existing bundle (it may be the one deployed)."""
    out = tmp_path / "existing.tar.gz"
    out.write_bytes(b"precious")
    result = pack_cli(str(tiny_model), "--name", "tiny", "--version", "1", "--out", str(out))
    assert result.exit_code == 2
    assert "already exists" in result.stderr and str(out) in result.stderr
    assert out.read_bytes() == b"precious"


def test_cli_pack_missing_model_and_bad_options(tiny_model: Path, tmp_path: Path) -> None:
    """Typos on the command line are usage errors (exit 2) with a message, whether ours or click's."""
    missing = pack_cli(str(tmp_path / "nope.onnx"), "--name", "x", "--version", "1", "--out", str(tmp_path / "o"))
    assert missing.exit_code == 2 and "not found" in missing.stderr
    bad_size = pack_cli(str(tiny_model), "--name", "x", "--version", "1", "--out", str(tmp_path / "o"), "--size", "8by8")
    assert bad_size.exit_code == 2 and "expected WxH" in bad_size.output
    bad_name = pack_cli(str(tiny_model), "--name", "no spaces", "--version", "1", "--out", str(tmp_path / "o"))
    assert bad_name.exit_code == 2 and "no spaces" in bad_name.stderr
    assert "Traceback" not in missing.output + bad_size.output + bad_name.output
    assert not (tmp_path / "o").exists()


def test_pack_leaves_no_partial_output_on_failure(tiny_model: Path, tmp_path: Path) -> None:
    """A failed pack must not leave a half-written bundle or staging directory next to --out."""
    before = set(tmp_path.iterdir())
    with pytest.raises(BundleError):
        pack(tiny_model, name="tiny", version=1, out=tmp_path / "x.tar.gz", labels=tmp_path / "no-labels.txt")
    assert set(tmp_path.iterdir()) == before
