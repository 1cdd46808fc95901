"""Rules that span fields or sections: duplicate tables, topic and target-name collisions.

They run on whatever validated (None where a section did not), so the loader reports them together
with field errors elsewhere in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdc.config.kafka import KafkaConfig
from cdc.config.names import TableRef, topic_for
from cdc.config.sinks import SinkConfig
from cdc.sqlnames import ascii_lower

DataPath = tuple[Any, ...]

# A problem found by a cross-section rule: (abstract location, "dotted.path: message").
# Locations use TableRef keys for sink renames; the loader maps them to YAML keys.
Problem = tuple[DataPath, str]


def duplicate_tables(tables: list[TableRef | None]) -> list[Problem]:
    seen: dict[TableRef, int] = {}
    problems: list[Problem] = []
    for i, table in enumerate(tables):
        if table is None:
            continue
        if table in seen:
            problems.append(
                (
                    ("source", "tables", i),
                    f"source.tables[{i}]: duplicate table {table} (same as source.tables[{seen[table]}])",
                )
            )
        else:
            seen[table] = i
    return problems


def cross_check(
    pipeline: str | None,
    tables: list[TableRef | None],
    kafka: KafkaConfig | None,
    sinks: Mapping[str, SinkConfig],
    privacy_tables: list[TableRef] | None = None,
) -> list[Problem]:
    """Rules that need more than one section, on whatever validated (None: did not validate).

    ``tables`` is source.tables by index, None where an entry is invalid (already reported). With an
    invalid entry, "not in source.tables" is not reported: the user may have meant that entry.
    """
    problems = duplicate_tables(tables)
    first_index: dict[TableRef, int] = {}
    for i, t in enumerate(tables):
        if t is not None:
            first_index.setdefault(t, i)
    source_tables = list(first_index)  # unique, in file order

    if pipeline is not None and kafka is not None:
        # Kafka refuses topics that differ only in '.' vs '_' (they share metric names): compare a
        # folded form too.
        by_topic: dict[str, TableRef] = {}
        by_folded: dict[str, tuple[str, TableRef]] = {}
        # The pipeline's own topics: snapshot progress, transaction boundaries, rule bindings, schema
        # changes, the schemas events name by id, verification results.
        own = {t.replace(".", "_"): t for t in (f"{pipeline}.snapshots", f"{pipeline}.transactions",
                                                f"{pipeline}.columns", f"{pipeline}.schema_changes",
                                                f"{pipeline}.schemas", f"{pipeline}.verify")}
        for table in source_tables:
            topic = topic_for(kafka.topic, pipeline, table)
            where = ("source", "tables", first_index[table])
            folded = topic.replace(".", "_")
            if topic in (".", ".."):
                message = f"kafka.topic: topic name {topic!r} for {table} is not allowed by Kafka"
                problems.append((("kafka", "topic"), message))
            elif folded in own:
                problems.append((where, f"kafka.topic: topic {topic!r} for {table} collides with the pipeline's own topic {own[folded]!r}"))
            elif topic in by_topic:
                problems.append((where, f"kafka.topic: tables {by_topic[topic]} and {table} both map to topic {topic!r}"))
            elif folded in by_folded:
                other_topic, other = by_folded[folded]
                problems.append(
                    (
                        where,
                        f"kafka.topic: topic {topic!r} for {table} collides with {other_topic!r} for {other} "
                        "(Kafka treats '.' and '_' in topic names as the same)",
                    )
                )
            by_topic.setdefault(topic, table)
            by_folded.setdefault(folded, (topic, table))

    complete = None not in tables
    if complete:
        for table in privacy_tables or ():
            if table not in first_index:
                problems.append(
                    (("privacy", "tables", table), f"privacy.tables: unknown table {table}: not in source.tables")
                )
    for name, sink in sinks.items():
        if complete:
            for i, table in enumerate(sink.only or ()):
                if table not in first_index:
                    problems.append((("sinks", name, "only", i), f"sinks.{name}.only: unknown table {table}: not in source.tables"))
            for table in sink.tables:
                if table not in first_index:
                    message = f"sinks.{name}.tables: unknown table {table}: not in source.tables"
                    problems.append((("sinks", name, "tables", table), message))
                elif not sink.subscribes(table):
                    message = f"sinks.{name}.tables: table {table} is not in sinks.{name}.only"
                    problems.append((("sinks", name, "tables", table), message))
        # SQLite table names are case-insensitive even when quoted; PostgreSQL's quoted ones are not.
        fold = ascii_lower if sink.dialect == "sqlite" else (lambda t: t)
        targets: dict[str, TableRef] = {}
        for table in source_tables:
            if not sink.subscribes(table):
                continue
            target = sink.target_table(table)
            first = targets.setdefault(fold(target), table)
            if first != table:
                renamed = table if table in sink.tables else first if first in sink.tables else None
                where = ("sinks", name, "tables", renamed) if renamed else ("sinks", name)
                problems.append(
                    (
                        where,
                        f"sinks.{name}.tables: tables {first} and {table} both map to target table {target!r}; "
                        f"rename one of them under sinks.{name}.tables",
                    )
                )
    return problems
