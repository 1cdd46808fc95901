"""PostgreSQL log sequence numbers and event positions.

An LSN is a 64-bit WAL location, written the Postgres way as two hex halves: ``16/B374D848``.
A :class:`Position` orders events of one slot: the LSN of the transaction's commit, then the
event's index inside that transaction.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> int. Raises ValueError naming the bad text."""
    match = _LSN_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid LSN {text!r}: expected two hex numbers like '16/B374D848'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """int -> ``'16/B374D848'`` (upper-case hex, as PostgreSQL prints it)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Position(NamedTuple):
    """Where an event stands in the stream of one slot. Tuples compare in order: commit, then seq."""

    commit_lsn: int
    seq: int

    def __str__(self) -> str:
        return f"{format_lsn(self.commit_lsn)}#{self.seq}"
