"""Bounds on what a bundle archive may unpack to: a decompression bomb, an
unlisted member, a member larger than its manifest says, and a disk without
room are refused before anything is written, through the real deploy path,
while the serving version keeps serving.

The bombs are real: gzip-compressed tar archives holding a file of zeros
that a valid manifest lists with its true size and sha256 (200 MB of zeros
compress to about 200 KB), so only their size is wrong with them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from edge_agent.bundles import UnpackLimits, extract_archive, open_bundle, sha256_file
from edge_agent.errors import BundleError, EdgeAgentError
from edge_agent.models.lifecycle import deploy
from lifecycle_helpers import Running, config, frames, make_bundle

MB = 1_000_000
BOMB_BYTES = 200 * MB


class Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as they are read (never held in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def zeros_sha256(n: int) -> str:
    digest, block = hashlib.sha256(), bytes(1 << 20)
    while n:
        step = min(n, len(block))
        digest.update(block[:step])
        n -= step
    return digest.hexdigest()


def archive_with(bundle_dir: Path, out: Path, *, extra: dict[str, tuple[int, int]] | None = None,
                 first: str | None = None) -> Path:
    """A .tar.gz of ``bundle_dir`` plus, for each ``name: (listed, actual)``
    in ``extra``, a file of ``actual`` zero bytes that the manifest lists
    with ``listed`` bytes (None: not listed at all). ``first`` puts that
    extra member ahead of the manifest in the archive."""
    extra = extra or {}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    for name, (listed, actual) in extra.items():
        if listed is not None:
            manifest["files"].append({"path": name, "sha256": zeros_sha256(listed), "size": listed})
    raw = json.dumps(manifest, indent=2).encode()

    def add_extra(tar: tarfile.TarFile, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size = extra[name][1]
        tar.addfile(info, Zeros(info.size))

    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        if first is not None:
            add_extra(tar, first)
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        for item in sorted(bundle_dir.iterdir()):
            if item.name != "manifest.json":
                tar.add(item, arcname=item.name)
        for name in extra:
            if name != first:
                add_extra(tar, name)
    return out


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v1"), 1)


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v2"), 2)


@pytest.fixture(scope="module")
def bomb(v2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clf version 2 with a listed 200 MB file of zeros, about 1 MB on the wire."""
    out = archive_with(v2_dir, tmp_path_factory.mktemp("bomb") / "clf-v2.tar.gz",
                       extra={"weights.bin": (BOMB_BYTES, BOMB_BYTES)})
    assert out.stat().st_size < 2 * MB
    return out


def deploy_command(run: Running, archive: Path, version: int = 2) -> dict:
    message = json.dumps({"id": f"deploy-{time.monotonic_ns()}", "cmd": "deploy", "args": {
        "model": "clf", "version": version, "url": archive.as_uri(), "sha256": sha256_file(archive),
        "size": archive.stat().st_size}})
    reply = run.agent.local_dispatcher.handle(message, "test")
    assert reply is not None
    return reply


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def assert_nothing_left(store: Path) -> None:
    staging = store / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.rglob("*"))


# ------------------------------------------------------------ through a deploy


def test_a_gzip_bomb_is_refused_by_deploy_and_v1_keeps_serving(tmp_path: Path, v1: Path, bomb: Path) -> None:
    """The reported bomb, scaled down: an archive of about 1 MB whose manifest
    lists a 200 MB file, deployed by command to an agent whose limit is 50 MB.
    It is refused from the manifest's sizes before anything is unpacked;
    staging is empty, the store holds v1 alone, and v1 serves throughout."""
    cam = frames(tmp_path / "frames")
    run = Running(config(tmp_path, v1, cam, store={"max_unpacked_mb": 50}))
    store = tmp_path / "store"
    try:
        run.wait_results(5, version=1)
        before = tree_bytes(store)
        t0 = time.monotonic()
        reply = deploy_command(run, bomb)
        took = time.monotonic() - t0
        assert not reply["ok"], reply
        assert reply["error"]["code"] == "bundle_too_large_unpacked", reply
        assert "50.0 MB" in reply["error"]["message"] and "max_unpacked_mb" in reply["error"]["message"]
        assert took < 10, f"refusing took {took:.1f} s: the bomb was unpacked"
        assert_nothing_left(store)
        assert run.models.store.versions("clf") == [1]
        assert tree_bytes(store) - before < MB
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert run.errors() == 0 and run.models.status()["clf"]["active"] == 1
        # the same agent still takes a bundle of a sensible size
        good = make_bundle(tmp_path / "good", 3, archive=True)
        assert deploy_command(run, good, version=3)["ok"]
    finally:
        run.stop()


