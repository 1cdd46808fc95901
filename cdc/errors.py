"""Errors a user can act on. Each names the place: file:line, table and column, or LSN."""

import re


class CdcError(Exception):
    """Base for errors that stop cdc with a message meant for the user (no traceback)."""

    exit_code = 1


class ConfigError(CdcError):
    """The pipeline YAML is wrong. Carries every problem found, each as 'file:line: message'."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SourceError(CdcError):
    """The source PostgreSQL cannot serve the pipeline as configured (wal_level, tables, identity...)."""

    exit_code = 2


class PublishError(CdcError):
    """Kafka did not take an event. Nothing past it was confirmed to PostgreSQL: a restart resends it."""


class KafkaLoginError(PublishError):
    """Kafka refused cdc for good: SASL credentials or mechanism, or a broker certificate that does
    not verify. A restart cannot fix it (exit 2): the pipeline's kafka.security must change."""

    exit_code = 2


class EventRefusedError(PublishError):
    """One event can never be published as it is (too large for a Kafka request)."""


class DecodeError(CdcError):
    """A pgoutput message could not be decoded. Names the LSN of the message."""


class SinkError(CdcError):
    """A sink cannot apply an event (schema mismatch, bad event). Names the table and column."""


class SourceLostError(CdcError):
    """The connection to the source PostgreSQL ended (a restart, a network failure). Nothing is lost:
    the slot keeps every change not yet confirmed, so restarting cdc resumes where it was."""

    exit_code = 3


class WouldLoseDataError(CdcError):
    """cdc cannot go on without losing or skipping changes (a dropped or invalidated slot, a source
    whose history changed, topics that lost their events). It stops, and the message names the
    deliberate way forward (a flag that accepts the loss, a re-snapshot)."""

    exit_code = 4


class AlreadyRunningError(CdcError):
    """Another process runs the same connector (it holds the slot) or applies the same sink to the
    same target (it holds the sink's lock, or moved its positions). This one changed nothing."""

    exit_code = 5


class TargetError(SinkError):
    """A sink's target database cannot be reached or used (connection, missing database, lost
    connection). Names the sink and the target without its password."""


class TargetLoginError(TargetError):
    """The target refused the login (wrong password, unknown role, pg_hba.conf) or TLS failed (a
    certificate that does not verify): like the same problem on the source, a restart cannot fix
    it (exit 2)."""

    exit_code = 2


# How libpq words a connection refused for good: the server answered but refused the login, or TLS
# refused the server (its certificate does not verify or name the host) or the server refused a
# connection without TLS. libpq gives connection failures no SQLSTATE, so the text is all there is.
# These are the user's to fix (exit 2); a server that did not answer may come back (exit 3).
_REFUSED_FOR_GOOD = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r"role \S+ does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects connection|"
    r"permission denied for database|is not permitted to log in|"
    r"certificate verify failed|does not match host name|server does not support SSL|"
    r"root certificate file|certificate present, but not private key|private key file|"
    r"SSL is not enabled on the server|sslmode value",
)


def refused_for_good(message: str) -> bool:
    """Whether a connection failure's message says the login or the TLS handshake was refused (not:
    that the server could not be reached, or that the database does not exist)."""
    return _REFUSED_FOR_GOOD.search(message) is not None


class SourceHistoryError(WouldLoseDataError, SinkError):
    """An event comes from another source history (another cluster, or a timeline that forked
    before what the sink already applied). Nothing was applied; `--accept-source-history` continues."""


class SinkConflictError(AlreadyRunningError, SinkError):
    """Another process applies the same sink to the same target (lock held, or the stored positions
    changed under this one). Nothing was applied by this process."""


class KafkaDataMissingError(WouldLoseDataError, SinkError):
    """Kafka no longer holds events the sink has not applied yet, or holds other events at the
    offsets the sink stored (a broker that lost its data, a re-created topic, retention)."""


class RowRejectedError(SinkError):
    """The target refused a change for a reason in the data itself (a constraint violation, a value
    out of range or of an incompatible type: SQLSTATE classes 22 and 23, SQLite's constraint and
    type errors, a value the sink cannot convert), not for one about the connection or the server.
    A sink with `on_error: dlq` dead-letters the change; other sinks stop (exit 1)."""
