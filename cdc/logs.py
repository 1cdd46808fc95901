"""Log output: readable lines on a terminal, JSON lines for log collectors (`--log-format json`).

Every record carries the pipeline and the component that wrote it (`connector`, `sink`, ...), set
once per worker with :func:`log_context`; a log call may add `extra={"lsn": ..., "table": ...}`.
Messages never hold row values (errors are scrubbed where they are made), so neither do the fields.

On a terminal, log lines and the snapshot progress bars go through one rich console, which prints
lines above the live bars instead of gluing them onto a bar.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

LogFormat = Literal["text", "json"]


_console: Any = None


def shared_console() -> Any:
    """The one rich console that writes to stderr on a terminal, shared by progress bars and log
    lines; made (and rich imported) on first use: only a terminal needs it."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def __getattr__(name: str) -> Any:
    if name == "console":  # `from cdc.logs import console`
        return shared_console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Structured fields a record may carry, from log_context() or a log call's `extra`.
FIELDS = ("pipeline", "component", "sink", "slot", "lsn", "table", "topic", "partition", "offset", "request")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cdc_log_context", default={})

T = TypeVar("T")


async def log_context(work: Awaitable[T], **fields: Any) -> T:
    """Run `work` (a worker) with these fields on every record it logs, also from its threads."""
    _context.set({**_context.get(), **fields})  # a task's own copy of the context
    return await work


def set_log_context(**fields: Any) -> None:
    """Fields for every record of the current task or thread from now on (e.g. the pipeline)."""
    _context.set({**_context.get(), **fields})


class _ContextFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if not hasattr(record, "component") and record.name.startswith("cdc."):
            record.component = record.name.split(".", 2)[1]  # cdc.sink.runner -> sink
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO-8601), level, logger, message, the structured
    fields present, and the exception's type and text (never a traceback's local values)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(out, ensure_ascii=False)


class _ConsoleHandler(logging.Handler):
    """Lines through the shared rich console, so live progress bars stay below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            shared_console().print(self.format(record), markup=False, highlight=False, emoji=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False, log_format: LogFormat = "text", **fields: Any) -> list[logging.Handler]:
    """Configure the root logger once per process; `fields` (e.g. pipeline=...) go on every record."""
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = _ConsoleHandler() if sys.stderr.isatty() else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_ContextFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    set_log_context(**fields)
    return [handler]
