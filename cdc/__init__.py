"""cdc: event-carried state transfer out of PostgreSQL, through Kafka, into downstream databases."""

__version__ = "0.1.0"
