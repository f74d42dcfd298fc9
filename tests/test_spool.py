"""The store-and-forward spool: what the broker could not take waits on disk,
in order, within a byte budget, and what must not be lost is never evicted
silently."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.comms.spool import ROW_OVERHEAD, Spool, SpooledItem
from edge_agent.errors import SpoolError

TOPIC = "edge/cam-01/telemetry"  # 21 bytes


def item_size(payload: bytes, topic: str = TOPIC) -> int:
    return len(payload) + len(topic) + ROW_OVERHEAD


def test_fifo_across_kinds_and_ack_removes(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        seqs = [
            spool.put(TOPIC, b"t1", kind="telemetry"),
            spool.put("edge/cam-01/events", b'{"event":"a"}', kind="events"),
            spool.put("edge/cam-01/results/front", b"r1", qos=0, kind="results"),
            spool.put("edge/cam-01/reply", b'{"id":"x"}', kind="replies", retain=False),
        ]
        items = spool.peek()
        assert [i.seq for i in items] == seqs
        assert [i.kind for i in items] == ["telemetry", "events", "results", "replies"]
        assert items[2].qos == 0 and items[2].payload == b"r1"
        assert spool.peek(2, after=seqs[1])[0].seq == seqs[2]
        assert spool.ack(seqs[:2]) == 2
        assert spool.ack(seqs[0]) == 0, "acknowledging twice is harmless"
        assert [i.seq for i in spool.peek()] == seqs[2:]
        assert len(spool) == 2


def test_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, max_bytes=10_000) as spool:
        for n in range(5):
            spool.put(TOPIC, b"%d" % n, kind="telemetry", retain=n == 4)
        spool.ack(spool.peek(1)[0].seq)
        used = spool.bytes_used
    with Spool(path, max_bytes=10_000) as spool:
        items = spool.peek()
        assert [i.payload for i in items] == [b"1", b"2", b"3", b"4"]
        assert items[-1].retain is True
        assert spool.bytes_used == used
        new = spool.put(TOPIC, b"5", kind="telemetry")
        assert new is not None and new > items[-1].seq, "seq keeps increasing after a restart"


def test_oldest_telemetry_goes_first_then_results(tmp_path: Path) -> None:
    """A long outage fills the spool: old samples go before results, and
    events and replies are never touched."""
    payload = b"x" * 100
    size = item_size(payload)
    with Spool(tmp_path / "s.db", max_bytes=6 * size) as spool:
        spool.put(TOPIC, payload, kind="results")      # r0
        spool.put(TOPIC, payload, kind="telemetry")    # t0
        spool.put(TOPIC, payload, kind="events")       # e0
        spool.put(TOPIC, payload, kind="telemetry")    # t1
        spool.put(TOPIC, payload, kind="results")      # r1
        spool.put(TOPIC, payload, kind="replies")      # p0: now full
        assert spool.bytes_used == 6 * size

        spool.put(TOPIC, payload, kind="results")      # evicts t0
        assert spool.counts() == {"telemetry": 1, "results": 3, "events": 1, "replies": 1}
        spool.put(TOPIC, payload, kind="events")       # evicts t1
        spool.put(TOPIC, payload, kind="replies")      # no telemetry left: evicts r0
        assert spool.counts() == {"telemetry": 0, "results": 2, "events": 2, "replies": 2}
        assert spool.dropped() == {"telemetry": 2, "results": 1, "events": 0, "replies": 0}
        kinds = [i.kind for i in spool.peek()]
        assert kinds == ["events", "results", "replies", "results", "events", "replies"]


def test_new_telemetry_never_evicts_results(tmp_path: Path) -> None:
    payload = b"x" * 100
    with Spool(tmp_path / "s.db", max_bytes=2 * item_size(payload)) as spool:
        spool.put(TOPIC, payload, kind="results")
        spool.put(TOPIC, payload, kind="results")
        assert spool.put(TOPIC, payload, kind="telemetry") is None
        assert spool.counts()["results"] == 2
        assert spool.dropped()["telemetry"] == 1


def test_one_big_eviction_frees_enough(tmp_path: Path) -> None:
    small = b"s" * 10
    with Spool(tmp_path / "s.db", max_bytes=10 * item_size(small)) as spool:
        for _ in range(10):
            spool.put(TOPIC, small, kind="telemetry")
        big = b"B" * (3 * len(small) + 2 * (len(TOPIC) + ROW_OVERHEAD))  # the size of three small items
        assert spool.put(TOPIC, big, kind="events") is not None
        assert spool.dropped()["telemetry"] == 3
        assert spool.bytes_used <= spool.max_bytes


def test_events_and_replies_that_cannot_fit_are_an_error(tmp_path: Path) -> None:
    payload = b"e" * 100
    with Spool(tmp_path / "s.db", max_bytes=2 * item_size(payload)) as spool:
        spool.put(TOPIC, payload, kind="events")
        spool.put(TOPIC, payload, kind="replies")
        with pytest.raises(SpoolError) as err:
            spool.put(TOPIC, payload, kind="events")
        assert err.value.code == "spool_full"
        assert "events" in err.value.message
        # Nothing was lost or half-done.
        assert spool.counts() == {"telemetry": 0, "results": 0, "events": 1, "replies": 1}
        assert spool.dropped() == {"telemetry": 0, "results": 0, "events": 0, "replies": 0}


def test_an_item_larger_than_the_whole_spool(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_bytes=1000) as spool:
        spool.put(TOPIC, b"keep", kind="telemetry")
        assert spool.put(TOPIC, b"x" * 2000, kind="results") is None
        assert spool.counts()["telemetry"] == 1, "nothing is evicted for an item that can never fit"
        with pytest.raises(SpoolError, match="cannot be kept"):
            spool.put(TOPIC, b"x" * 2000, kind="replies")


def test_dropped_counters_persist_and_reset(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    payload = b"x" * 50
    with Spool(path, max_bytes=item_size(payload)) as spool:
        spool.put(TOPIC, payload, kind="telemetry")
        spool.put(TOPIC, payload, kind="telemetry")
    with Spool(path, max_bytes=item_size(payload)) as spool:
        assert spool.dropped(reset=True)["telemetry"] == 1
        assert spool.dropped()["telemetry"] == 0


def test_full_disk_is_a_clear_error_and_the_spool_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL is what a full file system gives; the page cap gives the
    same error without filling the test machine's disk."""
    with Spool(tmp_path / "s.db", max_bytes=100 * 1024 * 1024) as spool:
        spool.set_max_pages(int(spool._db.execute("PRAGMA page_count").fetchone()[0]) + 4)
        kept = 0
        with pytest.raises(SpoolError) as err:
            for _ in range(1000):
                spool.put(TOPIC, b"z" * 4000, kind="events")
                kept += 1
        assert err.value.code == "disk_full"
        assert "full" in err.value.message
        assert len(spool) == kept, "the failed put left nothing behind"
        assert spool.bytes_used == sum(item_size(i.payload) for i in spool.peek(10_000))
        spool.set_max_pages(1_000_000)
        assert spool.put(TOPIC, b"after", kind="events") is not None
        assert len(spool) == kept + 1


