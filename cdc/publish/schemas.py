"""The schemas topic ({pipeline}.schemas) read by every reader of events: the one resolver of schema ids.

Events name their schema by id (cdc.events.schema_ids); the schema itself is a record on the
compacted topic ``{pipeline}.schemas``, written by the connector before the first event naming it.
A reader hands each fetch to :meth:`SchemaResolver.learn_for` before parsing it: ids it has not
learnt yet make it read the topic (from where it last stopped, from the start the first time) until
they are found or the topic's end is reached. Records are then parsed synchronously
(cdc.events.codec, cdc.sink.assemble); an id still unknown there stops the reader, naming the
record and the id. Kafka alone is enough: no other service is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import KafkaConfig
from cdc.events import schema_ids
from cdc.publish.admin import track_topics

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_MS = 1000


class SchemaResolver:
    """Learns the schemas that records name from the pipeline's schemas topic, as they are needed."""

    def __init__(self, kafka: KafkaConfig, pipeline: str):
        self.kafka = kafka
        self.topic = schema_ids.topic_of(pipeline)
        self._next_offset = 0  # records before it were read already (into the process-wide table)

    def missing(self, records: Iterable) -> set[bytes]:
        """Schema ids the records name (tombstones name none) that are not learnt yet."""
        ids = {schema_ids.id_of(r.headers) for r in records if r.value is not None}
        return {i for i in ids if i is not None and not schema_ids.known(i)}

    async def learn_for(self, records: Iterable) -> None:
        """Learn every schema the records name that is on the topic. Never raises for an id that is
        not there: the record naming it is reported where it is parsed, in its place in the order."""
        wanted = self.missing(records)
        if wanted:
            await self._read(wanted)

    async def _read(self, wanted: set[bytes]) -> None:
        consumer = AIOKafkaConsumer(**self.kafka.client_options(), enable_auto_commit=False)
        await consumer.start()
        try:
            if self.topic not in await consumer.topics():
                return
            part = TopicPartition(self.topic, 0)
            await track_topics(consumer, [self.topic])
            # The offsets before assigning: an assigned partition starts a fetch at once, which holds
            # the connection for fetch_max_wait_ms (500 ms of every reader's start) before they are answered.
            first, end = ((await consumer.beginning_offsets([part]))[part], (await consumer.end_offsets([part]))[part])
            consumer.assign([part])
            if end < self._next_offset:  # the topic was re-created: read it again
                self._next_offset = 0
            consumer.seek(part, max(self._next_offset, first))
            while wanted and await consumer.position(part) < end:
                for message in (await consumer.getmany(part, timeout_ms=_FETCH_TIMEOUT_MS)).get(part, []):
                    self._next_offset = message.offset + 1
                    if message.key is None or message.value is None:
                        continue
                    if not schema_ids.learn(message.key, message.value):
                        log.warning("%s@%d: the record's key is not the id of its schema; ignored",
                                    self.topic, message.offset)
                        continue
                    wanted.discard(message.key)
        finally:
            await consumer.stop()
