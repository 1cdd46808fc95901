"""A failure is a clean, named stop: a start that fails a check leaves nothing behind, and the exit
code says what kind of failure it is (docs/cli.md: Exit codes)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg
import pytest

from cdc.dev.postgres import LocalPostgres, free_port
from tests.conftest import TARGET_DSN
from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc

pytestmark = pytest.mark.integration


def kafka_topics(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def names() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(names())


def first_error(stderr: str) -> str:
    """The first line of the error (log lines before it are not part of it)."""
    return next((ln for ln in stderr.splitlines() if ln.startswith("error:")), "")


def pipeline_with_two_sinks(tmp_path: Path, source_dsn: str, bootstrap: str, target_pg: str, tables: list[str]) -> tuple[str, Path]:
    name = f"c_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_dsn, tables=tables, bootstrap=bootstrap,
                          sinks={"replica": {"url": "sqlite:///replica.db"}, "copy": {"url": target_pg}})
    return name, path


def assert_nothing_created(tmp_path: Path, name: str, bootstrap: str, target_pg: str, source_dsn: str) -> None:
    assert not [t for t in kafka_topics(bootstrap) if t.startswith(f"{name}.") or t.startswith(f"{name}_")]
    assert list(tmp_path.glob("replica.db*")) == []  # neither the SQLite file nor its lock file
    with psycopg.connect(target_pg) as conn:
        assert conn.execute("SELECT to_regclass('cdc_sink_positions')").fetchone() == (None,)
    with psycopg.connect(source_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (f"cdc_{name}",)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (f"cdc_{name}",)).fetchone() == (0,)


def test_a_missing_table_leaves_no_topic_file_lock_or_positions_table(tmp_path, source_db, broker, target_pg):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
    name, path = pipeline_with_two_sinks(tmp_path, source_db, broker.bootstrap_servers, target_pg,
                                         ["public.items", "public.nope"])
    result = cdc("run", str(path))
    assert result.returncode == 2, result.stderr
    assert "public.nope does not exist" in first_error(result.stderr), result.stderr
    assert_nothing_created(tmp_path, name, broker.bootstrap_servers, target_pg, source_db)


@pytest.fixture
def replica_level_source(source_cluster):
    """A cluster of the same version running with wal_level=replica (no logical decoding)."""
    cluster = LocalPostgres(source_cluster.bindir)
    cluster.start()
    cluster.stop()
    options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} -c unix_socket_directories={cluster.root} "
               "-c wal_level=replica -c fsync=off")
    cluster._run(cluster.bindir / "pg_ctl", "-D", cluster.datadir, "-l", cluster.logfile, "-o", options, "-w", "start")
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
        yield cluster
    finally:
        cluster.destroy()


def test_wal_level_replica_leaves_no_topic_file_lock_or_positions_table(tmp_path, replica_level_source, broker, target_pg):
    source = replica_level_source.dsn()
    name, path = pipeline_with_two_sinks(tmp_path, source, broker.bootstrap_servers, target_pg, ["public.items"])
    result = cdc("run", str(path))
    assert result.returncode == 2, result.stderr
    assert "wal_level is 'replica'" in first_error(result.stderr), result.stderr
    assert_nothing_created(tmp_path, name, broker.bootstrap_servers, target_pg, source)


def items_pipeline(tmp_path: Path, source_db: str, broker, prefix: str) -> tuple[str, Path]:
    """A table `items` and a connector-only pipeline of it with a fresh name."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=broker.bootstrap_servers, sinks={})
    return name, path


# -- exit codes -------------------------------------------------------------------------------------