def test_a_bundle_folder_over_the_limit_is_refused_by_models_add(tmp_path: Path, v1: Path, v2_dir: Path) -> None:
    """A bundle folder on the device (``models add DIR``) is copied rather
    than unpacked; the same limit applies before the copy."""
    folder = tmp_path / "clf-v2"
    shutil.copytree(v2_dir, folder)
    (folder / "data.bin").write_bytes(bytes(2 * MB))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].append({"path": "data.bin", "sha256": zeros_sha256(2 * MB), "size": 2 * MB})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run = Running(config(tmp_path, v1, None, store={"max_unpacked_mb": 1}))
    try:
        with pytest.raises(EdgeAgentError, match="more than the 1.0 MB") as err:
            deploy(run.models, folder)
        assert err.value.code == "bundle_too_large_unpacked"
        assert_nothing_left(tmp_path / "store")
        assert run.models.store.versions("clf") == [1]
    finally:
        run.stop()


# ------------------------------------------------------------ the extraction


def test_a_bomb_is_refused_from_its_header_before_its_data_is_read(tmp_path: Path, v2_dir: Path) -> None:
    """A member whose header claims 6 GiB is refused on the header's word:
    this archive holds only its first few kilobytes (a download cut short),
    so any attempt to unpack it would fail as unreadable instead."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("weights.bin")
        info.size = 6 << 30
        tar.addfile(info)  # header only: the data never follows
    archive = tmp_path / "truncated-bomb.tar"
    archive.write_bytes(raw.getvalue()[:512] + bytes(4096))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError) as err:
        extract_archive(archive, dest, UnpackLimits(max_bytes=50 * MB))
    assert err.value.code == "bundle_too_large_unpacked", err.value
    assert list(dest.iterdir()) == []
    # without a limit, the free space bounds it the same way
    with pytest.raises(BundleError) as err:
        extract_archive(archive, dest, UnpackLimits(min_free_bytes=shutil.disk_usage(tmp_path).free))
    assert err.value.code == "disk_full", err.value
    assert list(dest.iterdir()) == []


def test_the_manifest_sizes_are_held_against_the_limit_before_anything_is_written(tmp_path: Path,
                                                                                   v2_dir: Path) -> None:
    """The limit applies to the sum of the manifest's sizes (manifest
    included): one byte under it is refused with nothing written; at it,
    the bundle unpacks and verifies."""
    archive = archive_with(v2_dir, tmp_path / "v2.tar.gz", extra={"data.bin": (3 * MB, 3 * MB)})
    with tarfile.open(archive) as tar:
        unpacked = sum(m.size for m in tar.getmembers() if m.isfile())
    dest = tmp_path / "dest"
    with pytest.raises(BundleError) as err:
        extract_archive(archive, dest, UnpackLimits(max_bytes=unpacked - 1))
    assert err.value.code == "bundle_too_large_unpacked"
    assert list(dest.iterdir()) == []
    work = tmp_path / "work"
    work.mkdir()
    with open_bundle(archive, workdir=work, limits=UnpackLimits(max_bytes=unpacked)) as bundle:
        assert bundle.manifest.version == 2 and (bundle.root / "data.bin").stat().st_size == 3 * MB
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("first", [True, False], ids=["before-the-manifest", "after-the-manifest"])
def test_an_unlisted_member_is_refused_before_it_is_written(tmp_path: Path, v2_dir: Path, first: bool) -> None:
    """A member the manifest does not list never reaches the disk, wherever
    it sits in the archive (before the manifest, too)."""
    archive = archive_with(v2_dir, tmp_path / "v2.tar.gz", extra={"payload.bin": (None, 64 * MB)},
                           first="payload.bin" if first else None)
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="'payload.bin' is not listed") as err:
        extract_archive(archive, dest)
    assert err.value.code == "unlisted_member"
    assert list(dest.iterdir()) == []
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError) as err:
        open_bundle(archive, workdir=work)
    assert err.value.code == "unlisted_member" and str(archive) in str(err.value)
    assert list(work.iterdir()) == []


def test_a_member_larger_than_its_manifest_entry_is_refused_before_it_is_written(tmp_path: Path,
                                                                                 v2_dir: Path) -> None:
    """The manifest says 1 kB, the tar header (and the data) 200 MB: refused
    from the header, not after 200 MB were written and hashed."""
    archive = archive_with(v2_dir, tmp_path / "v2.tar.gz", extra={"weights.bin": (1000, BOMB_BYTES)})
    dest = tmp_path / "dest"
    t0 = time.monotonic()
    with pytest.raises(BundleError, match=r"'weights.bin' is 200000000 bytes, the manifest says 1000") as err:
        extract_archive(archive, dest)
    assert err.value.code == "size_mismatch"
    assert list(dest.iterdir()) == []
    assert time.monotonic() - t0 < 10


def test_an_archive_replaced_between_the_two_passes_is_refused(tmp_path: Path, v2_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pass (the one that writes) holds every member to what the
    first pass accepted: an archive replaced in between by one whose member
    is 200 MB instead of the listed 1 kB is refused, and that member is not
    written beyond its listed size."""
    import edge_agent.bundles.verify as bundle_module

    small = archive_with(v2_dir, tmp_path / "small.tar.gz", extra={"weights.bin": (1000, 1000)})
    big = archive_with(v2_dir, tmp_path / "big.tar.gz", extra={"weights.bin": (1000, BOMB_BYTES)})
    real_plan = bundle_module._plan_archive

    def plan_then_swap(archive: Path, limits, dest: Path):
        plan = real_plan(archive, limits, dest)
        os.replace(big, archive)  # another writer replaces the file between the passes
        return plan

    monkeypatch.setattr(bundle_module, "_plan_archive", plan_then_swap)
    dest = tmp_path / "dest"
    with pytest.raises(BundleError) as err:
        extract_archive(small, dest)
    assert err.value.code == "bad_archive", err.value  # the member's header no longer matches the plan
    assert not (dest / "weights.bin").exists() or (dest / "weights.bin").stat().st_size <= 1000


