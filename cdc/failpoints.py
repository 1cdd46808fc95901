"""Named crash points for the fault suite: `CDC_FAILPOINT=name[:n]` kills the process (SIGKILL, as
`kill -9` or a power cut would) the n-th time (default: the first) it reaches the point `name`.

Each point sits between two durable effects, so a crash there shows what a restart must repair:

| Point | Reached |
|---|---|
| `connector.received` | a WAL message was read from the slot, before anything of it is published |
| `connector.published` | an event was handed to the Kafka producer, before Kafka acknowledged it |
| `connector.acknowledged` | Kafka acknowledged a batch, before its LSN is confirmed to PostgreSQL |
| `connector.confirmed` | a standby status update (the confirmed LSN) was sent to PostgreSQL |
| `sink.consumed` | a sink fetched records from Kafka, before applying them |
| `sink.applied` | rows and positions are written in the target's transaction, before it commits |
| `sink.committed` | the target committed rows and positions, before the sink takes the next records |
| `snapshot.chunk_read` | a snapshot chunk was read between its watermarks, before its rows are published |
| `snapshot.chunk_published` | Kafka acknowledged a chunk's rows, before its progress is recorded |
| `snapshot.chunk_recorded` | a progress record (every chunk confirmed since the last) is in Kafka, while later chunks are read |
| `dlq.written` | a dead letter is in its topic, before the sink's position moves past it |

Several points may be armed at once, separated by commas (`sink.applied:3,connector.confirmed`).
Unset (every production run), `reached` is one dictionary test on an empty dict.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "CDC_FAILPOINT"


def _parse(text: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        armed[name] = int(count) if count else 1
    return armed


_armed: dict[str, int] = _parse(os.environ.get(ENV, ""))
_reached: dict[str, int] = {}
armed = bool(_armed)
"""Whether any point is armed: the per-event points test this before calling `reached`."""


def reached(name: str) -> None:
    """The process got to point `name`: crash here if it is armed and this is its n-th time."""
    if name not in _armed:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == _armed[name]:
        sys.stderr.write(f"failpoint {name} reached ({_reached[name]}): killing this process\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
