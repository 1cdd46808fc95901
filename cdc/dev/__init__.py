"""Throwaway local services for the demo and the test suite: a PostgreSQL cluster with
``wal_level=logical`` and a Kafka protocol broker, both from wheels (no Docker, no JVM)."""
