"""Dead letters: changes a sink's target rejects for a reason in their data (`on_error: dlq`).

The topic ``{pipeline}.{sink}.dlq`` (one partition, kept for ever) is the durable record, and the
only one: a sink reads it whole when it starts to know which keys it holds back.

A **dead letter** is the original record, unchanged: its key, its value and its headers
(``cdc.schema_id``, ``cdc.origin``...), plus headers that say why and where from::

    cdc.dlq.reason     why the target refused it, or "held back: ..." for a later change of a held key
    cdc.dlq.sink       the sink's name
    cdc.dlq.table      the target table ("" for a record that is no cdc event)
    cdc.dlq.topic / cdc.dlq.partition / cdc.dlq.offset    where the record is in its source topic
    cdc.dlq.position   the event's position ("" for a record that is no cdc event)
    cdc.dlq.also_holds the old key of a row that moved to a new key (JSON list; only then)

A **release** says that dead letters left the queue (`cdc dlq retry` applied them, or `cdc dlq
skip` dropped them): a record with the released key, no value, and the headers ``cdc.dlq.release``
(``retried`` or ``skipped``), ``cdc.dlq.topic`` and ``cdc.dlq.through`` (the last DLQ offset it
releases). Every dead letter of that key and source topic at or before that offset has left.

A key is *held* while any dead letter of it has not left: its later changes are dead-lettered too,
so a row never overtakes its own failed change. Keys are compared per source topic, in the
canonical JSON form of the Kafka key (the primary key as a JSON object).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cdc.config import KafkaConfig
from cdc.errors import PublishError
from cdc.publish.admin import ensure_topics

log = logging.getLogger(__name__)

PREFIX = "cdc.dlq."
RELEASE = PREFIX + "release"
# A dead letter must outlive every retention, and compaction would keep only the last record per key:
# it is the only copy of a change not applied.
TOPIC_CONFIG = {"retention.ms": "-1", "cleanup.policy": "delete"}

KeyId = tuple[str, str]  # (source topic, canonical key)


def topic_of(pipeline: str, sink: str) -> str:
    return f"{pipeline}.{sink}.dlq"


def canonical_key(key: Any) -> str:
    """One text per key, whatever the spacing or member order of its JSON: the Kafka key bytes, a
    key given on the command line, or the key columns of an event's `before` image."""
    if isinstance(key, (bytes, bytearray, str)):
        try:
            key = json.loads(key)
        except (ValueError, UnicodeDecodeError):
            return key.decode("utf-8", "backslashreplace") if isinstance(key, (bytes, bytearray)) else key
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass
class DeadLetter:
    dlq_offset: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]  # the original record's headers
    reason: str
    table: str
    position: str
    also: tuple[str, ...] = ()  # other keys it holds (canonical): the old key of a row that moved

    @property
    def key_id(self) -> KeyId:
        return (self.topic, canonical_key(self.key) if self.key is not None else "")

    @property
    def holds(self) -> list[KeyId]:
        return [self.key_id, *((self.topic, k) for k in self.also)]

    def as_record(self) -> "SourceRecord":
        """The dead letter as the record it was in its source topic (for applying it again)."""
        return SourceRecord(self.topic, self.partition, self.offset, self.key, self.value, self.headers)

    def summary(self) -> dict[str, Any]:
        return {"dlq_offset": self.dlq_offset, "table": self.table, "key": self.key_id[1],
                "topic": self.topic, "partition": self.partition, "offset": self.offset,
                "position": self.position, "reason": self.reason}


