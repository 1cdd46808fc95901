"""Fetched Kafka records read by the compiled core: one call per partition and fetch.

aiokafka turns every fetched record into Python objects field by field (its record, then a
``ConsumerRecord`` dataclass, the headers as a new tuple each time), about a tenth of a sink's time.
With the compiled core, a partition's record batches in a fetch response are read in one call
(``read_fetched``, native/src/fetched_records.rs) into records with the same attributes, whose equal
headers are one tuple object (the sink compares them by identity first: cdc.sink.consume.share_headers).

aiokafka has no public interface for this. :func:`install` replaces, in its fetcher module, the
class that iterates a partition's fetched records with a subclass that reads them this way, and
the class that wraps a partition's fetched bytes with one that keeps them. Anything the core does not
read as cdc's producers write it (another message format, a compressed batch, a CRC that does not
match, ``read_committed``, deserializers) is read by aiokafka's code, unchanged. The same records, offsets and
errors either way: tests/unit/test_fetched_records.py compares both readers on generated batches, and
every test that consumes from a broker goes through this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher

from cdc import native

_READ_UNCOMMITTED = fetcher.READ_UNCOMMITTED
_AIOKAFKA_RECORDS = fetcher.PartitionRecords
_AIOKAFKA_MEMORY_RECORDS = fetcher.MemoryRecords


class _KeptMemoryRecords(_AIOKAFKA_MEMORY_RECORDS):  # type: ignore[misc, valid-type]
    """aiokafka's reader of a partition's fetched bytes, which also keeps the bytes for the core."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.data = data


class CompiledPartitionRecords(_AIOKAFKA_RECORDS):  # type: ignore[misc, valid-type]
    """aiokafka's PartitionRecords, its records read by the compiled core where it reads them."""

    def _unpack_records(self) -> Iterator[Any]:
        batches = self._read_compiled()
        if batches is None:
            yield from super()._unpack_records()
            return
        # As aiokafka's: the next offset to fetch moves past each record handed on and past each
        # batch read (a control batch, records removed by compaction), and records before it are not
        # handed on again.
        for records, next_offset in batches:
            for record in records:
                if record.offset < self.next_fetch_offset:
                    continue
                self.next_fetch_offset = record.offset + 1
                yield record
            self.next_fetch_offset = next_offset

    def _read_compiled(self) -> list | None:
        data = getattr(self._records, "data", None)
        if (type(data) is not bytes or self._isolation_level != _READ_UNCOMMITTED
                or self._key_deserializer is not None or self._value_deserializer is not None):
            return None
        return native.core.read_fetched(data, self._tp.topic, self._tp.partition, bool(self._check_crcs))


def compiled() -> bool:
    """Whether fetched records are read by the compiled core."""
    return native.core is not None and hasattr(native.core, "read_fetched")


def install() -> None:
    """Read fetched records with the compiled core in this process, from the next fetch on (once is
    enough; again does nothing). Without the core, aiokafka reads them, as always."""
    if compiled():
        fetcher.PartitionRecords = CompiledPartitionRecords
        fetcher.MemoryRecords = _KeptMemoryRecords


def uninstall() -> None:
    """aiokafka's own readers again (tests compare the two)."""
    fetcher.PartitionRecords = _AIOKAFKA_RECORDS
    fetcher.MemoryRecords = _AIOKAFKA_MEMORY_RECORDS


__all__ = ["CompiledPartitionRecords", "compiled", "install", "uninstall"]
