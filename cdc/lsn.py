"""PostgreSQL log sequence numbers and event positions.

An LSN is a 64-bit WAL location, written the Postgres way as two hex halves: ``16/B374D848``.
A :class:`Position` names one change in the WAL, whatever the pipeline's tables, keys or privacy
policy: the LSN of its transaction's commit, the LSN of the change record itself, and an index
among the events of changes sharing that record (COPY writes one multi-insert record for
many rows; a primary-key change is published as two events). Positions of one slot are totally
ordered, and strictly increase along a partition.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from cdc import native

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> int. Raises ValueError naming the bad text."""
    match = _LSN_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid LSN {text!r}: expected two hex numbers like '16/B374D848'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """int -> ``'16/B374D848'`` (upper-case hex, as PostgreSQL prints it)."""
    return "%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF)  # half the time of an f-string with :X (once per event)


python_format_lsn = format_lsn
if native.core is not None:  # the same text, for a fifth of the CPU: every change's event has one (cdc.native)
    format_lsn = native.core.LsnFormatter(python_format_lsn).format


class Position(NamedTuple):
    """Where an event stands in the stream of one slot. Tuples compare in order: commit, lsn, seq."""

    commit_lsn: int  # the transaction's commit record
    lsn: int  # the change's own WAL record (for a truncate: the TRUNCATE record)
    seq: int  # index among the events of changes at `lsn`, from 0

    def __str__(self) -> str:
        return f"{format_lsn(self.commit_lsn)}:{format_lsn(self.lsn)}#{self.seq}"


def parse_position(commit_lsn: str, lsn: str, seq: int | str) -> Position:
    """A position from the three parts it is written as (an event's or record's ``source``, a sink's
    stored row): the one reading of a written position. Raises ValueError naming a bad LSN."""
    return Position(_parse_commit_lsn(commit_lsn) if type(commit_lsn) is str else parse_lsn(commit_lsn),
                    parse_lsn(lsn), int(seq))


# The events of a transaction share its commit LSN: parsed once for a run of them.
_parse_commit_lsn = functools.lru_cache(maxsize=64)(parse_lsn)
