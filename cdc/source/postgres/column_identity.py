"""Which column a Relation message's column is: its attnum, its identity across renames.

pgoutput names a relation's columns but does not give their attnums; the connector matches them
with what the catalog holds now (live columns and dropped ones) and what it knew before. Pure
functions; the catalog look-up is cdc.source.postgres.catalog's (Catalog.live_columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cdc.errors import SourceError


@dataclass(frozen=True, slots=True)
class LiveColumn:
    """A column of the table as the catalog holds it now (see Catalog.live_columns)."""

    attnum: int
    name: str
    type_oid: int


class ColumnIdentityError(SourceError):
    """The connector cannot tell which column a Relation message's column is (several schema changes
    at once, or the catalog already moved past the change). It stops before publishing the change."""


def resolve_attnums(
    names: Sequence[str], type_oids: Sequence[int], live: Sequence[LiveColumn], dropped: Sequence[int],
    previous: Mapping[str, int] | None, exact_prefix: bool = True,
) -> list[int]:
    """The attnum of each column of a Relation message (`names`, `type_oids`, in attnum order).

    pgoutput's Relation message carries names and types, no identity, so the columns are matched
    with the catalog as it is now (`live`: its published, non-generated columns in attnum order) and
    with the relation's previous version in this run (`previous`: name -> attnum) and the table's
    dropped columns (`dropped`: their attnums), and accepted only when that is conclusive. Raises
    ColumnIdentityError (saying what is unclear) otherwise:

    - Without dropped columns, the message's columns are the first live ones, in order: attnums are
      never reused, so the table had columns 1..n then, and later ones were added after it. Renames
      made after the change are followed (a restart after a rename reads older changes this way).
      Not where the publication's column list changed since (`exact_prefix` False).
    - Else by name, where every name still exists; where the others are fixed by their place
      between the columns matched by name (see _fit_gaps), they are those; or by position, where
      the types line up. Each must list columns in attnum order and agree with the previous
      version: a name it knew keeps its attnum, none of its columns that still lives vanishes, and
      a column new by name is new in the catalog under that very name.
    """
    def unclear(what: str) -> ColumnIdentityError:
        return ColumnIdentityError(what)

    if not dropped and len(live) >= len(names) and exact_prefix:
        return [c.attnum for c in live[:len(names)]]
    by_name = {c.name: c.attnum for c in live}
    live_attnums = {c.attnum: c.name for c in live}
    for name in names:  # a column known before and dropped since is that column: attnums are never reused
        dropped_since = previous is not None and name in previous and previous[name] not in live_attnums
        if dropped_since and name in by_name:
            raise unclear(f"column {name} was dropped and added again: the change may hold either")
        if dropped_since:
            by_name[name] = previous[name]
    fitted = _fit_gaps(names, by_name, live_attnums, dropped)
    if all(n in by_name for n in names):
        attnums = [by_name[n] for n in names]
        how = "by name"
    elif fitted is not None:
        attnums, how = fitted, "by name and place"
    elif len(live) == len(names) and all(c.type_oid == t for c, t in zip(live, type_oids)):
        attnums = [c.attnum for c in live]
        how = "by position"
    else:
        missing = [n for n in names if n not in by_name]
        raise unclear(f"column(s) {', '.join(missing)} of the change no longer exist under that name, and the "
                      f"table's columns do not line up with the change's ({len(names)} then, {len(live)} now)")
    if any(a >= b for a, b in zip(attnums, attnums[1:])):  # a Relation message lists columns in attnum order
        raise unclear(f"the change's columns ({', '.join(names)}) match the catalog's {how} out of their order: "
                      "columns were renamed since")
    if previous is not None:
        known = set(previous.values())
        for name, attnum in zip(names, attnums):
            before = previous.get(name)
            if before is not None and before != attnum and before in live_attnums:
                raise unclear(f"column {name} was column #{before} before and matches column #{attnum} {how} now")
            if attnum not in known and attnum in live_attnums and live_attnums[attnum] != name:
                raise unclear(f"column {name} is new since the previous change, but the catalog's column matched "
                              f"{how} (#{attnum}) is named {live_attnums[attnum]}: the table changed again since")
        vanished = [n for n, a in previous.items() if a not in attnums and a in live_attnums]
        if vanished:
            raise unclear(f"column(s) {', '.join(vanished)} still exist but are not matched to the change's columns")
    elif how == "by position" and dropped:
        renamed = [n for n, a in zip(names, attnums) if live_attnums.get(a) != n]
        raise unclear(f"column(s) {', '.join(renamed)} of the change no longer exist under that name and the table "
                      "has dropped columns: a rename cannot be told from a drop and an add")
    return attnums


def _fit_gaps(names: Sequence[str], by_name: Mapping[str, int], live: Mapping[int, str],
              dropped: Sequence[int]) -> list[int] | None:
    """Attnums for `names` where those missing from `by_name` (renamed or dropped since) are fixed by
    their place: a Relation message lists columns in attnum order, so each run of missing names lies
    between its matched neighbours' attnums, and it is determined when exactly as many columns (live
    but not matched by name, or dropped) lie there. A gap without missing names may hold dropped
    columns (dropped before the change) but no unmatched live one, except after the last matched
    column (added since). None where that does not fit."""
    matched = {by_name[n] for n in names if n in by_name}
    unplaced = sorted(a for a in [*live, *dropped] if a not in matched)
    attnums: list[int] = []
    gap: list[str] = []
    low = 0
    for name in [*names, None]:
        high = by_name.get(name) if name is not None else 1 << 16
        if name is not None and high is None:
            gap.append(name)
            continue
        between = [a for a in unplaced if low < a < high]
        if gap and len(between) != len(gap):
            return None
        if not gap and name is not None and any(a in live for a in between):
            return None  # a live column the change does not list, before one it does
        attnums += between if gap else []
        gap = []
        if name is not None:
            attnums.append(high)
            low = high
    return attnums
