"""Schema ids: a record names its published schema by a digest; readers resolve it, or say which id they lack."""

from __future__ import annotations

import orjson
import pytest

from cdc.events import schema_ids
from cdc.events.codec import JsonText, decode_event
from cdc.events.schema import Column, TableSchema
from cdc.sink.assemble import BatchBuilder
from cdc.sink.dead_letters import SourceRecord
from cdc.sink.guards import UnreadableRecordError

SCHEMA = TableSchema("public", "docs", (Column("id", "integer", "integer"), Column("j", "jsonb", "jsonb")), ("id",))
SOURCE = {"pipeline": "p", "db": "d", "schema": "public", "table": "docs", "commit_lsn": "0/20", "lsn": "0/10",
          "seq": 0, "txid": 7, "commit_ts": "2026-11-26T20:19:10Z", "snapshot": False}
VALUE = orjson.dumps({"op": "c", "before": None, "after": {"id": 1, "j": orjson.Fragment(b'{"b":1, "a":2}')},
                      "source": SOURCE, "ts_ms": 1})


def record(headers, offset=5) -> SourceRecord:
    return SourceRecord("p.public.docs", 0, offset, b'{"id":1}', VALUE, headers)


def test_the_id_is_a_short_digest_of_the_schema_json_and_the_same_for_the_same_shape():
    first = schema_ids.schema_id(SCHEMA.to_json())
    assert first == schema_ids.schema_id(TableSchema.from_json(SCHEMA.to_json()).to_json())  # a restart re-uses it
    assert len(first) == 24 and int(first, 16) >= 0
    other = TableSchema("public", "docs", SCHEMA.columns[:1], ("id",))
    assert schema_ids.schema_id(other.to_json()) != first


def test_a_record_with_the_id_decodes_as_one_with_the_full_schema_once_the_schema_is_learnt():
    schema_json = SCHEMA.to_json()
    sid = schema_ids.schema_id(schema_json)
    headers = [("cdc.origin", b"{}"), (schema_ids.HEADER, sid)]
    assert schema_ids.learn(sid, schema_json)
    by_id, _ = decode_event(VALUE, headers)
    whole, _ = decode_event(VALUE, [("cdc.schema", schema_json)])  # the previous release's records
    assert by_id == whole and type(by_id["after"]["j"]) is JsonText and by_id["after"]["j"] == '{"b":1, "a":2}'
    assert BatchBuilder({"p.public.docs": "docs"}, {}, {}).schema_of(record(headers)) == SCHEMA


def test_a_schema_record_whose_key_is_not_its_digest_is_not_learnt():
    other = TableSchema("public", "docs", SCHEMA.columns[:1], ("id",)).to_json()
    forged = schema_ids.schema_id(b'{"schema":"public","table":"forged"}')
    assert not schema_ids.learn(forged, other)
    assert not schema_ids.known(forged)


def test_an_unknown_id_stops_the_reader_naming_the_record_and_the_id():
    unknown = b"0123456789abcdef01234567"
    headers = [(schema_ids.HEADER, unknown)]
    with pytest.raises(schema_ids.UnknownSchemaId):
        decode_event(VALUE, headers)  # never parsed without its schema: json values would lose their text
    with pytest.raises(UnreadableRecordError) as raised:
        BatchBuilder.parse(record(headers, offset=42))
    assert raised.value.record == ("p.public.docs", 0, 42)  # the existing unreadable-record path: exit 4
    assert "p.public.docs[0]@42" in str(raised.value) and unknown.decode() in str(raised.value)
    with pytest.raises(UnreadableRecordError, match=unknown.decode()):
        BatchBuilder({"p.public.docs": "docs"}, {}, {}).schema_of(record(headers, offset=42))


def test_a_record_without_either_header_is_no_cdc_event():
    with pytest.raises(UnreadableRecordError, match="no cdc.schema_id header"):
        BatchBuilder({"p.public.docs": "docs"}, {}, {}).schema_of(record([("cdc.origin", b"{}")]))
