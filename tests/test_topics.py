"""The topic tree (edge_agent.comms.topics): the strings of CONTRACT §3, built
and parsed in one place."""

from __future__ import annotations

import pytest

from edge_agent.comms.topics import DeviceTopics, Topics, TransferTopics, results_suffix


def test_a_devices_topics() -> None:
    d = Topics("site/edge").device("cam-01")
    assert d == DeviceTopics("site/edge", "cam-01")
    assert (d.cmd, d.reply, d.events, d.telemetry, d.status) == (
        "site/edge/cam-01/cmd", "site/edge/cam-01/reply", "site/edge/cam-01/events",
        "site/edge/cam-01/telemetry", "site/edge/cam-01/status")
    assert d.results("front") == "site/edge/cam-01/results/front" == d.topic(results_suffix("front"))
    assert d.command_topics(["lobby", "dock"]) == [
        "site/edge/cam-01/cmd", "site/edge/groups/lobby/cmd", "site/edge/groups/dock/cmd", "site/edge/all/cmd"]
    assert d.command_topics() == ["site/edge/cam-01/cmd", "site/edge/all/cmd"]


def test_the_device_of_a_topic_and_what_is_not_one() -> None:
    t = Topics("site/edge")
    assert t.every_device("status") == "site/edge/+/status"
    assert t.device_of("site/edge/cam-01/reply") == "cam-01"
    for topic in ("site/edge/all/cmd", "site/edge/groups/x", "site/edge/transfers/t1", "site/edge/_console/c/sync",
                  "site/edge/cam-01/results/front", "site/cam-01/reply"):
        assert t.device_of(topic) is None, topic
    assert t.console_sync("c1") == "site/edge/_console/c1/sync"


def test_a_transfers_topics() -> None:
    x = Topics("edge").transfer("t-1")
    assert x == TransferTopics("edge", "t-1")
    assert (x.meta, x.need, x.done, x.chunk_filter, x.chunk(7)) == (
        "edge/transfers/t-1/meta", "edge/transfers/t-1/need", "edge/transfers/t-1/done",
        "edge/transfers/t-1/chunk/+", "edge/transfers/t-1/chunk/7")
    assert x.chunk_index(x.chunk(12)) == 12
    assert x.chunk_index("edge/transfers/t-1/chunk/x") is None
    with pytest.raises(ValueError, match="not a valid token"):
        TransferTopics("edge", "a/b")
