"""Which faults cdc waits out, and how the waits grow (cdc.retry)."""

from __future__ import annotations

import asyncio
import sqlite3

import psycopg
import pytest
from aiokafka import errors as kafka_errors

from cdc.config.common import RetryConfig
from cdc.errors import (
    AlreadyRunningError, PublishError, SourceError, SourceLostError, TargetError, TargetLoginError, WouldLoseDataError,
    is_transient,
)
from cdc.retry import Outage, backoff_delay, run_healing, wait_out_start


def raised_from(outer: Exception, inner: BaseException) -> Exception:
    """`outer` raised while handling `inner` with `from None`, as cdc does to print one line."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer from None
    except Exception as exc:
        return exc


@pytest.mark.parametrize("sqlstate", [None, "08006", "57P01", "57P03", "53300", "40001", "40P01"])
def test_connection_loss_shutdown_overload_and_serialization_are_transient(sqlstate, monkeypatch):
    cls = psycopg.errors.lookup(sqlstate) if sqlstate else psycopg.OperationalError
    monkeypatch.setattr(cls, "sqlstate", sqlstate, raising=False)
    assert is_transient(cls("boom"))


@pytest.mark.parametrize("sqlstate", ["42P01", "42501", "23505", "22P02"])
def test_errors_about_the_data_or_the_schema_are_fatal(sqlstate, monkeypatch):
    cls = psycopg.errors.lookup(sqlstate)
    monkeypatch.setattr(cls, "sqlstate", sqlstate, raising=False)
    assert not is_transient(cls("boom"))


def test_kafka_connection_and_retriable_errors_are_transient_others_fatal():
    assert is_transient(kafka_errors.KafkaConnectionError())
    assert is_transient(kafka_errors.RequestTimedOutError())
    assert is_transient(kafka_errors.NotLeaderForPartitionError())
    assert not is_transient(kafka_errors.TopicAuthorizationFailedError())
    # No broker answered a metadata request with the cluster's brokers: aiokafka says so only in words.
    assert is_transient(kafka_errors.KafkaError("Unable to get cluster metadata over all known brokers"))
    assert not is_transient(kafka_errors.KafkaError("Unexpected error during batch delivery"))


def test_socket_errors_and_a_locked_sqlite_file_are_transient():
    assert is_transient(ConnectionRefusedError())
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: items"))


def test_our_errors_are_judged_by_what_they_were_raised_from():
    assert is_transient(SourceLostError("lost"))
    assert is_transient(raised_from(PublishError("Kafka at x is not reachable"), kafka_errors.KafkaConnectionError()))
    assert is_transient(raised_from(TargetError("target gone"), psycopg.OperationalError("server closed")))
    assert not is_transient(PublishError("an event is too large"))


def test_errors_a_restart_cannot_fix_are_fatal_whatever_caused_them():
    for error in (SourceError("wal_level"), WouldLoseDataError("slot lost"), AlreadyRunningError("held"),
                  TargetLoginError("password")):
        assert not is_transient(raised_from(error, psycopg.OperationalError("connection refused")))


def test_backoff_grows_to_its_ceiling_with_jitter():
    policy = RetryConfig(initial_delay_s=1, max_delay_s=8)
    for attempt in range(12):
        delays = [backoff_delay(policy, attempt) for _ in range(200)]
        assert min(delays) >= 0.1 and max(delays) <= min(8, 2 ** attempt)
    assert len({round(backoff_delay(policy, 5), 6) for _ in range(20)}) > 1  # jittered


def test_an_outage_gives_up_past_its_ceiling_and_rethrows_the_error():
    async def scenario() -> tuple[int, str]:
        outage = Outage("the source", RetryConfig(initial_delay_s=0.01, max_delay_s=0.02, give_up_after_s=0.2),
                        asyncio.Event())
        error = SourceLostError("the connection to the source was lost")
        waits = 0
        with pytest.raises(SourceLostError):
            while True:
                await outage.wait(error)
                waits += 1
                assert outage.down and outage.state == "retrying"
        outage.recovered()
        return waits, outage.state

    waits, state = asyncio.run(scenario())
    assert waits >= 2 and state == "ok"


def test_a_fatal_error_is_rethrown_at_once():
    async def scenario() -> None:
        outage = Outage("the source", RetryConfig(), asyncio.Event())
        await outage.wait(SourceError("wal_level is 'replica'"))

    with pytest.raises(SourceError):
        asyncio.run(scenario())


def test_run_healing_starts_over_after_a_transient_fault_and_reports_start_up_faults_at_once():
    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        outage = Outage("the target", RetryConfig(initial_delay_s=0.01, max_delay_s=0.01), stop)
        calls, restarts = [], []

        async def attempt() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise TargetError("lost") from ConnectionResetError()

        await run_healing(attempt, lambda exc: outage, started=lambda: True, stop=stop,
                          start_over=lambda: restarts.append(1))
        with pytest.raises(SourceLostError):  # not started yet: reported at once, never retried
            await run_healing(_raise(SourceLostError("down")), lambda exc: outage, started=lambda: False, stop=stop,
                              start_over=lambda: restarts.append(1))
        return len(calls), len(restarts)

    assert asyncio.run(scenario()) == (2, 1)


def test_a_stop_during_an_outage_is_a_clean_stop():
    async def scenario() -> None:
        stop = asyncio.Event()
        outage = Outage("the source", RetryConfig(initial_delay_s=30, max_delay_s=30), stop)
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await asyncio.wait_for(run_healing(_raise(SourceLostError("down")), lambda exc: outage, started=lambda: True,
                                           stop=stop, start_over=lambda: None), 5)

    asyncio.run(scenario())


def _raise(error: Exception):
    async def attempt() -> None:
        raise error
    return attempt


def test_a_connection_the_server_refused_for_good_is_fatal():
    """libpq gives a refused connection no SQLSTATE: a missing database or a refused login is judged
    by its text, a server that is down or starting up stays transient."""
    assert not is_transient(raised_from(TargetError("cannot use target"),
                                        psycopg.OperationalError('FATAL:  database "nope" does not exist')))
    assert not is_transient(psycopg.OperationalError('FATAL:  password authentication failed for user "cdc"'))
    assert is_transient(psycopg.OperationalError("FATAL:  the database system is starting up"))
    assert is_transient(psycopg.OperationalError("connection failed: Connection refused"))


def test_start_up_checks_wait_out_transient_faults_and_stop_at_bad_input():
    async def scenario() -> tuple[str, int]:
        stop = asyncio.Event()
        outage = Outage("the source", RetryConfig(initial_delay_s=0.01, max_delay_s=0.01), stop)
        calls = []

        async def check() -> str:
            calls.append(1)
            if len(calls) < 3:  # refused twice, as a server coming back refuses connections
                raise raised_from(SourceLostError("cannot connect"), psycopg.OperationalError("Connection refused"))
            return "checked"

        result = await wait_out_start(check, lambda exc: outage, stop=stop)
        with pytest.raises(SourceError):  # bad input: at once
            await wait_out_start(_raise(SourceError("table public.nope does not exist")), lambda exc: outage, stop=stop)
        return result, len(calls)

    assert asyncio.run(scenario()) == ("checked", 3)


def test_start_up_checks_give_up_at_the_ceiling():
    async def scenario() -> None:
        stop = asyncio.Event()
        outage = Outage("Kafka", RetryConfig(initial_delay_s=0.01, max_delay_s=0.01, give_up_after_s=0.1), stop)
        await wait_out_start(_raise(raised_from(PublishError("not reachable"), kafka_errors.KafkaConnectionError())),
                             lambda exc: outage, stop=stop)

    with pytest.raises(PublishError):
        asyncio.run(asyncio.wait_for(scenario(), 10))
