"""Schema ids: each event names its table's published schema by a short digest (header ``cdc.schema_id``)
instead of carrying the schema itself; the schema travels once per shape on ``{pipeline}.schemas``.

The connector publishes one record per shape there (key: the id, value: the published schema JSON,
exactly what the ``cdc.schema`` header held: excluded columns absent, masked ones as ``text``) and
waits for Kafka to acknowledge it before the first event that names it (cdc.connector.shapes). The
id is a digest of that JSON, so the same shape always gets the same id, across restarts too.

Readers turn a record's headers into its schema JSON with :func:`schema_json_of`: from the old full
``cdc.schema`` header (records of connectors before schema ids, still read), or from the schemas
this process has learnt (:func:`learn`, fed by cdc.publish.schemas, which reads the topic). The
table of known schemas is process-wide: an id names one content, whoever asks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cdc.events.schema import HEADER as FULL_SCHEMA_HEADER

HEADER = "cdc.schema_id"
_ID_BYTES = 12  # 96 bits of SHA-256: no two shapes of any pipeline meet by chance


def topic_of(pipeline: str) -> str:
    return f"{pipeline}.schemas"


def schema_id(schema_json: bytes) -> bytes:
    """The id of a published schema: the first 96 bits of its JSON's SHA-256, in hex (24 characters)."""
    return hashlib.sha256(schema_json).hexdigest()[: _ID_BYTES * 2].encode()


class UnknownSchemaId(LookupError):
    """A record names a schema id this process has not learnt (see cdc.publish.schemas.SchemaResolver)."""

    def __init__(self, schema_id: bytes):
        super().__init__(schema_id)
        self.schema_id = schema_id

    def __str__(self) -> str:
        return f"its schema id {self.schema_id.decode('ascii', 'backslashreplace')} is not known"


_known: dict[bytes, bytes] = {}  # id -> schema JSON


def learn(schema_id_: bytes, schema_json: bytes) -> bool:
    """Remember a schema record; False (and nothing learnt) if its key is not the digest of its value."""
    if schema_id(schema_json) != schema_id_:
        return False
    _known[schema_id_] = schema_json
    return True


def known(schema_id_: bytes) -> bool:
    return schema_id_ in _known


def id_of(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The record's schema id header; None without one."""
    return next((v for k, v in (headers or ()) if k == HEADER), None)


def schema_json_of(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The schema JSON a record's headers name: the full ``cdc.schema`` header if it has one (older
    connectors), else the schema its id names; None if it has neither header. UnknownSchemaId if
    the id was not learnt."""
    wanted = None
    for k, v in headers or ():
        if k == FULL_SCHEMA_HEADER:
            return v
        if k == HEADER:
            wanted = v
    if wanted is None:
        return None
    try:
        return _known[wanted]
    except KeyError:
        raise UnknownSchemaId(wanted) from None
