"""Connection strings as a user writes them: a bad one is a FILE:LINE error that never prints the
password, a correct one with awkward characters connects, and no connection attempt hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import quote, urlsplit

import psycopg
import pytest

from cdc.config import load_pipeline
from cdc.sink.backends import open_target

CANARY = ("zebra42", "quokka")  # both halves of every password below; neither may ever be printed


def pipeline(source: str, sink_url: str = "sqlite:///replica.db", *, source_extra: str = "", kafka: str = "127.0.0.1:9",
             kafka_extra: str = "", sink_extra: str = "") -> str:
    return (
        "pipeline: shop\n"
        "source:\n"
        f"  postgres: '{source}'\n"
        "  tables: [public.customers]\n"
        f"{source_extra}"
        "kafka:\n"
        f"  bootstrap_servers: {kafka}\n"
        "  idempotence: false\n"
        f"{kafka_extra}"
        "sinks:\n"
        "  replica:\n"
        f"    url: '{sink_url}'\n"
        f"{sink_extra}"
    )


def cdc(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_no_password(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    for piece in CANARY:
        assert piece not in output, output
    assert "Traceback" not in output, output


GOOD_SOURCE = "postgresql://cdc@127.0.0.1:5432/shop"

# (label, source DSN, sink URL, line of the problem). Source problems are at line 3, sink ones at 10.
BAD = [
    ("space in a URL password", "postgresql://cdc:zebra42 quokka@127.0.0.1:5432/shop", None, 3),
    ("unencoded # in a URL password", "postgresql://cdc:zebra42#quokka@127.0.0.1:5432/shop", None, 3),
    ("bad percent-encoding", "postgresql://cdc:zebra42%zzquokka@127.0.0.1:5432/shop", None, 3),
    ("unknown query parameter", "postgresql://cdc:zebra42quokka@127.0.0.1:5432/shop?sslmod=require", None, 3),
    ("unencoded / in a URL password", "postgresql://cdc:zebra42/quokka@127.0.0.1:5432/shop", None, 3),
    ("unquoted space in key=value", "host=127.0.0.1 user=cdc password=zebra42 quokka dbname=shop", None, 3),
    ("malformed ${ in a password", "postgresql://cdc:zebra42${quokka@127.0.0.1:5432/shop", None, 3),
    ("unsupported sink scheme", GOOD_SOURCE, "mysql://app:zebra42quokka@127.0.0.1/shop", 10),
    ("mistyped sink scheme", GOOD_SOURCE, "postgresq://app:zebra42quokka@127.0.0.1/shop", 10),
    ("key=value sink DSN", GOOD_SOURCE, "host=127.0.0.1 user=app password=zebra42quokka dbname=shop", 10),
    ("malformed ${ in a sink password", GOOD_SOURCE, "postgresql://app:zebra42${quokka@127.0.0.1/shop", 10),
    ("space in a sink password", GOOD_SOURCE, "postgresql://app:zebra42 quokka@127.0.0.1/shop", 10),
]


@pytest.mark.parametrize("label, source, sink_url, line", BAD, ids=[b[0] for b in BAD])
def test_a_bad_connection_string_is_reported_at_its_line_without_the_password(tmp_path, label, source, sink_url, line):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(source, sink_url or "sqlite:///replica.db"))
    command = "connector" if sink_url is None else "sink"
    for args in (["validate", str(path)], [command, str(path)]):
        result = cdc(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        problems = result.stderr.strip().splitlines()
        assert len(problems) == 1 and problems[0].startswith(f"{path}:{line}: "), (args, result.stderr)
        assert_no_password(result)


@pytest.fixture
def role_with_awkward_password(source_cluster, source_db):
    """A login role on the source cluster that must give its password (the cluster trusts everyone
    else), a password with every character that URLs and libpq DSNs treat specially.
    Yields (role, password, database URL without credentials)."""
    role, password = f"cdc_pw_{uuid.uuid4().hex[:8]}", "p#ss@w:rd /x%"
    hba = source_cluster.datadir / "pg_hba.conf"
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")  # the sink's positions table
        conn.execute("SELECT pg_reload_conf()")
    yield role, password, urlsplit(source_db)
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


@pytest.mark.integration
def test_a_password_with_special_characters_written_correctly_connects(tmp_path, role_with_awkward_password):
    role, password, db = role_with_awkward_password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):  # it is checked
        psycopg.connect(f"postgresql://{role}:wrong@{db.hostname}:{db.port}{db.path}")
    url = f"postgresql://{role}:{quote(password, safe='')}@{db.hostname}:{db.port}{db.path}"
    key_value = f"host={db.hostname} port={db.port} dbname={db.path[1:]} user={role} password=''${{PW}}''"
    written = {  # label: (source.postgres, sinks.replica.url)
        "percent-encoded URL": (url, url),
        "quoted key=value and ${VAR}": (key_value, url.replace(quote(password, safe=""), "${PW_URL}")),
    }
    env = {"PW": password, "PW_URL": quote(password, safe="")}
    for label, (source, sink_url) in written.items():
        path = tmp_path / "p.yaml"
        path.write_text(pipeline(source, sink_url))
        result = cdc("validate", str(path), env=env)
        assert result.returncode == 0, (label, result.stderr)
        config = load_pipeline(path, env=env)
        with psycopg.connect(config.source.conninfo) as conn:  # what the connector connects with
            assert conn.execute("SELECT current_user").fetchone() == (role,), label
        target = open_target(config.sinks["replica"].connect_url)  # what the sink connects with
        target.close()


class SilentServer:
    """A TCP server on loopback that accepts connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(client)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for client in self.clients:
            client.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def one_error_line(result_text: str) -> str:
    lines = [ln for ln in result_text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result_text
    return lines[0]


@pytest.mark.integration
def test_a_source_that_never_answers_is_an_error_within_the_timeout(tmp_path, silent):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(f"postgresql://cdc:zebra42quokka@127.0.0.1:{silent.port}/shop",
                             source_extra="  connect_timeout_s: 2\n  retry: {give_up_after_s: 0}\n"))
    started = time.monotonic()
    result = cdc("connector", str(path), timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stderr
    assert elapsed < 15, elapsed  # 2 s for the attempt, the rest is interpreter start-up
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: {path}:3: cannot connect to the source") and f"127.0.0.1:{silent.port}" in line, line
    assert "timeout" in line, line
    assert_no_password(result)


@pytest.mark.integration
def test_sigterm_while_connecting_to_a_silent_source_stops_the_connector(tmp_path, silent):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(f"postgresql://cdc:zebra42quokka@127.0.0.1:{silent.port}/shop",
                             source_extra="  connect_timeout_s: 4\n"))
    proc = subprocess.Popen([sys.executable, "-m", "cdc.cli", "connector", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert silent.accepted.wait(30), "the connector never connected"
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=20)
        assert time.monotonic() - signalled < 8  # at most the connect timeout, not forever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_password(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


@pytest.mark.integration
def test_a_postgres_target_that_never_answers_is_an_error_within_the_timeout(tmp_path, silent):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(GOOD_SOURCE, f"postgresql://app:zebra42quokka@127.0.0.1:{silent.port}/replica",
                             sink_extra="    connect_timeout_s: 2\n    retry: {give_up_after_s: 0}\n"))
    started = time.monotonic()
    result = cdc("sink", str(path), timeout=30)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 15
    line = one_error_line(result.stderr)
    assert "cannot use target" in line and f"127.0.0.1:{silent.port}" in line, line
    assert_no_password(result)


@pytest.mark.integration
def test_a_kafka_broker_that_never_answers_is_an_error_within_the_timeout(tmp_path, silent):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(GOOD_SOURCE, kafka=f"127.0.0.1:{silent.port}", kafka_extra="  request_timeout_ms: 2000\n  retry: {give_up_after_s: 0}\n"))
    started = time.monotonic()
    result = cdc("sink", str(path), timeout=60)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    assert str(silent.port) in result.stderr, result.stderr  # the broker is named
    assert "kafka.request_timeout_ms" in result.stderr, result.stderr  # and the setting that bounds the wait


def test_a_sqlite_file_in_a_missing_directory_is_an_error_and_nothing_is_created(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(pipeline(GOOD_SOURCE, "sqlite:///no/such/dir/replica.db"))
    for command in ("validate", "sink"):
        result = cdc(command, str(path))
        assert result.returncode == 2, result.stderr
        line = one_error_line(result.stderr)
        assert line.startswith(f"{path}:10: sinks.replica.url: directory ") and "does not exist" in line, line
    assert not (tmp_path / "no").exists()
