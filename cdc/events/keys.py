"""A row key as a set or dict member.

Events carry keys as JSON values: a list of column values, where a jsonb key column holds lists
and objects. Both the connector (changes seen during a snapshot chunk) and the sink (pending keys
of a batch) need the same key to hash the same, so objects are compared by their sorted items.
"""

from __future__ import annotations

from typing import Any


def hashable_key(value: Any) -> Any:
    if type(value) is list and not any(isinstance(v, (list, dict)) for v in value):
        return tuple(value)  # a key of scalars, the usual case: no walk
    if isinstance(value, list):
        return tuple(hashable_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable_key(v)) for k, v in value.items()))
    return value
