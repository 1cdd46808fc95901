"""The sink's one owner of positions (cdc.sink.positions): what a restart and a batch read."""

from __future__ import annotations

from types import SimpleNamespace

from cdc.lsn import Position
from cdc.sink.backends import PartitionProgress
from cdc.sink.positions import Positions
from cdc.sink.transactions import ALL


def stored(topic: str, partition: int, offset: int, commit: int, *, events: int | None = 1,
           skipped: int | None = None) -> PartitionProgress:
    return PartitionProgress(topic, partition, offset, Position(commit, commit, 0), None, events, skipped)


def test_a_commit_moves_the_applied_position_but_not_what_the_process_started_from():
    positions = Positions()
    positions.load({("t", 0): stored("t", 0, 9, 100, events=2)})
    positions.started()
    positions.committed([stored("t", 0, 12, 300)])
    assert positions.get(("t", 0)).offset == 12
    # How many events of a commit were applied before this process read any: from the loaded
    # position only, whatever this process applied since (the assembler counts those itself).
    assert positions.applied_before("t", 100) == 2 and positions.applied_before("t", 50) == ALL


def test_a_record_skipped_on_purpose_is_passed_over_after_every_restart_and_nothing_else_is():
    positions = Positions()
    positions.load({("t", 0): stored("t", 0, 4, 100, skipped=5)})
    positions.started()
    assert positions.skipped(SimpleNamespace(topic="t", partition=0, offset=5))
    assert not positions.skipped(SimpleNamespace(topic="t", partition=0, offset=6))
    assert not positions.skipped(SimpleNamespace(topic="t", partition=1, offset=5))


def test_forgetting_drops_the_applied_positions_a_new_attempt_loads_again():
    positions = Positions()
    positions.load({("t", 0): stored("t", 0, 4, 100)})
    positions.forget()
    assert not positions and positions.get(("t", 0)) is None
