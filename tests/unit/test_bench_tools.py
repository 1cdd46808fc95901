"""bench/latency_trace.py wraps functions of cdc by name: a renamed function or a changed signature
must fail here, not in the middle of a `make bench` run."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

CHECK = """
import inspect, sys
sys.path.insert(0, sys.argv[1])
from aiokafka import AIOKafkaProducer
from cdc.connector.stream import Stream
from cdc.publish.kafka import Publisher
from cdc.sink.apply import Applier
from cdc.sink.consume import PartitionReader
from cdc.sink.runner import Sink
from cdc.source.postgres.replication import ReplicationConnection
def params(f):  # names, kinds and defaults: what a caller relies on (annotations are not)
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
classes = [AIOKafkaProducer, Stream, Publisher, Applier, PartitionReader, Sink, ReplicationConnection]
before = {(c, name): value for c in classes for name, value in vars(c).items() if callable(value)}
import latency_trace
latency_trace.install()
wrapped = 0
for (c, name), original in before.items():
    now = vars(c)[name]
    if now is not original:
        wrapped += 1
        assert params(now) == params(original), (c.__name__, name, inspect.signature(now), inspect.signature(original))
        assert inspect.iscoroutinefunction(now) == inspect.iscoroutinefunction(original), (c.__name__, name)
print(wrapped)
"""


def test_the_latency_trace_wraps_functions_cdc_has_with_their_signatures():
    done = subprocess.run([sys.executable, "-c", CHECK, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) >= 7  # every stage it times
