import typing

from hypothesis import given
from hypothesis import strategies as st

from cdc.connector.positions import Positions
from cdc.connector.snapshots import RecentTransactions
from cdc.connector.stream import Stream
from cdc.source.postgres import pgoutput
from cdc.source.postgres.frames import PG_TIME_MAX_US, PG_TIME_MIN_US, pg_time


def test_every_pgoutput_message_has_a_handler():
    # A message kind the decoder returns but the stream has no handler for would stop the connector
    # at the first such message ("unexpected message").
    assert set(Stream.HANDLERS) == set(typing.get_args(pgoutput.LogicalMessage))
    for name in Stream.HANDLERS.values():
        assert callable(getattr(Stream, name))


def test_recent_transactions_say_which_unseen_transactions_were_streamed_before_a_place():
    recent = RecentTransactions(size=3)
    for xid in (100, 101, 102):
        recent.note(xid)
    place = recent.read  # a low watermark here
    recent.note(103)  # streamed inside the window: its keys are dropped from the chunk anyway
    assert sorted(recent.read_before(frozenset({101, 103, 999}), place)) == [101]
    recent.note(104)  # the oldest (100) is forgotten: unknown counts as not streamed before
    assert recent.read_before(frozenset({100}), place) == []


@given(st.lists(st.integers(PG_TIME_MIN_US, PG_TIME_MAX_US) | st.integers(-(10**13), 10**13), min_size=1, max_size=6))
def test_a_transactions_commit_time_is_its_begin_messages_time_to_the_microsecond(times):
    """Positions formats the date and time to the second once per second of commits: each
    transaction's text and epoch must still be those of its own Begin message's time."""
    positions = Positions()
    for us in sorted(times) + times:  # the same second again, later seconds, earlier ones
        positions.begin_at(0x16_B374D848, us, 7)
        expected = pg_time(us)
        assert positions.info.commit_ts_text == expected.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        assert positions.commit_epoch == expected.timestamp()
        positions.commit(0x16_B374D900)
