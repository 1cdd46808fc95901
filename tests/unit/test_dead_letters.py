"""Dead letters without services: which target errors are the data's (dead-lettered with
`on_error: dlq`) and which are the connection's (retried, never dead-lettered), and how the DLQ
topic's records add up to the keys held back."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from cdc.errors import RowRejectedError, SinkError, is_transient
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position
from cdc.sink.dead_letters import PREFIX, RELEASE, DeadLetterState, canonical_key
from cdc.sink.backends import PostgresDialect, SqliteDialect
from cdc.sink.assemble import BatchBuilder
from cdc.sink.backends import PartitionProgress, PostgresTarget, SqliteTarget
from cdc.sink.backends.base import _Step

ITEMS = TableSchema("public", "items", (Column("id", "integer", "integer", nullable=False),
                                        Column("n", "integer", "integer")), ("id",))


def pg_error(exc: Exception) -> SinkError | None:
    target = object.__new__(PostgresTarget)
    target._find_bad_column = lambda step: None  # no database to ask
    return target._sink_error(exc, _Step(PostgresDialect().plan("items", ITEMS)))


def lite_error(exc: Exception) -> SinkError | None:
    return object.__new__(SqliteTarget)._sink_error(exc, _Step(SqliteDialect().plan("items", ITEMS)))


@pytest.mark.parametrize("error", [psycopg.errors.CheckViolation, psycopg.errors.UniqueViolation,
                                   psycopg.errors.NotNullViolation, psycopg.errors.NumericValueOutOfRange,
                                   psycopg.errors.StringDataRightTruncation, psycopg.errors.InvalidDatetimeFormat])
def test_postgres_data_and_constraint_errors_are_the_rows(error):
    assert isinstance(pg_error(error("refused")), RowRejectedError)


@pytest.mark.parametrize("error", [psycopg.errors.UndefinedColumn, psycopg.errors.InsufficientPrivilege,
                                   psycopg.errors.FeatureNotSupported])
def test_postgres_schema_and_privilege_errors_stop_the_sink(error):
    found = pg_error(error("refused"))
    assert isinstance(found, SinkError) and not isinstance(found, RowRejectedError)


@pytest.mark.parametrize("error", [psycopg.errors.AdminShutdown("terminating connection"),
                                   psycopg.errors.SerializationFailure("could not serialize"),
                                   psycopg.errors.DeadlockDetected("deadlock"),
                                   psycopg.OperationalError("server closed the connection unexpectedly")])
def test_postgres_connection_errors_are_never_the_rows_and_are_retried(error):
    assert pg_error(error) is None  # raised as it is, and then:
    assert is_transient(error)


@pytest.mark.parametrize("error", [sqlite3.IntegrityError("CHECK constraint failed: n < 10"),
                                   sqlite3.IntegrityError("NOT NULL constraint failed: items.n"),
                                   sqlite3.IntegrityError("cannot store TEXT value in INTEGER column items.n"),
                                   sqlite3.DataError("string or blob too big")])
def test_sqlite_constraint_and_type_errors_are_the_rows(error):
    assert isinstance(lite_error(error), RowRejectedError)


def test_sqlite_locks_and_schema_problems_are_not_the_rows():
    locked = sqlite3.OperationalError("database is locked")
    assert lite_error(locked) is None and is_transient(locked)
    missing = lite_error(sqlite3.OperationalError("table items has no column named n"))
    assert isinstance(missing, SinkError) and not isinstance(missing, RowRejectedError)


def test_a_value_the_sink_cannot_convert_is_the_rows():
    plan = SqliteDialect().plan("items", ITEMS)
    with pytest.raises(RowRejectedError, match='column "n"'):
        plan.upsert_params([{"id": 1, "n": 2**63}])


def test_a_rejected_row_is_not_transient_even_when_its_cause_is_a_driver_error():
    try:
        try:
            raise psycopg.errors.CheckViolation("violates check constraint")
        except psycopg.Error:
            raise RowRejectedError('table "items": rejected') from None
    except RowRejectedError as exc:
        assert not is_transient(exc)


def test_keys_compare_in_one_canonical_form():
    assert canonical_key(b'{"b": 2, "a": 1}') == canonical_key('{"a":1,"b":2}') == canonical_key({"a": 1, "b": 2})
    assert canonical_key(b"\xff not json") == "\\xff not json"


def letter(offset: int, key: bytes, source_offset: int) -> tuple:
    headers = [("cdc.schema", b"{}"), (PREFIX + "topic", b"p.public.items"), (PREFIX + "partition", b"0"),
               (PREFIX + "offset", str(source_offset).encode()), (PREFIX + "reason", b"r"),
               (PREFIX + "table", b"items"), (PREFIX + "position", b"0/1:0/1#0")]
    return offset, key, b"{}", headers


def release(offset: int, key: bytes, through: int) -> tuple:
    return offset, key, None, [(RELEASE, b"retried"), (PREFIX + "topic", b"p.public.items"),
                               (PREFIX + "through", str(through).encode())]


def test_a_release_frees_the_dead_letters_of_its_key_up_to_its_offset_only():
    state = DeadLetterState()
    for record in (letter(0, b'{"id": 1}', 10), letter(1, b'{"id": 2}', 11), letter(2, b'{"id":1}', 12),
                   release(3, b'{"id":1}', 2), letter(4, b'{"id": 1}', 13), release(5, b'{"id": 2}', 0)):
        state.read(*record)
    assert [d.dlq_offset for d in state.letters()] == [1, 4]  # key 2's release ends before its letter
    assert state.held == {("p.public.items", '{"id":1}'): 1, ("p.public.items", '{"id":2}'): 1}
    assert state.letters('{"id":1}')[0].offset == 13
    assert state.letters()[0].headers == [("cdc.schema", b"{}")]  # the original headers, without ours
    assert ("p.public.items", 0, 12) in state.written  # released, but never written again


def test_a_moved_row_holds_its_old_key_until_its_dead_letter_leaves():
    state = DeadLetterState()
    offset, key, value, headers = letter(0, b'{"id": 9}', 10)  # a row that moved from key 1 to key 9
    state.read(offset, key, value, headers + [(PREFIX + "also_holds", b'["{\\"id\\":1}"]')])
    assert set(state.held) == {("p.public.items", '{"id":9}'), ("p.public.items", '{"id":1}')}
    state.read(*release(1, b'{"id": 9}', 0))
    assert state.held == {} and state.letters() == []


def test_a_held_key_is_dead_lettered_past_the_stored_position_and_a_repeat_is_not():
    from tests.unit.test_sink_batch import message

    stored = PartitionProgress("t", 0, 5, Position(0x20, 0x20, 0), ("111", 1), 1)
    builder = BatchBuilder({"t": "items"}, {("t", 0): stored}, {})
    builder.hold = lambda m, event, schema: "held back" if (event["after"] or {}).get("id") == 2 else None
    repeat, held, other = (message("c", 0x20, {"id": 2, "name": "a"}), message("u", 0x30, {"id": 2, "name": "b"}),
                           message("c", 0x40, {"id": 3, "name": "c"}))
    for m in (repeat, held, other):
        assert builder.add(m)
    assert [(m.offset, reason, table) for m, reason, table, _ in builder.dead] == [(held.offset, "held back", "items")]
    (changes,), (progress,) = builder.take()
    assert changes.upserts == [{"id": 3, "name": "c"}]  # key 2 changes nothing in the target
    assert progress.offset == other.offset  # stored once the dead letter is acknowledged (Sink._apply)
    builder.add_dead(repeat, Position(0x20, 0x20, 0), "refused")  # applied before: goes nowhere
    assert builder.dead == [(held, "held back", "items", "0/30:0/30#0")]
