"""Kafka topics as both the connector and the sink see them: creation, description, offsets.

One place for the admin side of Kafka, so the sink does not depend on the connector's publisher.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    InvalidConfigurationError,
    InvalidReplicationFactorError,
    KafkaError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    PolicyViolationError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    UnsupportedSaslMechanismError,
)

from cdc.config import KafkaConfig
from cdc.errors import KafkaLoginError, PublishError

log = logging.getLogger(__name__)


def timeout_message(config: KafkaConfig, doing: str, exc: BaseException) -> str:
    """A Kafka request that timed out, naming the setting that bounds it."""
    return (
        f"Kafka at {config.bootstrap_servers} did not answer {doing} within kafka.request_timeout_ms "
        f"({config.request_timeout_ms} ms): {type(exc).__name__}. A slow broker, or one creating or describing "
        "many topics, needs more: raise kafka.request_timeout_ms in the pipeline YAML"
    )


@asynccontextmanager
async def _named_timeouts(config: KafkaConfig, doing: str) -> AsyncIterator[None]:
    try:
        yield
    except (RequestTimedOutError, KafkaTimeoutError, asyncio.TimeoutError) as exc:
        raise PublishError(timeout_message(config, doing, exc)) from None


async def ensure_topics(config: KafkaConfig, topics: Iterable[str], *, compact: bool = False) -> dict[str, int]:
    """Create the topics that do not exist yet; return every topic's partition count.

    A table's events must stay in one partition (truncates are ordered against row changes), so a
    pre-existing topic with another partition count is refused rather than used.
    """
    async with _admin(config) as admin, _named_timeouts(config, "while creating or describing topics"):
        return await _ensure_topics(admin, config, dict.fromkeys(topics, compact))


async def ensure_topic_layout(config: KafkaConfig, topics: Iterable[str],
                              state_topics: Iterable[str]) -> tuple[dict[str, int], set[str]]:
    """The connector's topics in one admin session (each client costs a connection and a metadata
    round trip at start): ensure_topics of `topics` and of the compacted `state_topics`, then
    `topics`' partition counts and those of them that are compacted (as compacted_topics)."""
    topics = list(topics)
    async with _admin(config) as admin:
        async with _named_timeouts(config, "while creating or describing topics"):
            # The table topics first: a refusal names the first of them, as a connector's topics always did.
            counts = await _ensure_topics(admin, config, {**dict.fromkeys(topics, False),
                                                          **dict.fromkeys(state_topics, True)})
        compacted = await _compacted(admin, config, topics)
    return {t: counts[t] for t in topics}, compacted


@asynccontextmanager
async def _admin(config: KafkaConfig) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**config.client_options(), client_id="cdc-admin")  # the timeout also bounds connecting
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _ensure_topics(admin: AIOKafkaAdminClient, config: KafkaConfig, compact: dict[str, bool]) -> dict[str, int]:
    """`compact`: each wanted topic, and whether it is created compacted. Of the topics Kafka refuses
    to create, the first in `compact`'s order is named."""
    wanted = sorted(compact)
    missing = sorted(set(wanted) - set(await admin.list_topics()))
    if missing:
        log.info("creating topics %s", ", ".join(missing))
        new = [
            NewTopic(t, num_partitions=config.partitions, replication_factor=config.replication_factor,
                     # compact: records keyed by what they describe, of which only the last counts
                     topic_configs={**config.topic_config, **({"cleanup.policy": "compact"} if compact[t] else {})})
            for t in missing
        ]
        try:
            response = await admin.create_topics(new)
        except TopicAlreadyExistsError:  # created concurrently (connector and sink start together)
            response = None
        order = {topic: i for i, topic in enumerate(compact)}
        refused = sorted((order.get(topic, len(order)), topic, code, rest[0] if rest else None)
                         for topic, code, *rest in getattr(response, "topic_errors", [])
                         if code not in (0, TopicAlreadyExistsError.errno))
        if refused:
            _, topic, code, message = refused[0]
            raise PublishError(_create_failed(topic, code, message, config))
    counts: dict[str, int] = {}
    for description in await _described(admin, wanted, config.request_timeout_ms / 1000):
        topic = description["topic"]
        if description["error_code"] != 0 or not description["partitions"]:
            raise PublishError(f"topic {topic} is not available (Kafka error code {description['error_code']})")
        counts[topic] = len(description["partitions"])
        if counts[topic] != config.partitions:
            raise PublishError(
                f"topic {topic} has {counts[topic]} partitions; cdc needs {config.partitions} "
                "(one per table topic, so truncates stay in order with row changes)"
            )
    return counts


async def _described(admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float) -> list[dict]:
    """Describe topics, waiting while a topic just created is still reaching the broker's metadata
    (Kafka answers "unknown topic" or "leader not available" for a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        descriptions = await admin.describe_topics(topics)
        settling = [d for d in descriptions if d["error_code"] in _SETTLING or any(p["leader"] < 0 for p in d["partitions"])]
        if not settling or time.monotonic() >= deadline:
            return descriptions
        await asyncio.sleep(0.02)  # a describe is cheap; the start waits on it


_SETTLING = {UnknownTopicOrPartitionError.errno, LeaderNotAvailableError.errno}


def _create_failed(topic: str, code: int, message: str | None, config: KafkaConfig) -> str:
    """One line naming the topic, Kafka's reason and the YAML key that most likely needs a change."""
    hint = {
        RequestTimedOutError.errno: f"kafka.request_timeout_ms is {config.request_timeout_ms} ms: raise it for a slow "
                                    "broker or many topics",
        InvalidReplicationFactorError.errno: f"kafka.replication_factor is {config.replication_factor}: "
                                             "it cannot exceed the number of brokers",
        InvalidConfigurationError.errno: "check kafka.topic_config in the pipeline YAML",
        PolicyViolationError.errno: "the broker's topic policy refused it; check kafka.topic_config",
    }.get(code)
    reason = message or f"Kafka error code {code}"
    return f"cannot create topic {topic}: {reason}" + (f" ({hint})" if hint else "")


