"""Driver errors on source connections become cdc's errors with the right exit code."""

import psycopg
import psycopg.errors

from cdc.errors import SourceError, SourceLostError
from cdc.source.postgres.replication import source_failure


def test_a_broken_connection_or_a_shutdown_is_a_lost_source() -> None:
    broken = psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    for exc in (broken, psycopg.errors.AdminShutdown("terminating connection due to administrator command")):
        error = source_failure("snapshot of public.items", exc)
        assert type(error) is SourceLostError and error.exit_code == 3
        assert str(error).startswith("snapshot of public.items: the connection to the source was lost: ")


def test_a_refusal_is_a_source_problem_in_one_line_without_the_password() -> None:
    refused = psycopg.errors.InsufficientPrivilege("permission denied for table items\nDETAIL: x")
    error = source_failure("snapshot of public.items", refused)
    assert type(error) is SourceError and error.exit_code == 2
    assert str(error) == "snapshot of public.items: permission denied for table items DETAIL: x"
    dsn = "postgresql://cdc:s3cr#t@db/app"
    error = source_failure("while streaming", psycopg.OperationalError(f'connection to "{dsn}" failed'), dsn)
    assert "s3cr#t" not in str(error)
