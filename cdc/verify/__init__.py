"""`cdc verify`: does a sink's target hold what the source holds, compared at one point of the stream.

requests   the request in the source's WAL, and the collection of its results from Kafka
digests    the per-row digests both sides compute over the published form of a row
records    the control record on a table topic, and the result records on `{pipeline}.verify`
results    the results per table, for people and for --json

The connector's side is cdc.connector.verification, the sink's cdc.sink.verification (reading back
through cdc.sink.backends.readback), the verb cdc.cli.verify_commands. See docs/verify.md.
"""