@dataclass
class SourceRecord:
    """What the sink needs of a consumed record (aiokafka's ConsumerRecord has these attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass
class DeadLetterState:
    """What the DLQ topic says: the dead letters that have not left, and every source record ever
    dead-lettered (so a record read again after a crash is not written twice)."""

    outstanding: dict[int, DeadLetter] = field(default_factory=dict)  # DLQ offset -> dead letter
    held: dict[KeyId, int] = field(default_factory=dict)  # key -> dead letters of it not left
    written: set[tuple[str, int, int]] = field(default_factory=set)  # (topic, partition, offset)

    def read(self, offset: int, key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]) -> None:
        """Take one record of the DLQ topic, in offset order."""
        h = {k: v.decode() for k, v in headers if k.startswith(PREFIX)}
        others = [(k, v) for k, v in headers if not k.startswith(PREFIX)]
        if RELEASE in h:
            key_id = (h[PREFIX + "topic"], canonical_key(key) if key is not None else "")
            self.release(key_id, int(h[PREFIX + "through"]))
            return
        if offset in self.outstanding:  # written by this process, now read back
            return
        letter = DeadLetter(offset, h[PREFIX + "topic"], int(h[PREFIX + "partition"]), int(h[PREFIX + "offset"]),
                            key, value, others, h.get(PREFIX + "reason", ""), h.get(PREFIX + "table", ""),
                            h.get(PREFIX + "position", ""), tuple(json.loads(h.get(PREFIX + "also_holds", "[]"))))
        self.add(letter)

    def add(self, letter: DeadLetter) -> None:
        self.outstanding[letter.dlq_offset] = letter
        for key_id in letter.holds:
            self.held[key_id] = self.held.get(key_id, 0) + 1
        self.written.add((letter.topic, letter.partition, letter.offset))

    def release(self, key_id: KeyId, through: int) -> None:
        for offset in [o for o, d in self.outstanding.items() if o <= through and d.key_id == key_id]:
            for held in self.outstanding.pop(offset).holds:
                self.held[held] -= 1
                if not self.held[held]:
                    del self.held[held]

    def letters(self, key: str | None = None) -> list[DeadLetter]:
        """The dead letters that have not left, in DLQ order; of one key (canonical form) if given."""
        return [d for _, d in sorted(self.outstanding.items()) if key is None or d.key_id[1] == key]


class _Reader:
    """A consumer of the DLQ topic from its first record: read to its end, then follow it."""

    def __init__(self, config: KafkaConfig, topic: str):
        self.tp = TopicPartition(topic, 0)
        self._consumer = AIOKafkaConsumer(**config.client_options(), enable_auto_commit=False,
                                          auto_offset_reset="earliest")

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign([self.tp])
        await self._consumer.seek_to_beginning(self.tp)

    async def read_to_end(self, state: DeadLetterState) -> None:
        end = (await self._consumer.end_offsets([self.tp]))[self.tp]
        while await self._consumer.position(self.tp) < end:
            self._take(state, await self._consumer.getmany(self.tp, timeout_ms=1000, max_records=5000))

    def _take(self, state: DeadLetterState, fetched: dict) -> None:
        for message in fetched.get(self.tp, []):
            state.read(message.offset, message.key, message.value, message.headers or ())

    async def stop(self) -> None:
        await self._consumer.stop()


async def read_state(config: KafkaConfig, topic: str) -> DeadLetterState:
    """Read the DLQ topic from its first record to its end."""
    state = DeadLetterState()
    if not await _exists(config, topic):  # (asking for its metadata could have a broker create it)
        return state
    reader = _Reader(config, topic)
    try:
        await reader.start()
        await reader.read_to_end(state)
    finally:
        await reader.stop()
    return state


async def _exists(config: KafkaConfig, topic: str) -> bool:
    admin = AIOKafkaAdminClient(**config.client_options(), client_id="cdc-admin")
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


class DeadLetterQueue:
    """A sink's DLQ: the state read at start, and a producer that writes dead letters and releases,
    each acknowledged (acks=all) before the call returns."""

    def __init__(self, config: KafkaConfig, pipeline: str, sink: str):
        self.config = config
        self.sink = sink
        self.topic = topic_of(pipeline, sink)
        self.state = DeadLetterState()
        self._reader: _Reader | None = None  # follows the topic: releases written by `cdc dlq` while the sink runs
        # Keys held from this process's events whose dead letters are not written yet (a later
        # event of the same batch must wait too).
        self.pending_holds: set[KeyId] = set()
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        kafka = self.config.model_copy(update={"topic_config": {**self.config.topic_config, **TOPIC_CONFIG}})
        await ensure_topics(kafka, [self.topic])
        self.state, self.pending_holds = DeadLetterState(), set()
        try:
            self._reader = _Reader(self.config, self.topic)
            await self._reader.start()
            await self._reader.read_to_end(self.state)
            self._producer = AIOKafkaProducer(
                **self.config.client_options(), client_id=f"cdc-{self.topic}", acks="all",
                enable_idempotence=self.config.idempotence,
                max_request_size=max(self.config.max_batch_bytes, 1024 * 1024),
            )
            await self._producer.start()
        except BaseException:
            await self.stop()  # a sink that starts over (Kafka away) opens them again
            raise
        if self.state.outstanding:
            log.warning("sink %s: %d dead letters in %s hold back %d keys (see `cdc dlq ... list`)", self.sink,
                        len(self.state.outstanding), self.topic, len(self.state.held))

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def follow(self) -> None:
        """After fetching, before applying: read the releases `cdc dlq retry`/`skip` wrote, up to the
        topic's end now, so a change produced after a release never waits behind it. Only while
        keys are held. (Every hold of the batches before is in a dead letter by now.)"""
        assert self._reader is not None
        self.pending_holds.clear()
        held = len(self.state.held)
        if not held:
            return
        await self._reader.read_to_end(self.state)
        if len(self.state.held) < held:
            log.info("sink %s: %d keys released from %s", self.sink, held - len(self.state.held), self.topic)

    @property
    def holding(self) -> bool:
        """Whether any key is held (while none is, events need no key check)."""
        return bool(self.state.held or self.pending_holds)

    def holds(self, key_id: KeyId) -> bool:
        return key_id in self.state.held or key_id in self.pending_holds

    def hold(self, key_id: KeyId) -> None:
        self.pending_holds.add(key_id)

    async def write(self, record: Any, reason: str, table: str, position: str, also: Iterable[str] = ()) -> None:
        """Dead-letter one source record (`also`: other keys it holds, canonical); returns once Kafka
        acknowledged it. A record written before (read again after a crash between the write and
        the positions) is not written twice."""
        where = (record.topic, record.partition, record.offset)
        if where in self.state.written:
            return
        assert self._producer is not None
        also = tuple(sorted(also))
        headers = list(record.headers or ()) + [
            (PREFIX + name, str(value).encode()) for name, value in (
                ("reason", reason), ("sink", self.sink), ("table", table), ("topic", record.topic),
                ("partition", record.partition), ("offset", record.offset), ("position", position))]
        if also:
            headers.append((PREFIX + "also_holds", json.dumps(also, ensure_ascii=False).encode()))
        try:
            sent = await self._producer.send_and_wait(self.topic, record.value, key=record.key, headers=headers)
        except Exception as exc:
            if not getattr(exc, "retriable", False) and type(exc).__module__.startswith("aiokafka"):
                raise PublishError(f"{self.topic}: Kafka refused the dead letter of "
                                   f"{record.topic}[{record.partition}]@{record.offset}: {exc!r}") from exc
            raise
        self.state.add(DeadLetter(sent.offset, record.topic, record.partition, record.offset, record.key,
                                  record.value, list(record.headers or ()), reason, table, position, also))
        log.warning("sink %s: dead-lettered %s[%d]@%d (table %s) to %s: %s", self.sink, record.topic,
                    record.partition, record.offset, table or "-", self.topic, reason)

    async def release(self, letters: list[DeadLetter], how: str) -> None:
        """Record that `letters` left the queue (`how`: retried or skipped), one release per key."""
        assert self._producer is not None
        last: dict[KeyId, DeadLetter] = {}
        for letter in letters:
            last[letter.key_id] = letter
        for key_id, letter in last.items():
            headers = [(RELEASE, how.encode()), (PREFIX + "topic", key_id[0].encode()),
                       (PREFIX + "through", str(letter.dlq_offset).encode())]
            await self._producer.send_and_wait(self.topic, None, key=letter.key, headers=headers)
            self.state.release(key_id, letter.dlq_offset)
