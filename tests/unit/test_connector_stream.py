import typing

from cdc.connector.stream import Stream
from cdc.source.postgres import pgoutput


def test_every_pgoutput_message_has_a_handler():
    # A message kind the decoder returns but the stream has no handler for would stop the connector
    # at the first such message ("unexpected message").
    assert set(Stream.HANDLERS) == set(typing.get_args(pgoutput.LogicalMessage))
    for name in Stream.HANDLERS.values():
        assert callable(getattr(Stream, name))
