"""The compiled core's COPY data for a PostgreSQL sink's upserts (native/src/copy_text.rs, used by
PostgresTarget._upsert) against what psycopg writes for the same rows; and into a real PostgreSQL,
the values read back as they were."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg._copy_base import TextFormatter  # what Copy.write_row runs, without a connection
from psycopg.adapt import Transformer

from cdc import native
from cdc.sink.backends.postgres import _copy_text

core = native.built
pytestmark = pytest.mark.skipif(core is None, reason=f"the compiled core is not built: {native.describe()}")

text = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30) | \
    st.sampled_from(["\\", "a\tb\nc\rd", "\b\v\f", "\\N", "é€😀", ""])
value = st.none() | text | st.integers(min_value=-(2**70), max_value=2**70)


def psycopg_writes(rows: list[tuple]) -> bytes:
    formatter = TextFormatter(Transformer())
    return b"".join(bytes(formatter.write_row(row)) for row in rows) + bytes(formatter.end())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(value, max_size=6).map(tuple), max_size=20))
def test_the_core_writes_what_psycopg_writes(rows):
    assert core.copy_text(rows) == psycopg_writes(rows)


@pytest.mark.parametrize("row", [(True,), (1.5,), (b"x",), ("a\x00b",), ("\udc80",), ([1],)])
def test_other_values_are_left_to_psycopg(row):
    assert core.copy_text([(1, "x"), row]) is None


def test_copied_values_read_back_from_postgresql_as_they_were(target_pg):
    rows = [(1, "plain", None), (2, "tab\tnewline\nreturn\rback\\slash \\N", "é€😀"),
            (2**62, "\b\v\f", ""), (-5, "", "NULL")]
    with psycopg.connect(target_pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE copied (id bigint, a text, b text)")
        with conn.cursor().copy("COPY copied (id, a, b) FROM STDIN") as copy:
            copy.write(_copy_text(rows))
        assert conn.execute("SELECT id, a, b FROM copied ORDER BY a, id").fetchall() == sorted(rows, key=lambda r: (r[1], r[0]))
