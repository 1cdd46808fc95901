"""The connector: PostgreSQL logical replication (pgoutput) -> change events -> Kafka, as stages.

    stream       read frames, decode pgoutput, one handler per message type
    tables       Relation -> TableStream (columns by identity, converters, privacy policy, topic)
    changes      build events from row changes and snapshot rows, filter them by the policy
    positions    the transaction being read, each event's position
    publishing   events -> Kafka records, END records; shapes: the schema changes topic
    confirm      Kafka's acknowledgements -> the LSN confirmed to PostgreSQL
    snapshots    snapshot chunks, fed through the same stages
    startup      preflight checks; lifecycle: start, heal, stop (Connector)
"""

from cdc.connector.lifecycle import Connector, kafka_fault
from cdc.connector.tables import TableStream

__all__ = ["Connector", "TableStream", "kafka_fault"]
