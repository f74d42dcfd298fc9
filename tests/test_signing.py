"""Bundle signatures: ``edge-agent keygen``, ``pack --sign-key`` and the
verification a device with trusted keys applies before it accepts a bundle."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.bundles import extract_archive, open_bundle, verify_bundle_signature
from edge_agent.bundles.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.bundles.pack import pack, sign_bundle
from edge_agent.bundles.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    load_trusted_keys,
)
from edge_agent.cli import main
from edge_agent.errors import BundleError, UsageError
from edge_agent.testing import tiny_onnx_classifier


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    return tiny_onnx_classifier(tmp_path / "tiny.onnx", size=(8, 8), classes=4)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """Two key pairs: "a" (the trusted one) and "b" (someone else's)."""
    out = {}
    for name in ("a", "b"):
        private, public = tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub"
        out[name] = (private, public, generate_keypair(private, public))
    return out


@pytest.fixture()
def signed_dir(tiny_model: Path, tmp_path: Path, keys) -> Path:
    labels = tmp_path / "labels.txt"
    labels.write_text("apple\nbanana\ncherry\ndate\n")
    return pack(tiny_model, name="tiny", version=1, out=tmp_path / "signed", labels=labels, sign_key=keys["a"][0])


@pytest.fixture()
def unsigned_dir(tiny_model: Path, tmp_path: Path) -> Path:
    return pack(tiny_model, name="tiny", version=1, out=tmp_path / "unsigned")


def code_of(path: Path, trusted: list[Path]) -> tuple[str, str]:
    with pytest.raises(BundleError) as info:
        open_bundle(path, trusted_keys=trusted)
    assert info.value.exit_code == 2
    return info.value.code, str(info.value)


def rewrite_sig(bundle: Path, **changes: object) -> None:
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    doc.update(changes)
    (bundle / SIGNATURE_NAME).write_text(json.dumps(doc))


# ------------------------------------------------------------------------ keys


def test_keygen_writes_pem_pair_with_private_mode_0600(keys) -> None:
    """The private key must be readable by its owner only and both files must be standard PEM (openssl-compatible)."""
    private, public, kid = keys["a"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)
    assert kid != keys["b"][2]
    assert load_trusted_keys([public]).keys() == {kid}
    assert load_private_key(private).public_key() == load_public_key(public)


@pytest.mark.parametrize("existing", ["key", "pub"])
def test_keygen_never_overwrites_and_writes_nothing_when_either_exists(tmp_path: Path, existing: str) -> None:
    """Overwriting a signing key would silently orphan every device that trusts it."""
    (tmp_path / f"k.{existing}").write_text("precious")
    with pytest.raises(UsageError) as info:
        generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert info.value.code == "key_exists" and info.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"k.{existing}"]
    assert (tmp_path / f"k.{existing}").read_text() == "precious"


# ------------------------------------------------------------ sign and verify


def test_signed_bundle_verifies_and_names_its_key(signed_dir: Path, keys) -> None:
    """pack --sign-key writes manifest.sig in the documented format, and a device trusting the key accepts the bundle."""
    doc = json.loads((signed_dir / SIGNATURE_NAME).read_text())
    assert doc["algorithm"] == "ed25519" and doc["key_id"] == keys["a"][2]
    assert len(base64.b64decode(doc["signature"])) == 64
    manifest = json.loads((signed_dir / MANIFEST_NAME).read_text())
    assert SIGNATURE_NAME not in {f["path"] for f in manifest["files"]}  # the signature is not listed
    with open_bundle(signed_dir, trusted_keys=[keys["a"][1]]) as bundle:
        assert bundle.signed_by == keys["a"][2]
        assert bundle.labels() == ["apple", "banana", "cherry", "date"]
    assert verify_bundle_signature(signed_dir, [keys["a"][1]]) == keys["a"][2]
    # several trusted keys (rotation): any of them will do
    assert verify_bundle_signature(signed_dir, [keys["b"][1], keys["a"][1]]) == keys["a"][2]
    # without trusted keys the signature is not looked at
    with open_bundle(signed_dir) as bundle:
        assert bundle.signed_by is None


