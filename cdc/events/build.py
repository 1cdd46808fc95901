"""Row changes -> the events the contract promises, as pure functions over decoded rows.

The source decodes a change into rows (column name -> JSON value); these functions decide which
events that change becomes, so the rules live in one testable place:

- ``after`` is the row's complete state: a value PostgreSQL did not resend (unchanged TOAST,
  marked :data:`UNCHANGED`) is taken from the before-image when the table's replica identity sent
  one. When no before-image holds it, the event lists the column in ``unchanged`` and ``after``
  lacks it: the one exception to the full-row rule, so a sink updates only the columns present
  instead of the stream stopping for good on WAL that cannot be rewritten.
- A primary-key change is a delete of the old key and a create of the new one, so each key's events
  stay on one partition, in order, and log compaction stays correct. (With columns unchanged, the
  create could not carry the full row: then it stays one ``u`` event whose ``before`` holds the old
  key, and a sink moves the row.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()
"""A value the source did not resend because the change left it as it was (unchanged TOAST)."""


class KeyNotSent(ValueError):
    """A key column's value is neither in the new row nor in a before-image: the event has no key."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        super().__init__(", ".join(columns))


@dataclass(slots=True)
class RowEvent:
    op: str  # c, u, d
    before: Row | None
    after: Row | None
    key: Row
    unchanged: tuple[str, ...] = ()  # columns of the row that `after` lacks (see the module doc)


def key_of(row: Row, key_names: tuple[str, ...]) -> Row:
    return {k: row[k] for k in key_names}


def insert_events(new: Row, key_names: tuple[str, ...]) -> list[RowEvent]:
    # An INSERT always carries every value.
    return [RowEvent("c", None, new, key_of(new, key_names))]


def delete_events(old: Row, old_is_full: bool, key_names: tuple[str, ...]) -> list[RowEvent]:
    """`old` is the full before-image (REPLICA IDENTITY FULL) or only the key."""
    key = key_of(old, key_names)
    return [RowEvent("d", _without_unchanged(old) if old_is_full else key, None, key)]


def update_events(new: Row, old: Row | None, key_names: tuple[str, ...]) -> list[RowEvent]:
    """`old`: the full before-image, or only the old key (sent when the key changed), or None."""
    after, unchanged = fill_unchanged(new, old)
    missing = [k for k in key_names if k in unchanged]
    if missing:
        raise KeyNotSent(missing)
    key = key_of(after, key_names)
    before = _without_unchanged(old) if old is not None else None
    if before is not None:
        old_key = key_of(before, key_names)
        if old_key != key and not unchanged:
            return [RowEvent("d", before, None, old_key), RowEvent("c", None, after, key)]
    return [RowEvent("u", before, after, key, unchanged)]


def fill_unchanged(new: Row, old: Row | None) -> tuple[Row, tuple[str, ...]]:
    """`new` with unchanged values taken from `old`; those `old` lacks are dropped and listed."""
    missing: list[str] = []
    for name, value in new.items():
        if value is UNCHANGED:
            previous = old.get(name, UNCHANGED) if old is not None else UNCHANGED
            if previous is UNCHANGED:
                missing.append(name)
            else:
                new[name] = previous
    for name in missing:
        del new[name]
    return new, tuple(missing)


def _without_unchanged(row: Row) -> Row:
    if any(v is UNCHANGED for v in row.values()):
        return {k: v for k, v in row.items() if v is not UNCHANGED}
    return row
