"""Digests of rows in their published JSON form: the connector digests the rows it read from the
source (after the privacy policy), the sink the rows it reads back from its target (converted back
to the published form by its backend). Equal rows give equal digests on both sides.

A digest is 64 bits of BLAKE2b over the canonical JSON text (keys sorted; json/jsonb values as the
text PostgreSQL printed, an ``orjson.Fragment`` on both sides): 16 hex characters. Collisions are
not a concern at 2**-64 per compared row.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

DIGEST_BYTES = 8


def _digest(value: Any) -> str:
    return blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=DIGEST_BYTES).hexdigest()


def key_digest(key_values: list[Any]) -> str:
    """The digest of a row's key: its key column values in key order."""
    return _digest(key_values)


def row_digest(row: dict[str, Any]) -> str:
    """The digest of a whole row (every published column)."""
    return _digest(row)