async def login_refusal(config: KafkaConfig) -> str | None:
    """Why the brokers refuse cdc for good (SASL credentials or mechanism, a TLS certificate that does
    not verify), or None when they did not answer or let it in. The clients only say that they
    could not bootstrap; one plain connection per broker tells why."""
    options = config.client_options()
    security = {k: options[k] for k in ("security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username",
                                        "sasl_plain_password") if k in options}
    for server in config.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await create_conn(host.strip("[]"), int(port), request_timeout_ms=config.request_timeout_ms, **security)
        except (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError,
                IllegalSaslStateError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except ssl.SSLCertVerificationError as exc:
            return f"TLS: {exc.verify_message or exc}: certificate verify failed"
        except ssl.SSLError as exc:
            return f"TLS: {exc}"
        except (OSError, KafkaError, asyncio.TimeoutError, ValueError):
            continue  # not answering: not a refusal
        conn.close()
        return None
    return None


async def track_topics(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> None:
    """Have the consumer's metadata cover `topics` (one request) before asking for their offsets:
    aiokafka otherwise learns of one unknown topic per retry_backoff_ms (100 ms each, per topic).
    aiokafka has no public call for this; a failed update only leaves the slower way."""
    await consumer._client.set_topics(sorted(set(topics)))


async def end_offsets(config: KafkaConfig, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """End offset of every partition of those of `topics` that exist (a topic that does not exist has
    no entry). Connecting is also the check that Kafka is reachable at all."""
    consumer = AIOKafkaConsumer(**config.client_options(), client_id="cdc-admin", enable_auto_commit=False)
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        refused = await login_refusal(config)
        if refused is not None:
            raise KafkaLoginError(f"Kafka at {config.bootstrap_servers} refused cdc ({refused}); check "
                                  "kafka.security in the pipeline YAML") from None
        raise PublishError(f"Kafka at {config.bootstrap_servers} is not reachable (kafka.request_timeout_ms is "
                           f"{config.request_timeout_ms} ms): {exc}") from None
    try:
        async with _named_timeouts(config, "while reading the topics' end offsets"):
            existing = sorted(set(topics) & set(await consumer.topics()))
            await track_topics(consumer, existing)
            partitions = [TopicPartition(t, p) for t, count in (await partition_counts(config, existing)).items()
                          for p in range(count)]
            ends = await consumer.end_offsets(partitions) if partitions else {}
        return {(tp.topic, tp.partition): end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def partition_counts(config: KafkaConfig, topics: list[str]) -> dict[str, int]:
    """Partitions per existing topic, asked of the broker (a consumer's own metadata only covers
    the topics it has assigned: Apache Kafka answers a metadata request for no topics with none)."""
    if not topics:
        return {}
    admin = AIOKafkaAdminClient(**config.client_options(), client_id="cdc-admin")
    await admin.start()
    try:
        async with _named_timeouts(config, "while describing topics"):
            described = await admin.describe_topics(topics)
        return {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
    finally:
        await admin.close()


async def partition_bounds(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """(first retained offset, end offset) per partition; the end is the offset the next record gets."""
    if not partitions:
        return {}
    first = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    return {tp: (first[tp], end[tp]) for tp in partitions}


async def compacted_topics(config: KafkaConfig, topics: list[str]) -> set[str]:
    """Those of `topics` whose cleanup.policy includes compact (only the latest record per key is
    kept): they need a tombstone after each delete and no record without a key."""
    async with _admin(config) as admin:
        return await _compacted(admin, config, topics)


async def _compacted(admin: AIOKafkaAdminClient, config: KafkaConfig, topics: list[str]) -> set[str]:
    try:
        async with _named_timeouts(config, "while reading the topics' configuration"):
            responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except KafkaError as exc:  # a broker without DescribeConfigs: say so rather than guess silently
        log.warning("cannot read the topics' cleanup.policy (%s); taking them as not compacted", exc)
        return set()
    compacted = set()
    for response in responses:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            if any(entry[0] == "cleanup.policy" and entry[1] and "compact" in entry[1] for entry in entries):
                compacted.add(name)
    return compacted


async def latest_per_key(config: KafkaConfig, topic: str) -> dict[bytes, bytes]:
    """The last value per key of a one-partition compacted topic of the pipeline's own ({} when the
    topic does not exist yet); records without a key or value (tombstones) are passed over."""
    consumer = AIOKafkaConsumer(**config.client_options(), enable_auto_commit=False,
                                # a topic created a moment ago: its leader is asked for again soon, not in 100 ms
                                retry_backoff_ms=20)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return {}
        await track_topics(consumer, [topic])
        part = TopicPartition(topic, 0)
        # The end before assigning: an assigned partition starts a fetch at once, which an empty
        # one holds for fetch_max_wait_ms (500 ms of every new pipeline's start) before end_offsets answers.
        end = (await consumer.end_offsets([part]))[part]
        out: dict[bytes, bytes] = {}
        if end == 0:
            return out
        consumer.assign([part])
        await consumer.seek_to_beginning(part)
        while await consumer.position(part) < end:
            for message in (await consumer.getmany(part, timeout_ms=1000)).get(part, []):
                if message.key is not None and message.value is not None:
                    out[message.key] = message.value
        return out
    finally:
        await consumer.stop()
