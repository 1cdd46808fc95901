"""Reading existing rows in chunks between watermarks in the WAL (the source side of snapshots).

A chunk is read as DBLog does it: a *low* watermark is written to the WAL, one keyset-paginated
``SELECT`` reads up to ``limit`` rows after the last key, then a *high* watermark is written. Both
watermarks are transactional logical decoding messages (``pg_logical_emit_message``), so they reach
the connector in the replication stream, in commit order with every other change. The connector
(see :mod:`cdc.connector.snapshots`) drops from the chunk every key that a streamed change touched between the
two marks and publishes the rest at the high watermark's place in the stream: no row is missing
and none is older than a change published before it.

Nothing here holds a transaction open longer than one chunk's ``SELECT``, and nothing is written
to the source but the watermark messages (they need no table and no privilege beyond EXECUTE on
``pg_logical_emit_message``).

Values are read as the text their type's output function prints, with the walsender's session
settings: exactly what pgoutput sends for the same row, so the same converters apply.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import psycopg
from psycopg import sql

from cdc.errors import SourceError
from cdc.events.schema import keeps_values
from cdc.source.postgres.replication import SESSION_OPTIONS

if TYPE_CHECKING:
    from cdc.config import TableRef


def message_prefix(slot: str) -> str:
    """Prefix of the messages of one pipeline: other pipelines on the same database ignore them."""
    return f"cdc:{slot}"


@dataclass(slots=True)
class ChunkRead:
    rows: list[tuple[bytes | None, ...]]  # column texts in the order asked for (None: SQL NULL)
    last_key: list[str] | None  # key texts of the last row, where the next chunk starts; None if no row
    # Transactions (32-bit xids, as pgoutput's Begin carries them) whose effects the chunk's
    # snapshot does not show: see ChunkReader.unseen_transactions.
    unseen: frozenset[int] = frozenset()


class ChunkReader:
    """One connection that reads chunks of one table at a time; used from one worker thread."""

    def __init__(self, conninfo: str, slot: str):
        # synchronous_commit=local: each watermark's commit flushes the WAL, so the walsender (which
        # decodes only flushed WAL) sends it at once. On a source with synchronous_commit=off a
        # watermark would otherwise wait for the WAL writer (up to wal_writer_delay, 200 ms), and
        # so would every chunk. Only the watermarks write: the chunk's SELECT commits nothing.
        # `local`, not `on`: no wait for a synchronous standby, which the stream does not wait for either.
        self.conn = psycopg.connect(conninfo, autocommit=True, options=SESSION_OPTIONS + " -c synchronous_commit=local")
        self.prefix = message_prefix(slot)

    def close(self) -> None:
        self.conn.close()

    def emit(self, payload: dict) -> None:
        """A transactional logical decoding message for our connector, in a transaction of its own."""
        self.conn.execute(
            "SELECT pg_logical_emit_message(true, %s, %s::text)", (self.prefix, orjson.dumps(payload).decode())
        )

    def watermark(self, chunk_id: str, mark: str) -> None:
        self.emit({"chunk": chunk_id, "mark": mark})

    def last_key(self, table: sql.Composable, key: list[tuple[str, str]]) -> list[str] | None:
        """The greatest key the table holds now (texts), None when it is empty.

        A snapshot reads up to this key and no further: a row with a greater key was inserted, or
        moved there by a key change, after this moment, so the stream carries it. Without the bound
        a snapshot of a table that gains rows at its end (serial keys) would chase them forever.
        """
        key_cols = [sql.Identifier(k) for k, _ in key]
        query = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
            sql.SQL(", ").join(key_cols), table, sql.SQL(", ").join(sql.SQL("{} DESC").format(k) for k in key_cols),
        )
        with self.conn.cursor() as cur:
            cur.execute(query)
            result = cur.pgresult
            assert result is not None
            if not result.ntuples:
                return None
            # The texts the type output functions print, as select_chunk's last_key has them.
            return [result.get_value(0, c).decode() for c in range(result.nfields)]

    def select_chunk(
        self, table: sql.Composable, columns: list[str], key: list[tuple[str, str]], after_key: list[str] | None,
        limit: int | None, where: str | None, dropped: set[str] = frozenset(), until_key: list[str] | None = None,
        attnums: list[int | None] | None = None, types: list[str] | None = None,
    ) -> ChunkRead:
        """The rows after `after_key` and up to `until_key` in key order, at most `limit`, in one
        statement (one snapshot).

        `key` is [(column, type as format_type prints it)]; the key texts are cast back to those types.
        `attnums` (one per column, as the stream knows them) make the chunk immune to a RENAME or
        DROP COLUMN that committed after the stream last described the table: each column is read
        under the name its attnum has now (a dropped one as NULL), so the rows keep the stream's
        shape and the schema change event brings them to the new one like any other row. A column
        whose type changed from the stream's `types` other than by a widening is read as NULL too:
        its old type could not decode the new values, and that change makes the connector re-read
        the table once the stream reaches it.
        """
        current = list(columns)
        with self.conn.transaction():
            # One snapshot for the unseen transactions and the rows (LOCK takes none).
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if attnums is not None:
                # The lock a SELECT takes anyway, taken first: no DDL can change the names between
                # this look-up and the SELECT below.
                self.conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(table))
            unseen = self.unseen_transactions()
            if attnums is not None:
                now = {attnum: (name, type_) for attnum, name, type_ in self.conn.execute(
                    sql.SQL("SELECT attnum, attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                            " WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped"
                            ).format(sql.Literal(table.as_string(self.conn))))}
                current = []
                for i, (name, attnum) in enumerate(zip(columns, attnums)):
                    name_now, type_now = now.get(attnum, (None, None)) if attnum is not None else (name, None)
                    if type_now is not None and types is not None and not keeps_values(types[i], type_now):
                        name_now = None
                    current.append(name_now)
            read = self._select(table, columns, current, key, after_key, limit, where, dropped, until_key)
            read.unseen = unseen
            return read

    def unseen_transactions(self) -> frozenset[int]:
        """The transactions the current transaction's snapshot does not show (it must be the
        snapshot's first statement), as 32-bit xids.

        The watermarks assume that a SELECT after the low watermark sees every transaction that
        committed before it in the WAL. PostgreSQL does not promise that: it writes a commit record
        first and shows the commit to new snapshots a moment later (after the flush, after a
        synchronous standby's answer). A transaction caught in between is streamed before the low
        watermark, so the window drops none of its keys, while the chunk holds its rows as they
        were before it. The connector compares this set with the transactions it streamed before
        the low watermark and reads such a chunk again (cdc.connector.snapshots).

        Unseen are the snapshot's in-progress xids and every xid from its xmax (one past the last
        transaction whose end it shows) up to our own, which bounds the xids assigned before it.
        """
        row = self.conn.execute(
            "SELECT ARRAY(SELECT pg_snapshot_xip(s)::text::bigint), pg_snapshot_xmax(s)::text::bigint,"
            " pg_current_xact_id()::text::bigint FROM pg_current_snapshot() AS s").fetchone()
        assert row is not None
        in_progress, xmax, ours = row
        return frozenset(x & 0xFFFFFFFF for x in (*in_progress, *range(xmax, ours)))

    def _select(self, table, columns, current, key, after_key, limit, where, dropped, until_key) -> ChunkRead:
        # Columns the privacy policy drops are read as NULL: their values never leave the database;
        # so are columns dropped from the source since the stream described the table.
        names = sql.SQL(", ").join(sql.NULL if c in dropped or now is None else sql.Identifier(now)
                                   for c, now in zip(columns, current))
        key_cols = sql.SQL(", ").join(sql.Identifier(current[columns.index(k)] or k) for k, _ in key)

        def key_values(texts: list[str]) -> sql.Composable:
            # Literals, not parameters: a statement without parameters is sent as it is, so a `%` in
            # a column name ("50% off") or in the filter is never read as a placeholder.
            return sql.SQL(", ").join(sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(t))
                                      for v, (_, t) in zip(texts, key))

        conditions = []
        if after_key is not None:
            conditions.append(sql.SQL("({}) > ({})").format(key_cols, key_values(after_key)))
        if until_key is not None:
            conditions.append(sql.SQL("({}) <= ({})").format(key_cols, key_values(until_key)))
        if where:
            conditions.append(sql.SQL("({})").format(sql.SQL(where)))
        query = sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT {}").format(
            names, table,
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL(""),
            key_cols, sql.Literal(limit),
        )
        key_index = [columns.index(k) for k, _ in key]
        with self.conn.cursor() as cur:
            cur.execute(query)
            result = cur.pgresult
            assert result is not None
            # A column at a time, then transposed in C: 40% less work than a tuple per row from a generator.
            get, numbers = result.get_value, range(result.ntuples)
            rows = list(zip(*[[get(r, c) for r in numbers] for c in range(result.nfields)]))
        last = [rows[-1][i].decode() for i in key_index] if rows else None  # key columns are never NULL
        return ChunkRead(rows, last)

    def estimate_rows(self, table: sql.Composable, where: str | None) -> int:
        """The planner's row count (cheap, and sensible even for a table never analyzed): the
        progress display's total, not a promise."""
        query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}").format(table)
        if where:
            query = sql.SQL("{} WHERE ({})").format(query, sql.SQL(where))
        (plan,) = self.conn.execute(query).fetchone()
        plan = orjson.loads(plan) if isinstance(plan, (str, bytes)) else plan
        return int(plan[0]["Plan"]["Plan Rows"])


