"""Snapshots: the rows a table already holds, read in chunks between watermarks and published as
``r`` events through the connector's stages. jobs (scheduling, chunk windows), progress (the
Kafka progress store), display (progress bars and log lines); the source-specific chunk reads are
:mod:`cdc.source.postgres.snapshot`."""
