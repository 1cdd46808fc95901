"""`cdc verify`: does a sink's target hold what the source holds, compared at one point of the stream.

requests   the request in the source's WAL, and the CLI's wait for its results
digests    the per-row digests both sides compute over the published form of a row
records    the control record on a table topic, and the result records on `{pipeline}.verify`
"""