def test_replay_stops_when_publishing_fails(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        for n in range(5):
            spool.put(TOPIC, b"%d" % n, kind="results")
        seen: list[bytes] = []

        def publish(item: SpooledItem) -> bool:
            if len(seen) == 3:
                return False
            seen.append(item.payload)
            return True

        assert spool.replay(publish, batch=2) == 3
        assert [i.payload for i in spool.peek()] == [b"3", b"4"]
        assert spool.replay(lambda item: True) == 2
        assert len(spool) == 0 and spool.bytes_used == 0


def test_a_crash_mid_replay_resends_rather_than_loses(tmp_path: Path) -> None:
    """The process dies (no clean close) after publishing an item it had not
    yet acknowledged: that item is still there after the restart."""
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        for n in range(5):
            spool.put(TOPIC, b"%d" % n, kind="events")
    script = textwrap.dedent(
        f"""
        import os
        from edge_agent.comms.spool import Spool
        spool = Spool({str(path)!r})
        def publish(item):
            if item.payload == b"2":
                os._exit(3)   # published, then killed before the ack
            return True
        spool.replay(publish)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], timeout=60)
    assert proc.returncode == 3
    with Spool(path) as spool:
        assert [i.payload for i in spool.peek()] == [b"2", b"3", b"4"]


def test_concurrent_writers(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:

        def writer(n: int) -> None:
            for i in range(50):
                spool.put(f"edge/d/results/s{n}", b"%d" % i, kind="results")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        items = spool.peek(1000)
        assert len(items) == 200
        for n in range(4):
            mine = [int(i.payload) for i in items if i.topic.endswith(f"s{n}")]
            assert mine == list(range(50)), "each writer's order is kept"


def test_bad_kind_is_a_programming_error(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        with pytest.raises(ValueError, match="kind"):
            spool.put(TOPIC, b"", kind="logs")  # type: ignore[arg-type]


def test_a_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An SD card that mangled the spool must not stop the agent publishing."""
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 1000)
    with Spool(path) as spool:
        assert len(spool) == 0
        assert spool.put(TOPIC, b"new", kind="events") is not None
    aside = list(tmp_path.glob("s.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "unreadable" in caplog.text
    path.write_bytes(b"garbage again" * 1000)
    with pytest.raises(SpoolError) as err:
        Spool(path, recover=False)
    assert err.value.code == "spool_failed"


def test_unopenable_path_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError) as err:
        Spool(blocker / "s.db")
    assert err.value.code == "spool_failed"


def test_replay_through_a_real_broker_in_order(tmp_path: Path, broker: Any) -> None:
    """What piled up during an outage reaches a subscriber in the order it
    was produced, and each item leaves the spool only once the broker
    acknowledged it (QoS 1)."""
    import uuid

    from mqtt_helpers import connected

    base = f"edge/{uuid.uuid4().hex[:8]}"
    received: list[tuple[str, bytes]] = []
    all_in = threading.Event()

    def client(on_message: Any = None) -> Any:
        return connected(broker.host, broker.port, on_message=on_message)

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        received.append((message.topic, message.payload))
        if len(received) == 6:
            all_in.set()

    sub = client(on_message)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(f"{base}/#", qos=1)
    assert subscribed.wait(5)
    pub = client()
    try:
        with Spool(tmp_path / "s.db") as spool:
            expected = []
            for n in range(6):
                kind = ("telemetry", "results", "events")[n % 3]
                topic = f"{base}/{kind}"
                spool.put(topic, b"%d" % n, kind=kind)
                expected.append((topic, b"%d" % n))

            def publish(item: SpooledItem) -> bool:
                info = pub.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
                info.wait_for_publish(5)
                return info.is_published()

            assert spool.replay(publish) == 6
            assert len(spool) == 0
        assert all_in.wait(5)
        assert received == expected
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 1 MiB file system (tmpfs), so a full disk is the kernel's
    ENOSPC, not a simulation. Needs root and mount; skipped otherwise."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_spooling_loses_a_bounded_count_and_says_so(tiny_disk: Path, caplog) -> None:
    """The broker is away and the disk fills up: what cannot be kept is
    counted per kind (telemetry's spool_dropped), logged at most once a
    minute rather than once per frame, and spooling resumes when room is
    made."""
    from edge_agent.comms.plane import Outbox

    class Offline:
        """A transport whose broker is away: everything goes to the spool."""

        connected = threading.Event()

        def topic(self, suffix: str) -> str:
            return f"p/d/{suffix}"

    filler = tiny_disk / "filler"
    with Spool(tiny_disk / "s.db", max_bytes=100 * 1024 * 1024) as spool:
        outbox = Outbox(Offline(), spool)
        filler.write_bytes(b"\0" * 700 * 1024)
        with caplog.at_level(logging.ERROR, logger="edge_agent.comms.plane"):
            for i in range(400):
                outbox.send("results", "results/cam", {"seq": i, "pad": "x" * 1000}, qos=0)
                outbox.send("telemetry", "telemetry", {"seq": i, "pad": "y" * 1000})
        kept = spool.counts()
        dropped = spool.dropped()
        assert dropped["results"] > 0 and dropped["telemetry"] > 0
        assert kept["results"] + dropped["results"] == 400  # every one kept or counted, none unaccounted
        assert kept["telemetry"] + dropped["telemetry"] == 400
        lines = [r for r in caplog.records if "cannot keep" in r.message]
        assert len(lines) == 1 and "disk holding" in lines[0].message
        filler.unlink()  # room again
        outbox.send("events", "events", {"event": "after"})
        assert spool.counts()["events"] == 1
        assert spool.dropped(reset=True)["results"] == dropped["results"]
        assert spool.dropped() == {k: 0 for k in spool.dropped()}
