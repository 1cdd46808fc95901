"""Whether the compiled core is in use: ``cdc._native``, built from the native/ Rust crate when cdc is
installed (setuptools-rust; optional, so an install without Rust goes on without it).

It does the per-change work that costs most in Python: parsing XLogData frames
(cdc.source.postgres.frames), decoding pgoutput Insert/Update/Delete messages and their TupleData
(pgoutput), converting each column's text to its JSON value with a plan compiled once per relation
version (cdc.connector.tables), formatting LSNs (cdc.lsn), and, for the usual change (an INSERT into a
table the privacy policy leaves whole, of column types it can write), taking the pgoutput message
straight to the event's Kafka key and value (InsertEncoder; cdc.connector.stream). For the sinks it
reads fetched record batches into records (read_fetched; cdc.sink.fetched_records) and each record
value into the event and position the Python readers make (EventReader; cdc.events.codec). It gives the same values as the
pure-Python path to the byte (tests/unit/test_native.py, tests/integration/test_native_differential.py);
wherever input is not in the form PostgreSQL sends, it leaves it to the Python code, which then says
what it says today (values, errors).

- ``CDC_NATIVE=0`` selects the pure-Python path even where the core is built.
- ``CDC_REQUIRE_NATIVE=1`` (``make test`` sets it) makes a missing core an error at import, so a
  machine with the build tools cannot silently run the slower path.
"""

from __future__ import annotations

import os
from types import ModuleType

try:
    from cdc import _native as _built
except ImportError as exc:
    _built, _import_error = None, exc
else:
    _import_error = None

built: ModuleType | None = _built
"""The compiled core if it was built and imports, whether or not it is selected."""

core: ModuleType | None = _built if os.environ.get("CDC_NATIVE", "1") != "0" else None
"""The compiled core if it is in use, else None: the pure-Python path."""

if built is None and os.environ.get("CDC_REQUIRE_NATIVE") == "1":
    raise ImportError(
        f"CDC_REQUIRE_NATIVE=1 but cdc's compiled core (cdc._native) does not import ({_import_error}): "
        "install Rust (cargo) and reinstall cdc (pip install -e .), or unset CDC_REQUIRE_NATIVE to run "
        "the pure-Python path"
    )


def describe() -> str:
    """One line for logs and `cdc --version`-like output: which path runs the per-change work."""
    if core is not None:
        return "compiled core (cdc._native)"
    if built is not None:
        return "pure Python (CDC_NATIVE=0)"
    return f"pure Python (the compiled core is not built: {_import_error})"
