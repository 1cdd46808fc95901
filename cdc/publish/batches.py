"""Record batches the Publisher fills and hands to aiokafka's producer (``send_batch``).

With the compiled core, a batch is its ``RecordBatch`` (native/src/record_batch.rs): a run of events
is framed into the batch in one call, where aiokafka's builder takes a Python call, a timestamp and
a small buffer per record. The bytes are the ones aiokafka's builder writes for the same records
(tests/unit/test_record_batch.py). Without the core, aiokafka's own builder is used.

:class:`NativeBatch` is what aiokafka's producer expects of a batch builder (its ``BatchBuilder``:
``close``, ``closed``, ``record_count``, ``size``, ``_set_producer_state``, ``_build``); aiokafka
has no public interface for this, so tests/integration publish through it into a real broker.
"""

from __future__ import annotations

from typing import Any

from cdc import native


def native_batches() -> bool:
    """Whether the Publisher builds its batches with the compiled core."""
    return native.core is not None and hasattr(native.core, "RecordBatch")


class NativeBatch:
    """One topic partition's record batch, built by the compiled core (uncompressed, not transactional:
    the producer cdc configures)."""

    __slots__ = ("records", "_closed", "_buffer", "_producer_state")

    def __init__(self, batch_size: int):
        assert native.core is not None
        self.records = native.core.RecordBatch(batch_size)
        self._closed = False
        self._buffer: bytes | None = None
        # What a producer without idempotence sends: no producer id, epoch or sequence (aiokafka's defaults).
        self._producer_state = (-1, -1, 0)

    def add(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> bool:
        """One record, stamped now; False when the batch is full."""
        return not self._closed and self.records.append(key, value, headers)

    def add_many(self, records: list[tuple[bytes, bytes]], start: int, headers: list[tuple[str, bytes]],
                 header_bytes: int, most: int) -> tuple[int, int]:
        """records[start:] while they fit and weigh at most `most` bytes each (key, value and
        `header_bytes`), stamped now: (how many it took, their weight)."""
        if self._closed:
            return 0, 0
        return self.records.append_many(records, start, headers, header_bytes, most)

    # -- what aiokafka's producer calls ---------------------------------------------------------

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None,
               headers: list[tuple[str, bytes]] | None = None) -> Any:
        """aiokafka's append (its producer appends to a batch it holds only while it is open; the
        Publisher closes each before handing it over): a true value, or None when full or closed."""
        if self._closed:
            return None
        return True if self.records.append(key, value, headers or (), timestamp) else None

    def close(self) -> None:
        self._closed = True

    def closed(self) -> bool:
        return self._closed

    def record_count(self) -> int:
        return self.records.record_count

    def size(self) -> int:
        return len(self._buffer) if self._buffer is not None else self.records.size

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        # Called by the idempotent producer before it builds the batch (once: a retry sends the same bytes).
        self._producer_state = (producer_id, producer_epoch, base_sequence)

    def _build(self) -> bytes:
        self._closed = True
        if self._buffer is None:
            self._buffer = self.records.build(*self._producer_state, False)
        return self._buffer