def test_sign_bundle_signs_an_existing_directory_and_replaces_an_old_signature(unsigned_dir: Path, keys) -> None:
    """Signing after the fact, and re-signing with a new key (rotation), must both give a bundle that verifies."""
    sig = sign_bundle(unsigned_dir, keys["a"][0])
    assert sig == unsigned_dir / SIGNATURE_NAME
    assert verify_bundle_signature(unsigned_dir, [keys["a"][1]]) == keys["a"][2]
    sign_bundle(unsigned_dir, keys["b"][0])
    assert verify_bundle_signature(unsigned_dir, [keys["b"][1]]) == keys["b"][2]
    assert code_of(unsigned_dir, [keys["a"][1]])[0] == "untrusted_key"
    assert sorted(p.name for p in unsigned_dir.iterdir()) == [MANIFEST_NAME, SIGNATURE_NAME, "tiny.onnx"]


def test_sign_bundle_refuses_a_bundle_that_does_not_verify(unsigned_dir: Path, keys) -> None:
    """Signing vouches for the files: a tampered bundle must not get a signature."""
    (unsigned_dir / "tiny.onnx").write_bytes(b"not the model")
    with pytest.raises(BundleError) as info:
        sign_bundle(unsigned_dir, keys["a"][0])
    assert info.value.code == "size_mismatch"
    assert not (unsigned_dir / SIGNATURE_NAME).exists()


# ------------------------------------------------------------------- refusals


