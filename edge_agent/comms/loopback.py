"""An in-process stand-in for an MQTT broker, for tests and tools that use a
:class:`~edge_agent.comms.transfer.Link` without a real broker.

It keeps what matters to the protocols that run over it: topic filters with
``+`` and ``#``, retained messages (an empty retained payload deletes), and
delivery on one background thread in publish order, as paho's network
thread would, so callbacks never run on the publisher's thread. It has no
QoS (nothing is lost) and no sessions. ``drop`` lets a test lose chosen
messages on the way.

Thread-safety: every method may be called from any thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from paho.mqtt.client import topic_matches_sub

log = logging.getLogger(__name__)

Callback = Callable[[str, bytes], None]


class _Delivered:
    """A publish handle: 'acknowledged' once delivered to every subscriber."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class LoopbackBroker:
    """Routes messages between the :class:`LoopbackLink` objects it made."""

    def __init__(self, *, drop: Callable[[str, bytes], bool] | None = None) -> None:
        self.drop = drop
        self._subs: list[tuple[str, Callback]] = []
        self._retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes, list[Callback], _Delivered] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._deliver, name="loopback-broker", daemon=True)
        self._thread.start()

    def link(self) -> "LoopbackLink":
        return LoopbackLink(self)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def __enter__(self) -> "LoopbackBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> _Delivered:
        handle = _Delivered()
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [cb for flt, cb in self._subs if topic_matches_sub(flt, topic)]
        if self.drop is not None and self.drop(topic, payload):
            targets = []
        self._queue.put((topic, payload, targets, handle))
        return handle

    def subscribe(self, topic_filter: str, callback: Callback) -> Callable[[], None]:
        entry = (topic_filter, callback)
        with self._lock:
            self._subs.append(entry)
            retained = [(t, p) for t, p in self._retained.items() if topic_matches_sub(topic_filter, t)]
        for topic, payload in retained:
            self._queue.put((topic, payload, [callback], _Delivered()))

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._subs:
                    self._subs.remove(entry)

        return unsubscribe

    def _deliver(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload, targets, handle = item
            for callback in targets:
                try:
                    callback(topic, payload)
                except Exception:
                    log.exception("loopback: a subscriber of %s failed", topic)
            handle._event.set()


class LoopbackLink:
    """One client's view of a :class:`LoopbackBroker` (a transfer ``Link``)."""

    def __init__(self, broker: LoopbackBroker) -> None:
        self.broker = broker

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> _Delivered:
        return self.broker.publish(topic, bytes(payload), retain=retain)

    def subscribe(self, topic_filter: str, callback: Callback) -> Callable[[], None]:
        return self.broker.subscribe(topic_filter, callback)
