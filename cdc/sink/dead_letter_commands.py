"""`cdc dlq FILE --sink NAME list | retry | skip`: what a sink's dead-letter queue holds, and the
two deliberate ways out of it (README: Dead letters).

Both work while the sink runs: they write their releases to the DLQ topic, which a running sink
that holds keys reads to its end after each fetch. `retry` commits the rows before it writes the
release, so the sink applies a released key's next change after them; a change dead-lettered
meanwhile stays held, behind what `retry` applied (run it again).
"""

from __future__ import annotations

import asyncio
import logging

from cdc.config import PipelineConfig
from cdc.errors import CdcError, Failed, Kind
from cdc.events.codec import NotAnEvent, decode_event
from cdc.sink.dead_letters import DeadLetter, DeadLetterQueue, canonical_key, read_state, topic_of
from cdc.events.schema_ids import UnknownSchemaId
from cdc.sink.assemble import BatchBuilder, schema_json_of_record
from cdc.sink.guards import UnreadableRecordError
from cdc.sink.runner import Sink
from cdc.sink.backends import open_target
from cdc.sink.backends.base import Target

log = logging.getLogger(__name__)


class NothingToDoError(CdcError):
    """`--key` names no key that the DLQ holds (a typo, or released already)."""

    kind = Kind.BAD_INPUT


class NotAppliableError(CdcError):
    """`retry` would include a record that is no cdc event: it can only be skipped."""

    failed = Failed.DATA
    kind = Kind.BAD_INPUT


async def list_letters(config: PipelineConfig, name: str, key: str | None = None) -> list[DeadLetter]:
    state = await read_state(config.kafka, topic_of(config.pipeline, name))
    return state.letters(canonical_key(key) if key is not None else None)


class _Session:
    """The sink's DLQ, and its target if asked for."""

    def __init__(self, config: PipelineConfig, name: str, config_file: str, *, target: bool):
        self.sink = Sink(config, name, config_file=config_file)
        self.dlq = DeadLetterQueue(config.kafka, config.pipeline, name)
        self.target: Target | None = None
        self.with_target = target

    async def __aenter__(self) -> "_Session":
        sink_config = self.sink.sink_config
        try:
            if self.with_target:
                self.target = await asyncio.to_thread(open_target, sink_config.connect_url,
                                                      sqlite_path=sink_config.sqlite_path,
                                                      on_column_drop=sink_config.on_column_drop)
            await self.dlq.start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.dlq.stop()
        if self.target is not None:
            await asyncio.to_thread(self.target.close)

    def letters(self, key: str | None) -> list[DeadLetter]:
        letters = self.dlq.state.letters(canonical_key(key) if key is not None else None)
        if key is not None and not letters:
            raise NothingToDoError(f"{self.dlq.topic}: no dead letter of key {key} is waiting "
                                   "(see `cdc dlq ... list`); nothing was changed")
        return letters


async def retry(config: PipelineConfig, name: str, key: str | None, config_file: str) -> tuple[int, int]:
    """Apply the dead letters (of one key, or all) to the target in one transaction, in their
    source order, then release them. Returns (dead letters applied, keys released). If the target
    rejects one again, nothing is applied and nothing released."""
    async with _Session(config, name, config_file, target=True) as session:
        letters = session.letters(key)
        if not letters:
            return 0, 0
        sink, target = session.sink, session.target
        await sink.schema_resolver.learn_for(letter.as_record() for letter in letters)
        for letter in letters:
            try:
                decode_event(letter.value or b"", letter.headers)
                if letter.value is not None:
                    schema_json_of_record(letter.as_record())
            except (NotAnEvent, UnknownSchemaId, UnreadableRecordError):
                raise NotAppliableError(
                    f"{session.dlq.topic}: the dead letter at offset {letter.dlq_offset} ({letter.topic}"
                    f"[{letter.partition}]@{letter.offset}) is no cdc event (or names a schema on no record of the schemas topic) and cannot be "
                    f"applied; drop it with "
                    f"`cdc dlq {config_file} --sink {name} skip --key '{letter.key_id[1]}' --yes`; nothing was changed"
                ) from None
        assert target is not None
        for topic, kept in sink.keep.items():  # as the sink does at start: kept columns renamed since
            kept.follow(await asyncio.to_thread(target.created_names, sink.topic_tables[topic]))
        # Each key's letters in the order of their source partition, the order the sink would have
        # applied them in (letters held back may have been written before a rejected earlier one).
        builder = BatchBuilder(sink.topic_tables, {}, sink.schemas, origins=sink.origins, keep=sink.keep,
                               accept_source_history=True)
        for letter in sorted(letters, key=lambda d: (d.topic, d.partition, d.offset)):
            record = letter.as_record()
            if builder.needs_flush_before(record):
                builder.cut()
            if not builder.add(record):
                builder.cut()
                builder.add(record)
        changes, _ = builder.take()
        # No positions: the sink's stored positions are past these records already.
        await asyncio.to_thread(target.apply, sink.consumer_name, changes, [])
        await session.dlq.release(letters, "retried")
        return len(letters), len({d.key_id for d in letters})


async def skip(config: PipelineConfig, name: str, key: str | None, config_file: str) -> tuple[int, int]:
    """Release the dead letters (of one key, or all) without applying them."""
    async with _Session(config, name, config_file, target=False) as session:
        letters = session.letters(key)
        if letters:
            await session.dlq.release(letters, "skipped")
            log.warning("sink %s: %d dead letters skipped as asked (cdc dlq skip); what they held never reaches "
                        "the target", session.sink.consumer_name, len(letters))
        return len(letters), len({d.key_id for d in letters})