# ------------------------------------------------------------ a real small disk


def mounted_tmpfs(mnt: Path, options: str):
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not permitted'}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB tmpfs: a store on a small SD card, for real."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=64m")


@pytest.fixture
def inode_disk(tmp_path: Path):
    """A tmpfs with room for bytes but 200 inodes: filling its inodes makes
    creating a file fail with ENOSPC, a full disk the byte count does not show."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=64m,nr_inodes=200")


class FreeWatch:
    """Samples the free space of a file system every 5 ms in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lowest = shutil.disk_usage(path).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.lowest = min(self.lowest, shutil.disk_usage(self.path).free)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.lowest


def test_a_bomb_larger_than_the_free_disk_never_fills_it(small_disk: Path, tmp_path: Path, v1: Path,
                                                         bomb: Path) -> None:
    """Under the default limits a 200 MB bomb fits the limit but not a 64 MB
    disk: it is refused before a byte is written (``disk_full``, saying what
    it needs and what is free) instead of filling the disk until the write
    fails, and v1 keeps serving."""
    cam = frames(tmp_path / "frames")
    cfg = config(tmp_path, v1, cam, store={"path": str(small_disk / "store"), "min_free_mb": 8})
    run = Running(cfg)
    try:
        run.wait_results(5, version=1)
        watch = FreeWatch(small_disk)
        reply = deploy_command(run, bomb)
        lowest = watch.stop()
        assert lowest > 32 * MB, f"the disk went down to {lowest} bytes free"
        assert not reply["ok"] and reply["error"]["code"] == "disk_full", reply
        message = reply["error"]["message"]
        assert "needs 200.0 MB" in message and "8.0 MB must stay free" in message and "are free" in message
        assert_nothing_left(small_disk / "store")
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert run.errors() == 0 and run.models.store.versions("clf") == [1]
    finally:
        run.stop()