def check_filter(conn: psycopg.Connection, table: sql.Composable, where: str) -> str | None:
    """Why `where` is not a usable row filter on `table` (the server's one-line message), or None."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE ({})").format(table, sql.SQL(where)))
    except psycopg.Error as exc:
        diag = getattr(exc, "diag", None)
        return (diag.message_primary if diag is not None else None) or type(exc).__name__
    return None


def request_snapshot(conninfo: str, slot: str, tables: list[TableRef], where: str | None, *,
                     only_into_a_slot: bool = False) -> tuple[str | None, bool]:
    """Write an on-demand snapshot request into the source's WAL, for the connector streaming `slot`
    (`cdc snapshot`, and the connector itself after a type change rewrote a table's values).

    Checks `where` against every table first (exit 2 on a filter the server refuses; nothing is
    written then). Returns the request id, and whether a connector holds the slot now. With
    `only_into_a_slot`, a slot that does not exist yet gets nothing (the request id is None): the
    slot starts after what is written now, so no connector would ever read it (write it with
    `write_request` once the slot exists)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if where is not None:
            for table in tables:
                problem = check_filter(conn, sql.Identifier(table.schema, table.name), where)
                if problem:
                    raise SourceError(f"--where does not work on {table}: {problem}")
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if row is None and only_into_a_slot:
            return None, False
        request = new_request_id()
        _write_request(conn, slot, request, tables, where)
    return request, row is not None and row[0] is not None


def new_request_id() -> str:
    """A snapshot request's id: short, and unique among a pipeline's requests."""
    return uuid.uuid4().hex[:12]


def write_request(conninfo: str, slot: str, request: str, tables: list[TableRef], where: str | None) -> None:
    """Write the snapshot request `request` (its `where` checked before) into the source's WAL."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        _write_request(conn, slot, request, tables, where)


def _write_request(conn: psycopg.Connection, slot: str, request: str, tables: list[TableRef], where: str | None) -> None:
    payload = {"request": request, "tables": [str(t) for t in tables], "where": where}
    conn.execute("SELECT pg_logical_emit_message(true, %s, %s::text)",
                 (message_prefix(slot), orjson.dumps(payload).decode()))
