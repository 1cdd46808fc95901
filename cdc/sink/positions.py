"""Where a sink process is, per topic partition: the one owner of its positions.

Positions come from the target (``Target.load_positions``, stored in the same transaction as the
rows) and change only when a batch commits (:meth:`Positions.committed`) or a record is skipped on
purpose (``--skip-record``). The batch builder and the Kafka reader only read them; what a batch
has read but not yet committed lives in the batch (``BatchBuilder.progress``), never here.
"""

from __future__ import annotations

from collections.abc import Iterable

from cdc.sink.backends.base import PartitionProgress
from cdc.sink.transactions import applied_before

PartitionId = tuple[str, int]  # (topic, partition)


class Positions:
    def __init__(self) -> None:
        self.applied: dict[PartitionId, PartitionProgress] = {}  # as stored in the target, last commit
        self.loaded: dict[PartitionId, PartitionProgress] = {}  # as stored when this process started
        self.skipped_offsets: dict[PartitionId, int] = {}  # partition -> the record skipped on purpose there

    def __bool__(self) -> bool:
        return bool(self.applied)

    def get(self, partition: PartitionId) -> PartitionProgress | None:
        return self.applied.get(partition)

    def load(self, stored: dict[PartitionId, PartitionProgress]) -> None:
        """Start from what the target stored (:meth:`started` once any skip is recorded)."""
        self.applied = dict(stored)

    def started(self) -> None:
        """The positions are the ones this process starts from: remember them as loaded."""
        self.loaded = dict(self.applied)
        self.skipped_offsets = skipped_offsets(self.applied)

    def committed(self, progress: Iterable[PartitionProgress]) -> None:
        """The target committed these positions (with their rows, or a skip)."""
        for p in progress:
            self.applied[(p.topic, p.partition)] = p

    def forget(self) -> None:
        """Forget everything: the next attempt loads the positions from the target again."""
        self.applied = {}

    def skipped(self, message) -> bool:
        """A record skipped on purpose (--skip-record): read again after every restart, and passed
        over again, like a tombstone."""
        return self.skipped_offsets.get((message.topic, message.partition)) == message.offset

    def applied_before(self, topic: str, commit_lsn: int) -> float:
        """How many events of a commit the topic's partitions had applied when this process loaded
        their positions (what it applies itself, the assembler counts as read)."""
        return applied_before((p for (t, _), p in self.loaded.items() if t == topic), commit_lsn)

    def describe(self) -> str:
        return ", ".join(f"{p.topic}[{p.partition}]@{p.offset} (position {p.position})" for p in self.applied.values())


def skipped_offsets(stored: dict[PartitionId, PartitionProgress]) -> dict[PartitionId, int]:
    return {tp: p.skipped_offset for tp, p in stored.items() if p.skipped_offset is not None}
