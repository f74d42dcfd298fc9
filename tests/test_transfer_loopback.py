"""The transfer protocol through the in-process loopback broker: the
failure cases that a real broker cannot be made to produce on cue."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from edge_agent.comms.loopback import LoopbackBroker
from edge_agent.comms.transfer import TransferReceiver, TransferSender, build_meta
from edge_agent.errors import TransferError

CHUNK = 4096
FAST = {"idle_s": 0.2, "max_idle_s": 0.5, "persist_every_s": 0.1, "deadline_s": 30.0}


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "m.tar"
    path.write_bytes(os.urandom(20 * CHUNK))
    return path


def test_loopback_routes_like_a_broker() -> None:
    with LoopbackBroker() as broker:
        a, b = broker.link(), broker.link()
        got: list[tuple[str, bytes]] = []
        done = threading.Event()

        def collect(topic: str, payload: bytes) -> None:
            got.append((topic, payload))
            if len(got) == 3:
                done.set()

        a.publish("p/t/1/meta", b"retained", qos=1, retain=True).wait(1)
        a.publish("p/t/2/meta", b"gone", qos=1, retain=True)
        a.publish("p/t/2/meta", b"", qos=1, retain=True)  # deletes the retained message
        b.subscribe("p/t/+/meta", collect)
        b.subscribe("p/x/#", collect)
        assert a.publish("p/x/y/z", b"deep", qos=1, retain=False).wait(1)
        a.publish("p/t/1/meta/extra", b"no match", qos=1, retain=False)
        a.publish("p/t/3/meta", b"live", qos=1, retain=False)
        assert done.wait(2)
        assert got == [("p/t/1/meta", b"retained"), ("p/x/y/z", b"deep"), ("p/t/3/meta", b"live")]


def test_a_chunk_damaged_on_disk_is_found_and_fetched_again(payload: Path, tmp_path: Path) -> None:
    """Every chunk matched when it was written, yet the file does not: the
    storage changed it. The receiver re-reads the chunks and asks for the bad one."""
    lost_once: set[str] = set()

    def lose_chunk_19_once(topic: str, data: bytes) -> bool:
        if topic.endswith("/chunk/19") and topic not in lost_once:
            lost_once.add(topic)
            return True
        return False

    def rot_chunk_0(received: int, total: int) -> None:
        if received == 19 * CHUNK:  # chunk 19 is still missing: damage chunk 0 on disk now
            with open(rx.data_path, "r+b") as fh:
                fh.write(b"\x00" * 16)

    with LoopbackBroker(drop=lose_chunk_19_once) as broker:
        rx = TransferReceiver(broker.link(), "edge", "t1", "cam-01", tmp_path / "rx", max_bytes=10**6, progress=rot_chunk_0, **FAST)
        rx.start()
        with TransferSender(broker.link(), "edge", payload, tid="t1", chunk_size=CHUNK, need_delay_s=0.01) as sender:
            out = rx.wait(10)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == sender.meta.sha256
            assert rx.needs_sent[0] == [[19, 19]]
            assert [[0, 0]] in rx.needs_sent, rx.needs_sent
        rx.close()


def test_an_inconsistent_meta_fails_with_checksum_mismatch(payload: Path, tmp_path: Path) -> None:
    """Chunks that match their hashes but not the announced whole: the
    console is broken, and asking again would not help."""
    with LoopbackBroker() as broker:
        console = broker.link()
        reports: list[dict] = []
        console.subscribe("edge/transfers/t2/done", lambda topic, data: reports.append(json.loads(data)))
        meta = build_meta(payload, tid="t2", chunk_size=CHUNK).model_copy(update={"sha256": "0" * 64})
        console.publish("edge/transfers/t2/meta", meta.to_json(), qos=1, retain=True)
        rx = TransferReceiver(broker.link(), "edge", "t2", "cam-01", tmp_path, max_bytes=10**6, **FAST).start()
        data = payload.read_bytes()
        for i in range(meta.chunks):
            console.publish(f"edge/transfers/t2/chunk/{i}", data[i * CHUNK:(i + 1) * CHUNK], qos=1, retain=False)
        with pytest.raises(TransferError) as err:
            rx.wait(10)
        assert err.value.code == "checksum_mismatch"
        rx.close()
        deadline = time.monotonic() + 2
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reports == [{"device": "cam-01", "ok": False, "error": {"code": "checksum_mismatch", "message": err.value.message}}]


def test_malformed_meta_is_a_bad_transfer(tmp_path: Path) -> None:
    with LoopbackBroker() as broker:
        broker.link().publish("edge/transfers/t3/meta", b'{"v": 1, "tid": "t3"}', qos=1, retain=True)
        rx = TransferReceiver(broker.link(), "edge", "t3", "cam-01", tmp_path, max_bytes=10**6, **FAST).start()
        with pytest.raises(TransferError) as err:
            rx.wait(5)
        assert err.value.code == "bad_transfer"
        rx.close()


def test_a_deadline_ends_a_transfer_nobody_serves(payload: Path, tmp_path: Path) -> None:
    with LoopbackBroker() as broker:
        meta = build_meta(payload, tid="t4", chunk_size=CHUNK)
        broker.link().publish("edge/transfers/t4/meta", meta.to_json(), qos=1, retain=True)
        rx = TransferReceiver(broker.link(), "edge", "t4", "cam-01", tmp_path, max_bytes=10**6, **{**FAST, "deadline_s": 0.5})
        rx.start()
        with pytest.raises(TransferError) as err:
            rx.wait(5)
        assert err.value.code == "transfer_timeout"
        assert "0 of 20 chunks" in err.value.message
        assert len(rx.needs_sent) >= 1, "it asked before giving up"
        rx.close()
