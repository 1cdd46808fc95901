"""One checker for every fault scenario.

The scenarios share one source table and a history of every change made to it:

    items(id int PRIMARY KEY, v bigint, pad text)      -- v: a version from one source sequence
    items_history(hid bigserial, id int, v bigint, op)  -- written by a trigger, in the change's transaction

`items_history` is not part of the pipeline; it commits exactly when the change it records does, so
it is the list of what cdc must have published. The checks, as a user would make them:

1. every target equals the source (`items`, every column: the scenarios' pipelines have no privacy
   rules, so the policy keeps every column);
2. no gaps in Kafka: every change in the history is in the table's topic, and a position first
   appears only after every position before it (the topic never skips a change and fills it in later);
3. duplicates only as identical replays: an event at a position already seen must equal the first
   one there (counted: these are what the sinks absorbed);
4. per key, the target never goes back to an older version: `VersionWatch` samples the targets
   during the scenario, and the final rows are checked against the highest version each key showed.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.integration.harness import topic_events

SCHEMA = """
CREATE SEQUENCE item_versions;
CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL DEFAULT nextval('item_versions'), pad text);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE items_history (hid bigserial PRIMARY KEY, id int NOT NULL, v bigint NOT NULL, op char(1) NOT NULL);
CREATE FUNCTION items_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO items_history (id, v, op) VALUES (OLD.id, OLD.v, 'd');
  ELSE
    INSERT INTO items_history (id, v, op) VALUES (NEW.id, NEW.v, lower(left(TG_OP, 1)));
  END IF;
  RETURN NULL;
END $$;
"""
# Created once the slot exists (rows made before it reach the sinks through the snapshot instead).
HISTORY_TRIGGER = ("CREATE TRIGGER items_history AFTER INSERT OR UPDATE OR DELETE ON items "
                   "FOR EACH ROW EXECUTE FUNCTION items_history()")


def create_schema(source_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)


def record_history(source_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(HISTORY_TRIGGER)


Target = tuple[str, str]  # ("postgres", url) or ("sqlite", path)


def target_rows(target: Target) -> list[tuple] | None:
    """The target's items by id, or None while it has no table yet or cannot be reached."""
    kind, where = target
    try:
        if kind == "sqlite":
            if not Path(where).exists():
                return None
            conn = sqlite3.connect(where, timeout=5)
            try:
                return [tuple(r) for r in conn.execute("SELECT id, v, pad FROM items ORDER BY id")]
            finally:
                conn.close()
        with psycopg.connect(where, connect_timeout=3) as conn:
            return conn.execute("SELECT id, v, pad FROM items ORDER BY id").fetchall()
    except (sqlite3.Error, psycopg.Error):
        return None


def source_rows(source_dsn: str) -> list[tuple]:
    with psycopg.connect(source_dsn) as conn:
        return conn.execute("SELECT id, v, pad FROM items ORDER BY id").fetchall()


def targets_equal_source(source_dsn: str, targets: list[Target]) -> bool | str:
    """For wait_until: True, or what still differs."""
    source = source_rows(source_dsn)
    for target in targets:
        rows = target_rows(target)
        if rows != source:
            return f"{target[0]} target: {'no table yet' if rows is None else f'{len(rows)} rows'}, source {len(source)}"
    return True


class VersionWatch:
    """Samples the targets while a scenario runs: per key, a version lower than one seen before is a
    violation (a target that went back in time, even for a moment)."""

    def __init__(self, targets: list[Target], interval_s: float = 0.5):
        self.targets = targets
        self.interval_s = interval_s
        self.highest: dict[tuple[int, int], int] = {}  # (target index, id) -> highest v seen
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for index, target in enumerate(self.targets):
            for row_id, v, _ in target_rows(target) or []:
                seen = self.highest.get((index, row_id), -1)
                if v < seen:
                    self.violations.append(f"{target[0]} target: id {row_id} went back from v {seen} to {v}")
                self.highest[(index, row_id)] = max(seen, v)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "VersionWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sample()  # the final rows too


def _position(event: dict) -> tuple[str, str, int]:
    source = event["source"]
    return (_lsn(source["commit_lsn"]), _lsn(source["lsn"]), int(source["seq"]))


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def _content(event: dict) -> dict:
    return {k: v for k, v in event.items() if k != "ts_ms"}  # ts_ms: when cdc built it, not part of the change


@dataclass
class Report:
    events: int = 0
    duplicates: int = 0  # identical replays of events already in the topic
    violations: list[str] = field(default_factory=list)


def check_topic(source_dsn: str, bootstrap: str, topic: str) -> Report:
    """Checks 2 and 3 on the table's topic, against the source's history of changes."""
    events = topic_events(bootstrap, topic)
    with psycopg.connect(source_dsn) as conn:
        history = conn.execute("SELECT id, v, op FROM items_history ORDER BY hid").fetchall()
    return judge_topic(topic, events, history)


def judge_topic(topic: str, events: list[dict], history: list[tuple[int, int, str]]) -> Report:
    """`events` in offset order; `history` as (id, v, op) rows, op one of i, u, d."""
    report = Report(events=len(events))
    first: dict[tuple, dict] = {}
    highest: tuple | None = None
    for offset, event in enumerate(events):
        position = _position(event)
        if position in first:
            if _content(first[position]) != _content(event):
                report.violations.append(f"{topic}@{offset}: a replay at position {position} differs from the first event there")
            report.duplicates += 1
            continue
        if highest is not None and position < highest:
            report.violations.append(f"{topic}@{offset}: position {position} first appears after {highest} (a gap filled late)")
        first[position] = event
        highest = position if highest is None else max(highest, position)
    published = _changes((_change_of(event) for event in first.values() if event["op"] in "cud"))
    wanted = _changes((row_id, 0 if op == "d" else v, op) for row_id, v, op in history)
    missing = [change for change, count in wanted.items() if published.get(change, 0) < count]
    if missing:
        report.violations.append(f"{topic}: {len(missing)} committed changes never published, e.g. {missing[:5]}")
    return report


def _change_of(event: dict) -> tuple[int, int, str]:
    """(id, v, op) as the history writes it; a delete by its key alone."""
    if event["op"] == "d":
        return (event["before"]["id"], 0, "d")
    return (event["after"]["id"], int(event["after"]["v"]), "i" if event["op"] == "c" else "u")


def _changes(changes) -> dict[tuple[int, int, str], int]:
    counts: dict[tuple[int, int, str], int] = {}
    for change in changes:
        counts[change] = counts.get(change, 0) + 1
    return counts


def check_all(source_dsn: str, bootstrap: str, topic: str, targets: list[Target], watch: VersionWatch) -> Report:
    """Every check once the scenario is over and the targets caught up: the report's violations
    must be empty; its duplicates are what the sinks absorbed."""
    report = check_topic(source_dsn, bootstrap, topic)
    equal = targets_equal_source(source_dsn, targets)
    if equal is not True:
        report.violations.append(f"targets differ from the source: {equal}")
    report.violations.extend(watch.violations)
    return report
