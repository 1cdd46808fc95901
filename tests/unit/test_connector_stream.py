import typing

from cdc.connector.snapshots import RecentTransactions
from cdc.connector.stream import Stream
from cdc.source.postgres import pgoutput


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
