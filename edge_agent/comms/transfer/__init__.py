"""Bundle delivery over MQTT, for devices that can reach the broker and
nothing else. The protocol is described for people in ``docs/transfer.md``.

* :mod:`.protocol`: the messages (``meta``, ``need``, ``done``), the chunk
  checksums, and the :class:`Link` (publish bytes, subscribe a filter with a
  callback) both sides speak to; the topics are
  :class:`~edge_agent.comms.topics.TransferTopics`;
* :mod:`.sender`: :class:`TransferSender`, the console side;
* :mod:`.receiver`: :class:`TransferReceiver`, the device side.

The code is transport-agnostic: :class:`~edge_agent.comms.mqtt.PahoLink`
adapts a paho client; another transport supplies its own :class:`Link`.
"""

from edge_agent.comms.transfer.protocol import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_RANGES_PER_NEED,
    MIN_CHUNK_SIZE,
    PROTOCOL_VERSION,
    Link,
    PublishHandle,
    TransferMeta,
    build_meta,
    done_message,
    need_message,
    parse_done,
    parse_need,
    to_ranges,
)
from edge_agent.comms.transfer.receiver import TransferReceiver
from edge_agent.comms.transfer.sender import TransferSender

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_RANGES_PER_NEED",
    "MIN_CHUNK_SIZE",
    "PROTOCOL_VERSION",
    "Link",
    "PublishHandle",
    "TransferMeta",
    "TransferReceiver",
    "TransferSender",
    "build_meta",
    "done_message",
    "need_message",
    "parse_done",
    "parse_need",
    "to_ranges",
]
