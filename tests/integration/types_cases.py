"""Every built-in type family and its array, with the JSON form an event must carry (docs/events.md, "JSON
value forms per kind"). Shared by the decoder test and the end-to-end round trip into both sinks."""

from __future__ import annotations

import base64
from decimal import Decimal

# Types the cases use that a fresh database lacks. citext and hstore are contrib extensions that both
# source servers of the suite ship (Debian's postgresql-15 and the embedded PostgreSQL 18).
SETUP = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE DOMAIN int_list AS integer[];
CREATE TYPE pair AS (a integer, b text);
"""

B64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731

def has_libxml(conn) -> bool:
    """The embedded PostgreSQL 18 is built without libxml: it cannot hold xml values at all."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute("SELECT '<a/>'::xml")
        return True
    except psycopg.errors.FeatureNotSupported:
        return False


CASES = [
    # (type, SQL literal, expected JSON form, expected kind)
    ("boolean", "true", True, "boolean"),
    ("boolean[]", "'{t,f,NULL}'", [True, False, None], "boolean"),
    ("smallint", "'-32768'", -32768, "smallint"),
    ("smallint[]", "'{1,-2}'", [1, -2], "smallint"),
    ("integer", "2147483647", 2147483647, "integer"),
    ("integer[]", "'{{1,2},{3,NULL}}'", [[1, 2], [3, None]], "integer"),
    ("bigint", "9007199254740992", 9007199254740992, "bigint"),
    ("bigint", "9007199254740993", "9007199254740993", "bigint"),
    ("bigint", "'-9223372036854775808'", "-9223372036854775808", "bigint"),
    ("bigint[]", "'{1,9223372036854775807}'", [1, "9223372036854775807"], "bigint"),
    ("oid", "4000000000", 4000000000, "bigint"),
    ("numeric(40,20)", "12345678901234567890.12345678901234567890", "12345678901234567890.12345678901234567890", "numeric"),
    ("numeric(20,8)", "0.00000001", "0.00000001", "numeric"),
    ("numeric(20,8)", "0", "0.00000000", "numeric"),
    ("numeric(6,2)", "1.5", "1.50", "numeric"),
    ("numeric", "'NaN'", "NaN", "numeric"),
    ("numeric", "'Infinity'", "Infinity", "numeric"),
    ("numeric", "'-Infinity'", "-Infinity", "numeric"),
    ("numeric", "'1e300'", "1" + "0" * 300, "numeric"),
    ("numeric", "'1e-300'", "0." + "0" * 299 + "1", "numeric"),
    ("numeric[]", "'{1.10,NaN,0.00000001,-Infinity}'", ["1.10", "NaN", "0.00000001", "-Infinity"], "numeric"),
    ("real", "0.1", Decimal("0.1"), "real"),
    ("real", "'NaN'", "NaN", "real"),
    ("real[]", "'{0.1,Infinity,NULL}'", [Decimal("0.1"), "Infinity", None], "real"),
    ("double precision", "'-Infinity'", "-Infinity", "double"),
    ("double precision", "0.1", Decimal("0.1"), "double"),
    ("double precision", "1e308", Decimal("1e308"), "double"),
    ("double precision[]", "'{0.1,-1.5e300,NaN}'", [Decimal("0.1"), Decimal("-1.5e300"), "NaN"], "double"),
    ("money", "1234.56", "$1,234.56", "text"),
    ("money[]", "'{1.5,-2}'", ["$1.50", "-$2.00"], "text"),
    ("text", "E'Zoë \\u00e9 🚀 \"q\"'", 'Zoë é 🚀 "q"', "text"),
    ("text[]", """ARRAY['a', 'b,c', NULL, 'd"e', 'NULL', '', 'x\\y']""", ["a", "b,c", None, 'd"e', "NULL", "", "x\\y"], "text"),
    ("character varying(5)", "'abc'", "abc", "text"),
    ("character varying(5)[]", "'{abc,\" d\"}'", ["abc", " d"], "text"),
    ("character(4)", "'ab'", "ab  ", "text"),
    ("character(4)[]", "'{ab}'", ["ab  "], "text"),
    ("name", "'pg_class'", "pg_class", "text"),
    ("name[]", "'{a,b}'", ["a", "b"], "text"),
    ('"char"', "'x'", "x", "text"),
    ("bytea", "'\\x00ff10'", B64(b"\x00\xff\x10"), "bytea"),
    ("bytea[]", """ARRAY['\\x00ff'::bytea, '\\x'::bytea, NULL]""", [B64(b"\x00\xff"), "", None], "bytea"),
    ("date", "'2026-11-26'", "2026-11-26", "date"),
    ("date", "'infinity'", "infinity", "date"),
    ("date", "'0044-03-15 BC'", "0044-03-15 BC", "date"),
    ("date[]", "ARRAY['2026-11-26'::date, '-infinity', '0044-03-15 BC']", ["2026-11-26", "-infinity", "0044-03-15 BC"], "date"),
    ("time without time zone", "'20:19:10.5'", "20:19:10.500000", "time"),
    ("time without time zone", "'24:00:00'", "24:00:00", "time"),
    ("time without time zone[]", "'{20:19:10,24:00:00}'", ["20:19:10", "24:00:00"], "time"),
    ("time with time zone", "'20:19:10+02'", "20:19:10+02:00", "timetz"),
    ("time with time zone[]", "'{20:19:10.25-03:30}'", ["20:19:10.250000-03:30"], "timetz"),
    ("timestamp without time zone", "'2026-11-26 20:19:10.994151'", "2026-11-26T20:19:10.994151", "timestamp"),
    ("timestamp without time zone", "'0044-03-15 12:00 BC'", "0044-03-15 12:00:00 BC", "timestamp"),
    ("timestamp without time zone", "'10000-01-01 00:00'", "10000-01-01 00:00:00", "timestamp"),
    ("timestamp without time zone[]", "ARRAY['2026-11-26 20:19:10'::timestamp, 'infinity']", ["2026-11-26T20:19:10", "infinity"], "timestamp"),
    ("timestamp with time zone", "'2026-11-26 22:19:10.994151+02'", "2026-11-26T20:19:10.994151Z", "timestamptz"),
    ("timestamp with time zone", "'-infinity'", "-infinity", "timestamptz"),
    ("timestamp with time zone", "'0044-03-15 12:00+00 BC'", "0044-03-15 12:00:00+00 BC", "timestamptz"),
    ("timestamp with time zone[]", "ARRAY['2026-01-01 00:00:00+01'::timestamptz, 'infinity', NULL]", ["2025-12-31T23:00:00Z", "infinity", None], "timestamptz"),
    ("interval", "'1 year 2 months 3 days 04:05:06.5'", "P1Y2M3DT4H5M6.5S", "interval"),
    ("interval", "'-1 day 3 hours'", "P-1DT3H", "interval"),
    ("interval[]", "ARRAY['1 mon'::interval, '0']", ["P1M", "PT0S"], "interval"),
    ("uuid", "'A0EEBC99-9c0b-4ef8-bb6d-6bb9bd380a11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid"),
    ("uuid[]", "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"], "uuid"),
    ("jsonb", """'{"n": 12345678901234567890.123456789, "a": [1, null]}'""",
     {"a": [1, None], "n": Decimal("12345678901234567890.123456789")}, "jsonb"),
    ("json", """'{"b":1.10}'""", {"b": Decimal("1.10")}, "json"),
    # A JSON null (scalar or element) and SQL NULL are both `null` in events: documented, so not here.
    ("jsonb[]", """ARRAY['{"x": 1.5}'::jsonb, '[1, 2]', NULL]""", [{"x": Decimal("1.5")}, [1, 2], None], "jsonb"),
    ("json[]", """ARRAY['"s"'::json]""", ["s"], "json"),
    ("xml", "'<a x=\"1\">t</a>'", '<a x="1">t</a>', "text"),
    ("xml[]", "ARRAY['<a/>'::xml]", ["<a/>"], "text"),
    ("inet", "'192.168.0.1/24'", "192.168.0.1/24", "text"),
    ("inet[]", "'{10.0.0.1,::1,192.168.0.1/24}'", ["10.0.0.1", "::1", "192.168.0.1/24"], "text"),
    ("cidr", "'10.0.0.0/8'", "10.0.0.0/8", "text"),
    ("cidr[]", "'{10.0.0.0/8,2001:db8::/32}'", ["10.0.0.0/8", "2001:db8::/32"], "text"),
    ("macaddr", "'08:00:2B:01:02:03'", "08:00:2b:01:02:03", "text"),
    ("macaddr[]", "'{08:00:2b:01:02:03}'", ["08:00:2b:01:02:03"], "text"),
    ("macaddr8", "'08:00:2b:01:02:03:04:05'", "08:00:2b:01:02:03:04:05", "text"),
    ("macaddr8[]", "'{08:00:2b:01:02:03:04:05}'", ["08:00:2b:01:02:03:04:05"], "text"),
    ("bit(3)", "B'101'", "101", "text"),
    ("bit(3)[]", "ARRAY[B'101', B'010']", ["101", "010"], "text"),
    ("bit varying(8)", "B'1'", "1", "text"),
    ("bit varying(8)[]", "ARRAY[B'1'::varbit]", ["1"], "text"),
    ("tsvector", "'a fat cat'", "'a' 'cat' 'fat'", "text"),
    ("tsvector[]", "ARRAY['a fat'::tsvector]", ["'a' 'fat'"], "text"),
    ("tsquery", "'fat & rat'", "'fat' & 'rat'", "text"),
    ("tsquery[]", "ARRAY['fat | rat'::tsquery]", ["'fat' | 'rat'"], "text"),
    ("point", "'(1,2)'", "(1,2)", "text"),
    ("point[]", """'{"(1,2)","(3.5,-4)"}'""", ["(1,2)", "(3.5,-4)"], "text"),
    ("line", "'{1,2,3}'", "{1,2,3}", "text"),
    ("line[]", "ARRAY['{1,2,3}'::line]", ["{1,2,3}"], "text"),
    ("lseg", "'[(0,0),(1,1)]'", "[(0,0),(1,1)]", "text"),
    ("lseg[]", "ARRAY['[(0,0),(1,1)]'::lseg]", ["[(0,0),(1,1)]"], "text"),
    ("box", "'((1,1),(0,0))'", "(1,1),(0,0)", "text"),
    ("box[]", "ARRAY['((1,1),(0,0))'::box, '((3,3),(2,2))']", ["(1,1),(0,0)", "(3,3),(2,2)"], "text"),
    ("path", "'((0,0),(1,1),(1,0))'", "((0,0),(1,1),(1,0))", "text"),
    ("path[]", "ARRAY['[(0,0),(1,1)]'::path]", ["[(0,0),(1,1)]"], "text"),
    ("polygon", "'((0,0),(1,1),(1,0))'", "((0,0),(1,1),(1,0))", "text"),
    ("polygon[]", "ARRAY['((0,0),(1,1),(1,0))'::polygon]", ["((0,0),(1,1),(1,0))"], "text"),
    ("circle", "'<(0,0),1.5>'", "<(0,0),1.5>", "text"),
    ("circle[]", "ARRAY['<(0,0),1>'::circle]", ["<(0,0),1>"], "text"),
    ("int4range", "'[1,5)'", "[1,5)", "text"),
    ("int4range[]", "ARRAY['[1,5)'::int4range, 'empty']", ["[1,5)", "empty"], "text"),
    ("numrange", "'(0.5,1.50]'", "(0.5,1.50]", "text"),
    ("int8range[]", "ARRAY['[1,)'::int8range]", ["[1,)"], "text"),
    ("daterange", "'[2026-01-01,2026-02-01)'", "[2026-01-01,2026-02-01)", "text"),
    ("tstzrange", "'[2026-01-01 00:00+01,infinity)'", '["2025-12-31 23:00:00+00",infinity)', "text"),
    ("tstzrange[]", "ARRAY['[2026-01-01 00:00+00,)'::tstzrange]", ['["2026-01-01 00:00:00+00",)'], "text"),
    ("tsrange", "'[2026-01-01 10:00,2026-01-02)'", '["2026-01-01 10:00:00","2026-01-02 00:00:00")', "text"),
    ("int4multirange", "'{[1,3),[5,7)}'", "{[1,3),[5,7)}", "text"),
    ("int4multirange[]", "ARRAY['{[1,3),[5,7)}'::int4multirange, '{}']", ["{[1,3),[5,7)}", "{}"], "text"),
    ("datemultirange", "'{[2026-01-01,2026-01-03)}'", "{[2026-01-01,2026-01-03)}", "text"),
    ("int2vector", "'1 2 3'", "1 2 3", "text"),
    ("oidvector", "'23 25'", "23 25", "text"),
    ("pg_lsn", "'16/B374D848'", "16/B374D848", "text"),
    ("mood", "'happy'", "happy", "text"),
    ("mood[]", "'{happy,sad}'", ["happy", "sad"], "text"),
    ("positive_int", "7", 7, "integer"),
    ("positive_int[]", "'{7,8}'", [7, 8], "integer"),
    ("int_list", "'{1,NULL}'", [1, None], "integer"),
    ("pair", "ROW(1, 'x y')", '(1,"x y")', "text"),
    ("pair[]", "ARRAY[ROW(1, 'a')::pair, ROW(NULL, 'b,c')::pair]", ["(1,a)", '(,"b,c")'], "text"),
    ("citext", "'Hello'", "Hello", "text"),
    ("citext[]", "ARRAY['Hello'::citext, 'a b']", ["Hello", "a b"], "text"),
    ("hstore", "'a=>1, b=>NULL'", '"a"=>"1", "b"=>NULL', "text"),
    ("hstore[]", "ARRAY['a=>1'::hstore]", ['"a"=>"1"'], "text"),
]
