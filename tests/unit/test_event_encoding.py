"""The event value as bytes: the encoder puts it together from parts (the hot path), so every part
must come out exactly as orjson writes the whole object the event contract describes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.events.codec import EventSources, event_source
from cdc.events.envelope import ChangeEvent, TransactionInfo
from cdc.lsn import Position, format_lsn, parse_lsn


def reference_value(event: ChangeEvent, pipeline: str, db: str, schema: str, table: str, ts_ms: int) -> bytes:
    """The contract's object, encoded in one piece."""
    value = {
        "op": event.op, "before": event.before, "after": event.after,
        "source": {"pipeline": pipeline, "db": db, "schema": schema, "table": table,
                   "commit_lsn": event.txn.commit_lsn_text, "lsn": event.lsn_text, "seq": event.position.seq,
                   "txid": event.txn.xid, "commit_ts": event.txn.commit_ts_text, "snapshot": event.snapshot},
        "ts_ms": ts_ms,
    }
    if event.unchanged:
        value["unchanged"] = list(event.unchanged)
    return orjson.dumps(value)


TXN = TransactionInfo(parse_lsn("16/B374D848"), "16/B374D848", 4_294_967_301, "2026-11-26T20:19:10.994151Z")
ROW = {"id": 2**63 - 1, "name": 'Zoë "quoted" \\ \n', "amount": "123.45", "tags": ["a", None],
       "doc": orjson.Fragment(b'{"a": 1,  "a": 2}'), "none": None}
EVENTS = [
    ChangeEvent("c", None, ROW, {"id": 1}, Position(TXN.commit_lsn, 0x16B374D000, 0), "16/B374D000", TXN),
    ChangeEvent("u", {"id": 1}, {"id": 1, "name": "x"}, {"id": 1}, Position(TXN.commit_lsn, 5, 2), "0/5", TXN,
                ("big", "blob")),
    ChangeEvent("d", ROW, None, {"id": 1}, Position(TXN.commit_lsn, 5, 12345), "0/5", TXN),
    ChangeEvent("r", None, ROW, {"id": 1}, Position(TXN.commit_lsn, 7, 0), "0/7", TXN, snapshot=True),
    ChangeEvent("t", None, None, None, Position(TXN.commit_lsn, 9, 0), "0/9", TXN),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.op)
@pytest.mark.parametrize("where", [("shop", "shop", "public", "orders"), ('pipe"line', "dbé", "My Schema", "täble\t1")])
def test_value_is_the_contract_object_byte_for_byte(monkeypatch, event, where):
    monkeypatch.setattr("cdc.events.envelope.time.time_ns", lambda: 1_764_187_150_994_151_000)
    for _ in range(2):  # the second time from the parts kept for the transaction and table
        assert event.encode_value(*where) == reference_value(event, *where, 1_764_187_150_994)


def test_parts_kept_per_table():
    txn = TransactionInfo(1, "0/1", 2, "2026-11-26T20:19:10.994151Z")
    a = ChangeEvent("c", None, {"id": 1}, {"id": 1}, Position(1, 1, 0), "0/1", txn)
    first = orjson.loads(a.encode_value("p", "db", "public", "a"))["source"]
    other = orjson.loads(a.encode_value("p", "db", "public", "b"))["source"]
    assert (first["table"], other["table"]) == ("a", "b")


def test_an_unencodable_value_still_raises_the_json_error():
    event = ChangeEvent("c", None, {"x": object()}, {"id": 1}, Position(1, 1, 0), "0/1", TXN)
    with pytest.raises(orjson.JSONEncodeError):
        event.encode_value("p", "db", "public", "t")


@pytest.mark.parametrize("lsn", [0, 1, 0xFFFFFFFF, 1 << 32, 0x16B374D848, 2**64 - 1])
def test_format_lsn_the_postgres_way(lsn):
    assert format_lsn(lsn) == f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
    assert parse_lsn(format_lsn(lsn)) == lsn


# Names as a catalog may hold them: quotes, backslashes, control characters, any plane.
_TEXT = st.text(max_size=12)


@given(pipeline=_TEXT, db=_TEXT, schema=_TEXT, table=_TEXT, lsn=st.integers(0, 2**64 - 1), xid=st.integers(0, 2**32 - 1),
       commit_ts=st.sampled_from(["2026-12-07T03:30:01.000001Z", "1999-12-31T23:59:59.999999Z"]),
       snapshot=st.booleans(), seq=st.integers(0, 2**31))
def test_event_sources_encode_what_orjson_encodes_of_event_source(pipeline, db, schema, table, lsn, xid, commit_ts,
                                                                  snapshot, seq):
    txn = TransactionInfo(lsn, format_lsn(lsn), xid, commit_ts)
    event = ChangeEvent("c", None, {}, None, Position(lsn, lsn, seq), format_lsn(lsn), txn, (), snapshot)
    sources = EventSources(pipeline, db, schema, table, txn, snapshot)
    assert sources.at(format_lsn(lsn), seq) == orjson.dumps(event_source(event, pipeline, db, schema, table))
