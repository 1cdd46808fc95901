"""Which column each privacy rule meant when the connector last started, kept in Kafka.

A rule names a column; the connector binds it to the column's identity (attnum) at start and follows
renames while it runs. Across a restart the binding would be lost: after `RENAME ssn TO ssn_v2` and
`ADD COLUMN ssn`, a file still saying `exclude: [ssn]` would exclude the new column and publish the
old one in clear. So every start records, per table with a policy, its columns' attnums by name in
the compacted topic ``<pipeline>.columns``, and the next start refuses a rule whose name now names
another column while the one it named lives on under a new name.
Pure: the connector reads and writes the topic (cdc.connector.startup).
"""

from __future__ import annotations

from typing import Any

import orjson

from cdc.config import PipelineConfig, TableRef
from cdc.transform.rowfilter import RowFilter


def topic_of(pipeline: str) -> str:
    return f"{pipeline}.columns"


def rule_line(config: PipelineConfig, ref: TableRef, name: str) -> tuple[str, str] | None:
    """Where the pipeline file names column `name` of `ref` (FILE:LINE) and the rule, or None."""
    entry = config.privacy.tables.get(ref)
    if entry is None:
        return None
    rules = entry.rules()
    if name in rules.masks:
        return config.privacy_where(ref, "mask", name), f"mask {rules.masks[name].kind}"
    if name in (rules.include or ()):
        return config.privacy_where(ref, "include", rules.include.index(name)), "include"
    if name in rules.exclude:
        return config.privacy_where(ref, "exclude", rules.exclude.index(name)), "exclude"
    if rules.rows is not None and name in RowFilter.parse(rules.rows).columns:
        return config.privacy_where(ref, "rows"), "row filter"
    return None


def record(oid: int, columns: dict[str, int]) -> bytes:
    return orjson.dumps({"oid": oid, "columns": columns})


def decode(records: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """The topic's last record per table (key: the table as the pipeline names it); {} before the first start."""
    return {key.decode(): orjson.loads(value) for key, value in records.items()}


def problems(config: PipelineConfig, ref: TableRef, oid: int, now: dict[int, str],
             last: dict[str, Any] | None) -> list[str]:
    """Rules of `ref` whose name named another column at the last start, a column that lives on under
    a new name (`now`: the table's columns by attnum). A dropped column is no problem: nothing of it
    can be published in clear under another name."""
    if last is None or last.get("oid") != oid:
        return []
    by_name = {name: attnum for attnum, name in now.items()}
    out = []
    for name, was in last["columns"].items():
        line = rule_line(config, ref, name)
        is_now = by_name.get(name)
        if line is None or is_now is None or is_now == was or was not in now:
            continue
        if rule_line(config, ref, now[was]) is not None:
            continue  # the file names that column under its new name as well
        where, rule = line
        out.append(
            f"{where}: column {name} of {ref} was renamed to {now[was]} since cdc last ran, and {name} now names "
            f"another column (added or renamed since). The rule ({rule}) meant {now[was]}: write {now[was]} here "
            f"(and keep {name} too if the other column needs the same rule), then start again. Nothing was published"
        )
    return out