def test_a_source_that_is_not_reachable_at_start_is_transient(tmp_path):
    """Waited out for source.retry.give_up_after_s (a source coming back: tests/faults), then exit 3."""
    path = write_pipeline(tmp_path / "p.yaml", pipeline="down", source_dsn=f"postgresql://cdc@127.0.0.1:{free_port()}/shop",
                          tables=["public.items"], bootstrap="127.0.0.1:9", sinks={})
    path.write_text(path.read_text().replace("  snapshot: never\n", "  snapshot: never\n  retry: {give_up_after_s: 1}\n"))
    for command in ("connector", "run"):
        result = cdc(command, str(path))
        assert result.returncode == 3, (command, result.stderr)
        assert "cannot connect to the source" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_wrong_password_is_exit_2_for_the_source_and_for_a_target(tmp_path):
    """Both servers refuse the login the same way: a restart cannot fix it (the source here is the
    target server, the only one that checks passwords)."""
    server = TARGET_DSN.split("@", 1)[1].split("?", 1)[0].rsplit("/", 1)[0]
    wrong = f"postgresql://cdc_test:wrong_pw_42@{server}/postgres"
    source_path = write_pipeline(tmp_path / "source.yaml", pipeline="pw", source_dsn=wrong, tables=["public.items"],
                                 bootstrap="127.0.0.1:9", sinks={})
    target_path = write_pipeline(tmp_path / "target.yaml", pipeline="pw", source_dsn=TARGET_DSN, tables=["public.items"],
                                 bootstrap="127.0.0.1:9", sinks={"copy": {"url": wrong}})
    for command, path in (("connector", source_path), ("sink", target_path)):
        result = cdc(command, str(path))
        assert result.returncode == 2, (command, result.stderr)
        assert "password authentication failed" in result.stderr, result.stderr
        assert "wrong_pw_42" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_two_connectors_started_at_once_on_a_new_pipeline(tmp_path, source_db, broker):
    name, path = items_pipeline(tmp_path, source_db, broker, "twin")
    first, second = CdcProcess(path, "connector"), CdcProcess(path.with_name("q.yaml"), "connector")
    path.with_name("q.yaml").write_text(path.read_text())
    with first, second:
        loser = wait_until(lambda: next((p for p in (first, second) if p.proc.poll() is not None), None),
                           what="one of the two connectors to stop")
        winner = second if loser is first else first
        assert loser.proc.returncode == 5, loser.log()
        assert "already running" in loser.log() and "Traceback" not in loser.log(), loser.log()
        wait_for_slot(source_db, f"cdc_{name}", winner)


# -- the first line of an error is the real cause ----------------------------------------------------


def test_hints_name_the_database_and_give_one_create_publication(tmp_path, source_db, broker):
    role = f"nocreate_{uuid.uuid4().hex[:6]}"
    db = source_db.rsplit("/", 1)[1]
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY, n int)")
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
        conn.execute(f"GRANT SELECT ON a, b TO {role}")
        conn.execute(f"REVOKE CREATE ON DATABASE {db} FROM PUBLIC")
    name = f"h_{uuid.uuid4().hex[:6]}"
    try:
        path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db.replace("postgres@", f"{role}@"),
                              tables=["public.nope", "public.a", "public.b"], bootstrap=broker.bootstrap_servers, sinks={})
        result = cdc("connector", str(path))
        assert result.returncode == 2, result.stderr
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert "table public.nope does not exist" in lines[0], result.stderr  # the real cause comes first
        assert f"GRANT CREATE ON DATABASE {db} TO {role}" in result.stderr, result.stderr
        # One statement for both tables, not one per table; the missing table is not in it.
        assert result.stderr.count("CREATE PUBLICATION") == 2, result.stderr  # the GRANT line and the owner line
        assert f"CREATE PUBLICATION cdc_{name} FOR TABLE public.a, public.b" in result.stderr, result.stderr
        assert "public.nope" not in "\n".join(lines[1:]), result.stderr
    finally:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_misspelt_policy_column_is_the_only_problem_explain_reports(tmp_path, source_db):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, email text)")
        conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
    path = write_pipeline(tmp_path / "p.yaml", pipeline="typo", source_dsn=source_db, tables=["public.customers"],
                          bootstrap="127.0.0.1:9", sinks={})
    path.write_text(path.read_text() + "privacy:\n  tables:\n    public.customers:\n      exclude: [emial]\n")
    for command in ("explain", "connector"):
        result = cdc(command, str(path))
        assert result.returncode == 2, (command, result.stderr)
        first = next(ln for ln in result.stderr.splitlines() if ln.strip())
        assert "emial" in first and "did you mean 'email'" in first, (command, result.stderr)
        assert "does not exist in the source database" not in result.stderr, (command, result.stderr)


def test_a_second_connector_is_told_which_cdc_process_holds_the_slot(tmp_path, source_db, broker):
    name, path = items_pipeline(tmp_path, source_db, broker, "pid")
    with CdcProcess(path, "connector") as first:
        wait_for_slot(source_db, f"cdc_{name}", first)
        result = cdc("connector", str(path))
        assert result.returncode == 5, result.stderr
        assert f"is held by PID {first.proc.pid} on " in result.stderr and "the cdc process" in result.stderr, result.stderr