def test_manifest_changed_after_signing_is_signature_invalid(signed_dir: Path, keys) -> None:
    """A manifest edited consistently with its files passes the checksums; only the signature can catch it."""
    data = json.loads((signed_dir / MANIFEST_NAME).read_text())
    data["postprocessing"]["top_k"] = 1
    (signed_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    with open_bundle(signed_dir):  # still a valid bundle by its checksums
        pass
    code, message = code_of(signed_dir, [keys["a"][1]])
    assert code == "signature_invalid"
    assert "changed after signing" in message


def test_even_a_whitespace_change_to_the_manifest_breaks_the_signature(signed_dir: Path, keys) -> None:
    """The signature covers the exact bytes, not a re-serialisation."""
    path = signed_dir / MANIFEST_NAME
    path.write_bytes(path.read_bytes() + b"\n")
    assert code_of(signed_dir, [keys["a"][1]])[0] == "signature_invalid"


def test_signature_by_another_key_is_untrusted(tiny_model: Path, tmp_path: Path, keys) -> None:
    """A valid signature by a key the device does not trust must be refused, naming the signer's key id."""
    bundle = pack(tiny_model, name="tiny", version=1, out=tmp_path / "by-b", sign_key=keys["b"][0])
    code, message = code_of(bundle, [keys["a"][1]])
    assert code == "untrusted_key"
    assert keys["b"][2] in message and keys["a"][2] in message


def test_signature_claiming_a_trusted_key_id_is_invalid(tiny_model: Path, tmp_path: Path, keys) -> None:
    """key_id is only a hint: claiming the trusted key's id does not make another key's signature valid."""
    bundle = pack(tiny_model, name="tiny", version=1, out=tmp_path / "by-b", sign_key=keys["b"][0])
    rewrite_sig(bundle, key_id=keys["a"][2])
    assert code_of(bundle, [keys["a"][1]])[0] == "signature_invalid"


def test_unsigned_bundle_is_refused_only_when_keys_are_trusted(unsigned_dir: Path, keys) -> None:
    """Without trusted keys an unsigned bundle is accepted; with them it is signature_missing."""
    with open_bundle(unsigned_dir):
        pass
    code, message = code_of(unsigned_dir, [keys["a"][1]])
    assert code == "signature_missing" and "not signed" in message


def test_file_changed_after_signing_is_caught_by_its_checksum_first(signed_dir: Path, keys) -> None:
    """The manifest is intact, so the signature alone would pass: the sha256 check must catch the file first."""
    model = signed_dir / "tiny.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    model.write_bytes(bytes(data))
    assert code_of(signed_dir, [keys["a"][1]])[0] == "checksum_mismatch"
    model.unlink()
    assert code_of(signed_dir, [keys["a"][1]])[0] == "missing_file"


@pytest.mark.parametrize(
    "content",
    [
        b"not json at all",
        b"\xff\xfe\x00",
        b"[]",
        json.dumps({"algorithm": "rsa", "key_id": "0" * 16, "signature": "AA=="}).encode(),
        json.dumps({"algorithm": "ed25519", "key_id": "XYZ", "signature": "AA=="}).encode(),
        json.dumps({"algorithm": "ed25519", "key_id": "0" * 16}).encode(),
        json.dumps({"algorithm": "ed25519", "key_id": "0" * 16, "signature": "***not base64***"}).encode(),
        json.dumps({"algorithm": "ed25519", "key_id": "0" * 16, "signature": "AAAA"}).encode(),
        b"",
    ],
    ids=["text", "binary", "array", "algorithm", "key_id", "no-signature", "not-base64", "short", "empty"],
)
def test_malformed_signature_file_is_signature_invalid(signed_dir: Path, keys, content: bytes) -> None:
    """A corrupt manifest.sig must be refused with a clear code, never crash the verifier."""
    (signed_dir / SIGNATURE_NAME).write_bytes(content)
    code, message = code_of(signed_dir, [keys["a"][1]])
    assert code == "signature_invalid" and "malformed" in message


def test_signature_path_that_is_not_a_file_is_signature_invalid(signed_dir: Path, keys) -> None:
    """A directory or symbolic link named manifest.sig is not a signature."""
    sig = signed_dir / SIGNATURE_NAME
    target = signed_dir.parent / "elsewhere.sig"
    sig.rename(target)
    sig.symlink_to(target)
    assert code_of(signed_dir, [keys["a"][1]])[0] == "signature_invalid"
    sig.unlink()
    sig.mkdir()
    assert code_of(signed_dir, [keys["a"][1]])[0] == "signature_invalid"


# --------------------------------------------------------------------- archives


def test_signed_archive_from_pack_verifies(tiny_model: Path, tmp_path: Path, keys) -> None:
    """pack signs the staged directory before archiving, so the archive carries manifest.sig at its root."""
    archive = pack(tiny_model, name="tiny", version=2, out=tmp_path / "tiny-2.tar.gz", sign_key=keys["a"][0])
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [MANIFEST_NAME, SIGNATURE_NAME, "tiny.onnx"]
    assert verify_bundle_signature(archive, [keys["a"][1]]) == keys["a"][2]
    with open_bundle(archive, trusted_keys=[keys["a"][1]]) as bundle:
        assert bundle.signed_by == keys["a"][2] and bundle.manifest.version == 2
    code, message = code_of(archive, [keys["b"][1]])
    assert code == "untrusted_key"
    assert f"bundle {archive}:" in message  # names the archive, not the temporary extraction folder


def test_tampered_archive_is_refused(tiny_model: Path, tmp_path: Path, keys) -> None:
    """An archive re-packed with an edited manifest must fail the signature check."""
    archive = pack(tiny_model, name="tiny", version=2, out=tmp_path / "tiny-2.tar", sign_key=keys["a"][0])
    work = tmp_path / "unpacked"
    extract_archive(archive, work)
    data = json.loads((work / MANIFEST_NAME).read_text())
    data["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    (work / MANIFEST_NAME).write_text(json.dumps(data))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tampered, "w") as tar:
        for item in sorted(work.iterdir()):
            tar.add(item, arcname=item.name)
    assert code_of(tampered, [keys["a"][1]])[0] == "signature_invalid"


def test_sign_bundle_signs_an_archive_in_place(tiny_model: Path, tmp_path: Path, keys) -> None:
    """Signing an existing archive rewrites it (atomically) with manifest.sig added and nothing left over."""
    archive = pack(tiny_model, name="tiny", version=2, out=tmp_path / "out" / "tiny-2.tar.gz")
    assert code_of(archive, [keys["a"][1]])[0] == "signature_missing"
    assert sign_bundle(archive, keys["a"][0]) == archive
    assert verify_bundle_signature(archive, [keys["a"][1]]) == keys["a"][2]
    assert [p.name for p in archive.parent.iterdir()] == ["tiny-2.tar.gz"]
    with tarfile.open(archive, "r:gz") as tar:  # still gzip-compressed
        assert SIGNATURE_NAME in tar.getnames()


# ------------------------------------------------------------------ key errors


def test_unusable_key_files_are_usage_errors(tmp_path: Path, unsigned_dir: Path, keys) -> None:
    """A wrong key file is the operator's mistake: a clear bad_key error (exit 2), never a crypto traceback."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = tmp_path / "ec.key"
    ec_pem.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        load_private_key(keys["a"][0]).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    for bad in (tmp_path / "missing.key", garbage, ec_pem, encrypted, keys["a"][1], tmp_path):
        with pytest.raises(UsageError) as info:
            sign_bundle(unsigned_dir, bad)
        assert info.value.code == "bad_key" and info.value.exit_code == 2, bad
    for bad in (tmp_path / "missing.pub", garbage, ec_pub, keys["a"][0]):
        with pytest.raises(UsageError) as info:
            open_bundle(unsigned_dir, trusted_keys=[bad])
        assert info.value.code == "bad_key", bad
    assert not (unsigned_dir / SIGNATURE_NAME).exists()


def test_agent_does_not_import_cryptography_unless_it_verifies(unsigned_dir: Path) -> None:
    """Signing support must not cost start-up time or memory on devices that do not use it."""
    code = (
        "import sys\n"
        "from edge_agent import cli, agent\n"
        "from edge_agent.bundles import open_bundle\n"
        f"open_bundle({str(unsigned_dir)!r}).close()\n"
        "assert 'cryptography' not in sys.modules and 'edge_agent.bundles.signing' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- CLI


def test_cli_keygen_then_pack_sign_key(tiny_model: Path, tmp_path: Path) -> None:
    """The documented workflow: keygen, pack --sign-key to a directory and to an archive, both verify."""
    runner = CliRunner()
    result = runner.invoke(main, ["keygen", "--out", str(tmp_path / "keys" / "fleet")])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "fleet.key", tmp_path / "keys" / "fleet.pub"
    kid = load_trusted_keys([public]).popitem()[0]
    assert f"key id {kid}" in result.output
    assert stat.S_IMODE(private.stat().st_mode) == 0o600

    for out in (tmp_path / "b-dir", tmp_path / "b.tar.gz"):
        args = ["pack", str(tiny_model), "--name", "tiny", "--version", "1", "--out", str(out)]
        result = runner.invoke(main, [*args, "--sign-key", str(private)])
        assert result.exit_code == 0, result.output
        assert f"signed with key {kid}" in result.output
        assert verify_bundle_signature(out, [public]) == kid


def test_cli_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second keygen with the same prefix exits 2 with one line and leaves the first key pair intact."""
    runner = CliRunner()
    prefix = str(tmp_path / "fleet")
    assert runner.invoke(main, ["keygen", "--out", prefix]).exit_code == 0
    before = (tmp_path / "fleet.key").read_bytes()
    result = runner.invoke(main, ["keygen", "--out", prefix])
    assert result.exit_code == 2
    assert "already exists" in result.output and "Traceback" not in result.output
    assert (tmp_path / "fleet.key").read_bytes() == before
    assert runner.invoke(main, ["keygen"]).exit_code == 2  # --out is required


@pytest.mark.parametrize("which", ["public", "missing"])
def test_cli_pack_with_an_unusable_sign_key_exits_2_and_writes_nothing(
    tiny_model: Path, tmp_path: Path, keys, which: str
) -> None:
    """A wrong --sign-key is a usage error: one clear message, no traceback, no unsigned bundle left behind."""
    key = keys["a"][1] if which == "public" else tmp_path / "nope.key"
    out = tmp_path / "b.tar.gz"
    result = CliRunner().invoke(
        main, ["pack", str(tiny_model), "--name", "tiny", "--version", "1", "--out", str(out), "--sign-key", str(key)]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: signing key") and "Traceback" not in result.output
    assert not out.exists()


# -------------------------------------------------------------------- commands


def signed_dispatcher(keys, max_age_s: float = 3600.0):
    """A real dispatcher with the agent's verifier, trusting key "a"; ``ping``
    counts how often it really ran."""
    from edge_agent.comms.commands import NoArgs
    from edge_agent.comms.dispatcher import Dispatcher
    from edge_agent.comms.handlers import command_verifier

    ran: list[str] = []
    d = Dispatcher(verifier=command_verifier([keys["a"][1]], max_age_s))
    d.register("ping", NoArgs, lambda args, ctx: ran.append(ctx.id) or {"pong": True})
    return d, ran


def command(private: Path, cmd_id: str = "c1", *, ts: float | None = None, args: dict | None = None,
            **override: object) -> bytes:
    import time as _time

    from edge_agent.bundles.signing import load_private_key, sign_command

    msg: dict = {"id": cmd_id, "cmd": "ping", "args": args or {}, "ts": _time.time() if ts is None else ts}
    msg["sig"] = sign_command(load_private_key(private), msg["id"], msg["cmd"], msg["args"], msg["ts"])
    msg.update(override)
    return json.dumps(msg).encode()


def test_a_signed_command_runs_and_key_order_or_spacing_do_not_matter(keys) -> None:
    d, ran = signed_dispatcher(keys)
    assert d.handle(command(keys["a"][0]), "t") == {"id": "c1", "ok": True, "result": {"pong": True}}
    # The same command written with other key order and spacing, non-ASCII kept as is.
    msg = json.loads(command(keys["a"][0], "c2"))
    reordered = json.dumps(dict(reversed(list(msg.items()))), indent=2, ensure_ascii=False).encode()
    assert d.handle(reordered, "t")["ok"] is True
    assert ran == ["c1", "c2"]


@pytest.mark.parametrize("case, code", [
    ("unsigned", "signature_missing"),
    ("other_key", "untrusted_key"),
    ("changed_cmd_id", "signature_invalid"),
    ("changed_ts", "signature_invalid"),
    ("garbage_sig", "signature_invalid"),
    ("stale", "stale_command"),
])
def test_a_command_that_is_not_properly_signed_is_refused_and_not_remembered(keys, case: str, code: str) -> None:
    import time as _time

    d, ran = signed_dispatcher(keys)
    good = json.loads(command(keys["a"][0]))
    raw = {
        "unsigned": json.dumps({"id": "c1", "cmd": "ping", "args": {}}).encode(),
        "other_key": command(keys["b"][0]),
        "changed_cmd_id": json.dumps({**good, "id": "c9"}).encode(),
        "changed_ts": json.dumps({**good, "ts": good["ts"] + 1}).encode(),
        "garbage_sig": json.dumps({**good, "sig": good["sig"].split(":")[0] + ":!!"}).encode(),
        "stale": command(keys["a"][0], ts=_time.time() - 7200),
    }[case]
    reply = d.handle(raw, "t")
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert ran == []
    # Refused commands are not remembered: the properly signed one still runs.
    assert d.handle(command(keys["a"][0], "c1"), "t")["ok"] is True and ran == ["c1"]


def test_a_command_from_the_future_is_accepted_and_max_age_0_disables_the_age_check(keys) -> None:
    import time as _time

    d, ran = signed_dispatcher(keys)
    assert d.handle(command(keys["a"][0], "f", ts=_time.time() + 86400 * 30), "t")["ok"] is True
    d0, ran0 = signed_dispatcher(keys, max_age_s=0)
    assert d0.handle(command(keys["a"][0], "old", ts=1_000_000_000), "t")["ok"] is True
    assert ran == ["f"] and ran0 == ["old"]


def test_a_signed_command_replayed_beyond_memory_or_after_a_restart_is_answered_not_run(keys, tmp_path: Path) -> None:
    """The in-memory id list holds ``memory`` ids and dies with the process;
    the command journal keeps every signed id until the command would be
    stale anyway, so a captured command runs once, ever."""
    from edge_agent.comms.commands import NoArgs
    from edge_agent.comms.dispatcher import Dispatcher
    from edge_agent.comms.journal import CommandJournal
    from edge_agent.comms.handlers import command_verifier

    ran: list[str] = []

    def device(journal: CommandJournal) -> Dispatcher:
        d = Dispatcher(memory=2, verifier=command_verifier([keys["a"][1]], 3600.0), journal=journal)
        d.register("ping", NoArgs, lambda args, ctx: ran.append(ctx.id) or {"pong": True, "run": len(ran)})
        return d

    journal = CommandJournal(tmp_path / ".commands.db", keep=2, max_age_s=3600.0)
    d = device(journal)
    captured = command(keys["a"][0], "once")
    first = d.handle(captured, "t")
    for i in range(5):  # push it out of memory
        assert d.handle(command(keys["a"][0], f"other-{i}"), "t")["ok"] is True
    assert d.handle(captured, "t") == first  # CONTRACT §3: the first reply again
    journal.close()
    journal = CommandJournal(tmp_path / ".commands.db", keep=2, max_age_s=3600.0)  # a restart
    assert device(journal).handle(captured, "t") == first
    journal.prune()  # its reply beyond `keep` is dropped; its id is kept until it is stale
    again = device(journal).handle(captured, "t")
    assert again["ok"] is False and again["error"]["code"] == "replayed_command", again
    assert ran.count("once") == 1
    journal.close()


def test_a_stale_command_names_both_clocks(keys) -> None:
    """A device refusing everything because its own clock is wrong must say
    so in terms a person can check."""
    import time as _time

    d, _ran = signed_dispatcher(keys, max_age_s=60.0)
    reply = d.handle(command(keys["a"][0], ts=_time.time() - 3600), "t")
    assert reply["error"]["code"] == "stale_command"
    assert "UTC" in reply["error"]["message"] and "NTP" in reply["error"]["message"]
