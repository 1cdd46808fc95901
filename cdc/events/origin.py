"""Which source history a position belongs to (Kafka header ``cdc.origin``).

LSNs are only comparable within one history of one database cluster. After a failover to a promoted
standby, the new primary may reuse LSNs that the old one had already given to changes it then lost;
a sink comparing bare positions would skip the new changes as "already applied". So every event
carries the identity of the history its position belongs to:

- ``system_id``: the cluster's system identifier (IDENTIFY_SYSTEM), the same on a physical standby;
- ``timeline``: the timeline the connector streamed from;
- ``timeline_start``: the LSN at which that timeline branched off its parent (0 for timeline 1).

A sink that applied positions of timeline T up to LSN X may continue with events of a later
timeline T' only if X <= timeline_start of T' (everything it applied is part of the new history).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from cdc.events.exact_json import loads
from cdc.lsn import format_lsn, parse_lsn

HEADER = "cdc.origin"


@dataclass(frozen=True, slots=True)
class SourceOrigin:
    system_id: str  # decimal digits, as IDENTIFY_SYSTEM prints it (a 64-bit number)
    timeline: int
    timeline_start: int  # LSN where `timeline` began

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"system_id": self.system_id, "timeline": self.timeline, "timeline_start": format_lsn(self.timeline_start)}
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> "SourceOrigin":
        obj = loads(data)
        return cls(str(obj["system_id"]), int(obj["timeline"]), parse_lsn(obj["timeline_start"]))

    def __str__(self) -> str:
        return f"system {self.system_id} timeline {self.timeline} (from {format_lsn(self.timeline_start)})"