def test_a_full_disk_during_a_deploy_is_disk_full_and_v1_keeps_serving(small_disk: Path, tmp_path: Path, v1: Path,
                                                                       v2_dir: Path) -> None:
    """The disk fills up for another reason (logs, the spool): a deploy that
    no longer fits is ``disk_full`` before it writes, staging is cleaned,
    v1 serves; once room is made the same deploy succeeds."""
    cam = frames(tmp_path / "frames")
    archive = archive_with(v2_dir, tmp_path / "v2.tar.gz", extra={"data.bin": (8 * MB, 8 * MB)})
    run = Running(config(tmp_path, v1, cam, store={"path": str(small_disk / "store"), "min_free_mb": 1}))
    ballast = small_disk / "ballast"
    try:
        run.wait_results(5, version=1)
        with open(ballast, "wb") as fh:  # fill the disk until 4 MB are left
            while shutil.disk_usage(small_disk).free > 4 * MB:
                fh.write(bytes(1 << 20))
        reply = deploy_command(run, archive)
        assert not reply["ok"] and reply["error"]["code"] == "disk_full", reply
        assert "needs 8.0 MB" in reply["error"]["message"]
        assert_nothing_left(small_disk / "store")
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert run.errors() == 0 and run.models.store.versions("clf") == [1]
        ballast.unlink()
        assert deploy_command(run, archive)["ok"]
        run.wait_results(len(run.results()) + 5, version=2)
    finally:
        run.stop()


def test_a_disk_that_fills_while_unpacking_is_disk_full_and_nothing_is_left(inode_disk: Path, tmp_path: Path,
                                                                             v1: Path, v2_dir: Path) -> None:
    """The disk runs out in the middle of the unpacking, after the checks
    passed (here: its inodes, so the free bytes never showed it): the write's
    ENOSPC is ``disk_full``, the partial unpacking is removed, v1 serves, and
    the deploy succeeds once there is room."""
    cam = frames(tmp_path / "frames")
    archive = archive_with(v2_dir, tmp_path / "v2.tar.gz", extra={"data.bin": (1000, 1000)})  # three files
    run = Running(config(tmp_path, v1, cam, store={"path": str(inode_disk / "store"), "min_free_mb": 0}))
    ballast = inode_disk / "ballast"
    ballast.mkdir()
    try:
        run.wait_results(5, version=1)
        run.models.store.staging()  # the folder unpacking happens in
        files = []
        try:
            while True:
                files.append(ballast / str(len(files)))
                files[-1].touch()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC: no inode left
            files.pop()
        for path in files[-2:]:  # room for the extraction folder and one file, not three
            path.unlink()
        reply = deploy_command(run, archive)
        assert not reply["ok"] and reply["error"]["code"] == "disk_full", reply
        assert "no space left on device while extracting" in reply["error"]["message"], reply
        assert_nothing_left(inode_disk / "store")
        n = len(run.results())
        run.wait_results(n + 5, version=1)
        assert run.errors() == 0 and run.models.store.versions("clf") == [1]
        shutil.rmtree(ballast)
        assert deploy_command(run, archive)["ok"]
        run.wait_results(len(run.results()) + 5, version=2)
    finally:
        run.stop()


def test_a_huge_extended_tar_header_is_refused_before_it_is_read_into_memory(tmp_path: Path) -> None:
    """A pax header of 50 MB compresses to a few KB; tarfile would read it
    whole into memory before the first member is seen."""
    import gzip
    import io
    import tarfile

    import psutil

    from edge_agent.bundles import UnpackLimits, extract_archive

    archive = tmp_path / "headers.tar.gz"
    member = tarfile.TarInfo("manifest.json")
    member.pax_headers = {"comment": "x" * 50_000_000}
    with gzip.open(archive, "wb") as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(b""))
    assert archive.stat().st_size < 1_000_000
    rss = psutil.Process().memory_info().rss
    with pytest.raises(BundleError) as err:
        extract_archive(archive, tmp_path / "out", UnpackLimits(max_bytes=10**9, min_free_bytes=0))
    assert err.value.code == "bad_archive"
    assert "extended tar header" in err.value.message
    assert psutil.Process().memory_info().rss - rss < 30_000_000
