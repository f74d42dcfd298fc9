"""Bundle transfer over MQTT through a real mosquitto: one publish of each
chunk serves the whole fleet; late, unlucky and restarted devices ask for
just what they miss; corrupt chunks never reach the file, a chunk damaged on
disk is fetched again; a wrong or malformed meta and the deadline end a
transfer with their own error codes."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from edge_agent.bundles import sha256_file
from edge_agent.comms.mqtt import PahoLink
from edge_agent.comms.topics import TransferTopics
from edge_agent.comms.transfer import (
    PublishHandle,
    TransferMeta,
    TransferReceiver,
    TransferSender,
    build_meta,
    parse_need,
    to_ranges,
)
from edge_agent.errors import TransferError
from mqtt_helpers import connected
from waiting import let_time_pass, poll_until

PREFIX = "edge"
CHUNK = 16 * 1024
FAST = {"idle_s": 0.3, "max_idle_s": 1.0, "persist_every_s": 0.1, "deadline_s": 60.0}


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "classifier-3.tar.gz"
    path.write_bytes(os.urandom(64 * CHUNK - 1000))  # 64 chunks, the last one short
    return path


@pytest.fixture
def clients(broker: Any) -> Iterator[Callable[[str], PahoLink]]:
    """Connected paho clients, one per simulated device or console."""
    made: list[mqtt.Client] = []

    def connect(name: str) -> PahoLink:
        client = connected(broker.host, broker.port, name=name, max_inflight=32)
        made.append(client)
        return PahoLink(client)

    yield connect
    for client in made:
        client.disconnect()
        client.loop_stop()


class _Done:
    def wait(self, timeout: float) -> bool:
        return True


class FaultyLink:
    """The sender's link with a fault injected: a real seam, not a mock
    (every other message goes through mosquitto)."""

    def __init__(self, inner: PahoLink, fault: Callable[[str, bytes], bytes | None]) -> None:
        self.inner = inner
        self.fault = fault

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> PublishHandle:
        changed = self.fault(topic, payload)
        if changed is None:
            return _Done()  # lost on the way
        return self.inner.publish(topic, changed, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        return self.inner.subscribe(topic_filter, callback)


def acked(link: PahoLink, count: int, subscribe: Callable[[], Any]) -> None:
    """Run ``subscribe`` (``count`` subscriptions on ``link``) and return once
    the broker acknowledged every one: from then on nothing published is missed."""
    acks = threading.Semaphore(0)
    link.client.on_subscribe = lambda *args: acks.release()
    try:
        subscribe()
        for _ in range(count):
            assert acks.acquire(timeout=5), "the test broker did not acknowledge a subscription"
    finally:
        link.client.on_subscribe = None


def test_three_devices_one_late(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """Two devices listen from the start, the third joins after the last
    chunk went out: all three end with the same verified file, and the late
    one cost only a re-publish of what it asked for."""
    tid = uuid.uuid4().hex
    meta = build_meta(payload, tid=tid, chunk_size=CHUNK)
    progress: list[tuple[int, int]] = []

    def receiver(device: str, **extra: Any) -> TransferReceiver:
        rx = TransferReceiver(
            clients(device), PREFIX, tid, device, tmp_path / device,
            max_bytes=10**7, expected_sha256=meta.sha256, expected_size=meta.size, **FAST, **extra,
        )
        acked(rx.link, 2, rx.start)  # meta and chunks subscribed before anything is sent
        return rx

    r1 = receiver("cam-01", progress=lambda done, total: progress.append((done, total)))
    r2 = receiver("cam-02")
    sender = TransferSender(clients("console"), PREFIX, payload, tid=tid, chunk_size=CHUNK, need_delay_s=0.05).start()
    try:
        assert sender.wait_sent(30)
        r3 = receiver("cam-03")
        for rx in (r1, r2, r3):
            out = rx.wait(30)
            assert out.name == "classifier-3.tar.gz"
            assert sha256_file(out) == meta.sha256
            assert not rx.data_path.exists() and not rx.state_path.exists()
        assert sender.wait_done({"cam-01", "cam-02", "cam-03"}, 10)
        assert r3.needs_sent[0] == [[0, meta.chunks - 1]], "the late device asked for everything at once"
        assert sender.published < 2 * meta.chunks + 8, "chunks are not sent once per device"
        assert progress[-1] == (meta.size, meta.size)
    finally:
        for rx in (r1, r2):
            rx.close()
        sender.close()


def test_corrupt_chunk_is_rejected_and_requested_again(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    tid = uuid.uuid4().hex
    corrupted: list[str] = []

    def corrupt_chunk_3_once(topic: str, data: bytes) -> bytes:
        if topic.endswith("/chunk/3") and not corrupted:
            corrupted.append(topic)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **FAST)
    acked(rx.link, 2, rx.start)
    link = FaultyLink(clients("console"), corrupt_chunk_3_once)
    with TransferSender(link, PREFIX, payload, tid=tid, chunk_size=CHUNK, need_delay_s=0.05) as sender:
        out = rx.wait(30)
        assert sha256_file(out) == sha256_file(payload)
        assert corrupted and rx.rejected == 1
        # Normally exactly [[3, 3]]; a stall on a loaded machine may add others.
        assert any(first <= 3 <= last for ranges in rx.needs_sent for first, last in ranges)
        assert any(device == "cam-01" for device, _ in sender.needs)
        assert sender.wait_done(["cam-01"], 5)
    rx.close()


def test_a_restarted_device_continues(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """Power is cut after 10 chunks: the next agent asks only for the rest."""
    tid = uuid.uuid4().hex
    first_pass_done = threading.Event()

    def lose_after_chunk_9(topic: str, data: bytes) -> bytes | None:
        if "/chunk/" in topic and int(topic.rsplit("/", 1)[1]) >= 10 and not first_pass_done.is_set():
            return None
        return data

    first = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **{**FAST, "idle_s": 60})
    acked(first.link, 2, first.start)
    sender = TransferSender(FaultyLink(clients("console"), lose_after_chunk_9), PREFIX, payload, tid=tid, chunk_size=CHUNK, need_delay_s=0.05)
    sender.start()
    try:
        assert sender.wait_sent(30)
        first_pass_done.set()
        poll_until(lambda: first.received_chunks() >= 10, 10)
        assert first.received_chunks() == 10
        first.close()
        state = json.loads(first.state_path.read_text())
        assert state["meta"]["tid"] == tid

        second = TransferReceiver(clients("cam-01-again"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **FAST).start()
        assert second.received_chunks() == 10, "resumed from the saved state"
        out = second.wait(30)
        assert sha256_file(out) == sha256_file(payload)
        assert second.needs_sent[0] == [[10, sender.meta.chunks - 1]]
        second.close()
    finally:
        sender.close()


def test_a_meta_for_another_file_is_refused(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """The deploy command says which file it wants: a stray meta under the
    same transfer id cannot substitute another."""
    tid = uuid.uuid4().hex
    with TransferSender(clients("console"), PREFIX, payload, tid=tid, chunk_size=CHUNK):
        rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, expected_sha256="0" * 64, **FAST)
        rx.start()
        with pytest.raises(TransferError) as err:
            rx.wait(10)
        assert err.value.code == "bad_transfer"
        rx.close()
        small = TransferReceiver(clients("cam-02"), PREFIX, tid, "cam-02", tmp_path / "b", max_bytes=1000, **FAST).start()
        with pytest.raises(TransferError) as err:
            small.wait(10)
        assert err.value.code == "too_large"
        small.close()


def test_a_chunk_damaged_on_disk_is_found_and_fetched_again(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """Every chunk matched when it was written, yet the file does not: the
    storage changed it. The receiver re-reads the chunks and asks for the bad one."""
    tid = uuid.uuid4().hex
    last = 63  # the only short chunk
    lost: list[str] = []
    rotted = threading.Event()

    def lose_the_last_chunk_once(topic: str, data: bytes) -> bytes | None:
        if topic.endswith(f"/chunk/{last}") and not lost:
            lost.append(topic)
            return None
        return data

    def rot_chunk_0(received: int, total: int) -> None:
        if received == last * CHUNK and not rotted.is_set():  # all but the last chunk on disk: damage chunk 0 now
            with open(rx.data_path, "r+b") as fh:
                fh.write(b"\x00" * 16)
            rotted.set()

    # A patient receiver: no need before the first pass is through, even on a loaded machine.
    patient = {**FAST, "idle_s": 1.0, "max_idle_s": 1.0}
    rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, progress=rot_chunk_0, **patient)
    acked(rx.link, 2, rx.start)  # meta and chunks: the first pass reaches it whole
    link = FaultyLink(clients("console"), lose_the_last_chunk_once)
    try:
        with TransferSender(link, PREFIX, payload, tid=tid, chunk_size=CHUNK, need_delay_s=0.05, repeat_after_s=0.2) as sender:
            out = rx.wait(30)
            assert sha256_file(out) == sha256_file(payload) == sender.meta.sha256
            assert lost and rotted.is_set()
            assert rx.needs_sent[0] == [[last, last]]
            assert [[0, 0]] in rx.needs_sent, rx.needs_sent
            assert sender.wait_done(["cam-01"], 5)
    finally:
        rx.close()


def test_an_inconsistent_meta_fails_with_checksum_mismatch(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """Chunks that match their hashes but not the announced whole: the
    console is broken, and asking again would not help."""
    tid = uuid.uuid4().hex

    def announce_another_whole(topic: str, data: bytes) -> bytes:
        if topic.endswith("/meta") and data:  # not the empty message that clears it
            return TransferMeta.model_validate_json(data).model_copy(update={"sha256": "0" * 64}).to_json()
        return data

    rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **FAST).start()
    link = FaultyLink(clients("console"), announce_another_whole)
    try:
        with TransferSender(link, PREFIX, payload, tid=tid, chunk_size=CHUNK, need_delay_s=0.05, repeat_after_s=0.2) as sender:
            with pytest.raises(TransferError) as err:
                rx.wait(30)
            assert err.value.code == "checksum_mismatch"
            assert rx.received_chunks() == sender.meta.chunks, "every chunk arrived and matched its own sha256"
            assert poll_until(lambda: "cam-01" in sender.done, 10), "no done report reached the console"
            assert sender.done["cam-01"] == {
                "device": "cam-01", "ok": False, "error": {"code": "checksum_mismatch", "message": err.value.message},
            }
    finally:
        rx.close()


def test_malformed_meta_is_a_bad_transfer(clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    tid = uuid.uuid4().hex
    topics = TransferTopics(PREFIX, tid)
    console = clients("console")
    reports: list[dict] = []
    acked(console, 1, lambda: console.subscribe(topics.done, lambda topic, data: reports.append(json.loads(data))))
    assert console.publish(topics.meta, json.dumps({"v": 1, "tid": tid}).encode(), qos=1, retain=True).wait(5)
    rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **FAST).start()
    try:
        with pytest.raises(TransferError) as err:
            rx.wait(10)
        assert err.value.code == "bad_transfer"
        assert "malformed meta" in err.value.message
        assert poll_until(lambda: reports, 10), "no done report reached the console"
        assert reports == [{"device": "cam-01", "ok": False, "error": {"code": "bad_transfer", "message": err.value.message}}]
    finally:
        rx.close()
        console.publish(topics.meta, b"", qos=1, retain=True).wait(5)


def test_a_deadline_ends_a_transfer_nobody_serves(payload: Path, clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """The meta is there, the sender is gone: the receiver asks, then gives up
    at its deadline (not at the caller's wait)."""
    tid = uuid.uuid4().hex
    topics = TransferTopics(PREFIX, tid)
    meta = build_meta(payload, tid=tid, chunk_size=CHUNK)
    console = clients("console")
    assert console.publish(topics.meta, meta.to_json(), qos=1, retain=True).wait(5)
    rx = TransferReceiver(clients("cam-01"), PREFIX, tid, "cam-01", tmp_path, max_bytes=10**7, **{**FAST, "deadline_s": 1.0})
    rx.start()
    try:
        with pytest.raises(TransferError) as err:
            rx.wait(10)
        assert err.value.code == "transfer_timeout"
        assert f"timed out after 1 s (0 of {meta.chunks} chunks)" in err.value.message
        assert rx.needs_sent and rx.needs_sent[0] == [[0, meta.chunks - 1]], "it asked before giving up"
    finally:
        rx.close()
        console.publish(topics.meta, b"", qos=1, retain=True).wait(5)


def test_receiver_wait_times_out_without_a_sender(clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    rx = TransferReceiver(clients("cam-01"), PREFIX, uuid.uuid4().hex, "cam-01", tmp_path, max_bytes=10, **FAST).start()
    with pytest.raises(TransferError) as err:
        rx.wait(0.2)
    assert err.value.code == "transfer_timeout"
    rx.close()


def test_a_description_made_once_serves_several_transfers_of_the_file(payload: Path,
                                                                      clients: Callable[[str], PahoLink],
                                                                      tmp_path: Path) -> None:
    """Unicast sends one file N times: it is hashed once, and each transfer
    still arrives verified under its own id."""
    shared = build_meta(payload, tid="shared", chunk_size=CHUNK)
    console = clients("console")
    for device in ("cam-01", "cam-02"):
        tid = uuid.uuid4().hex
        rx = TransferReceiver(clients(device), PREFIX, tid, device, tmp_path / device, max_bytes=10**7,
                              expected_sha256=shared.sha256, expected_size=shared.size, **FAST)
        acked(rx.link, 2, rx.start)
        sender = TransferSender(console, PREFIX, payload, tid=tid, meta=shared).start()
        try:
            assert sender.meta.tid == tid and sender.meta.chunk_sha256 == shared.chunk_sha256
            assert sha256_file(rx.wait(30)) == shared.sha256
        finally:
            sender.close()
            rx.close()


@pytest.mark.parametrize("repeat_after_s, republished", [(60.0, []), (0.0, [1, 2])])
def test_sender_holds_back_needless_repeats(clients: Callable[[str], PahoLink], tmp_path: Path, repeat_after_s: float,
                                            republished: list[int]) -> None:
    """Every re-published chunk reaches every device: a chunk published
    moments ago is not sent again for a ``need`` (under load the device asks
    for chunks still queued for it); one published long enough ago is.
    Through the real broker: a device's client sees the chunks and asks."""
    path = tmp_path / "b.tar"
    path.write_bytes(os.urandom(4 * 1024))
    seen: list[int] = []
    device = clients("cam-01")
    acked(device, 1, lambda: device.subscribe(f"{PREFIX}/transfers/+/chunk/+",
                                              lambda topic, payload: seen.append(int(topic.rsplit("/", 1)[1]))))
    sender = TransferSender(clients("console"), PREFIX, path, chunk_size=1024, need_delay_s=0.01,
                            repeat_after_s=repeat_after_s)
    held = 2 if not republished else 0
    with sender:
        assert sender.wait_sent(5)
        need = json.dumps({"device": "cam-01", "ranges": [[1, 2]]}).encode()
        device.publish(sender.topics.need, need, qos=1, retain=False)
        assert poll_until(lambda: len(seen) >= 4 + len(republished) and sender.held_back == held, 5)
        let_time_pass(0.2, "nothing more follows")
    assert seen == [0, 1, 2, 3, *republished]
    assert sender.held_back == held


def test_receiver_wait_ends_when_the_agent_stops(clients: Callable[[str], PahoLink], tmp_path: Path) -> None:
    """A deploy waiting for a transfer must not hold up the agent's shutdown
    until the transfer deadline."""
    rx = TransferReceiver(clients("cam-01"), PREFIX, uuid.uuid4().hex, "cam-01", tmp_path, max_bytes=10, **FAST).start()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(TransferError) as err:
        rx.wait(3600, cancel=stop)
    assert err.value.code == "cancelled" and time.monotonic() - started < 5
    rx.close()


def test_rate_limit_paces_the_chunks(payload: Path, clients: Callable[[str], PahoLink]) -> None:
    """A cellular uplink must not be saturated by a deploy: 1 MB at 4 MiB/s
    takes a quarter of a second, not a burst."""
    sender = TransferSender(clients("console"), PREFIX, payload, tid=uuid.uuid4().hex, chunk_size=CHUNK, rate_bytes_s=4 * 2**20)
    started = time.monotonic()
    sender.start()
    try:
        assert sender.wait_sent(30)
        assert time.monotonic() - started >= 0.2
        assert sender.published == sender.meta.chunks
    finally:
        sender.close()


# -- pure parts ---------------------------------------------------------------------


def test_ranges_round_trip() -> None:
    assert to_ranges([0, 1, 2, 5, 7, 8]) == [[0, 2], [5, 5], [7, 8]]
    assert to_ranges([]) == []
    device, wanted = parse_need(json.dumps({"device": "d", "ranges": [[0, 2], [5, 5], [60, 99]]}).encode(), 62)
    assert device == "d" and wanted == {0, 1, 2, 5, 60, 61}


@pytest.mark.parametrize(
    "need",
    [b"[]", b'{"device": 1, "ranges": []}', b'{"device": "d", "ranges": [[3, 1]]}', b'{"device": "d", "ranges": [[true, 2]]}', b"junk"],
)
def test_malformed_needs_are_refused(need: bytes) -> None:
    with pytest.raises(ValueError):
        parse_need(need, 10)


def test_meta_checks_itself(payload: Path) -> None:
    meta = build_meta(payload, tid="t1", chunk_size=CHUNK)
    assert meta.chunks == 64 and meta.chunk_span(63) == (63 * CHUNK, CHUNK - 1000)
    data = json.loads(meta.to_json())
    assert TransferMeta.model_validate_json(meta.to_json()) == meta
    for change in ({"chunks": 63}, {"chunk_sha256": data["chunk_sha256"][:-1]}, {"v": 2}, {"name": "../x"}, {"size": "5"}):
        with pytest.raises(ValueError):
            TransferMeta.model_validate_json(json.dumps({**data, **change}))
    assert TransferMeta.model_validate_json(json.dumps({**data, "future_field": 1})) == meta


def test_leftovers_of_interrupted_deploys_are_swept_at_start_but_recent_ones_resume(tmp_path: Path) -> None:
    """Each crash during a transfer left its partial bundle in .transfers
    for ever (R2 of benchmarks/faults.py: 294 MB after 50 kills). At start
    the agent keeps the two most recent, if recent (a console re-sending
    the same deploy resumes them), and removes the rest."""
    import os
    import threading
    from types import SimpleNamespace

    from edge_agent.comms.plane import BundleFetcher

    staging = tmp_path / ".transfers"
    now = time.time()
    for i, age in enumerate([10, 20, 30, 40, 7200]):
        folder = staging / f"t{i}"
        folder.mkdir(parents=True)
        (folder / "data.part").write_bytes(b"x" * 1000)
        for p in (folder / "data.part", folder):
            os.utime(p, (now - age, now - age))
    fetcher = BundleFetcher(transport=None, staging=staging, max_bytes=10**9, download_cfg=None,
                            transfer_cfg=SimpleNamespace(deadline_s=3600.0), stop=threading.Event())
    assert fetcher.sweep() == 3000
    assert sorted(p.name for p in staging.iterdir()) == ["t0", "t1"]
    assert BundleFetcher(transport=None, staging=tmp_path / "none", max_bytes=1, download_cfg=None,
                         transfer_cfg=SimpleNamespace(deadline_s=1.0), stop=threading.Event()).sweep() == 0
