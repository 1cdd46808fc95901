"""Connection strings of a pipeline: the source DSN and sink URLs, parsed when the file is loaded.

A connection string that libpq cannot parse would otherwise fail at start with a driver message
that may quote a piece of the password. Every check here returns a message that never contains
the password (see :mod:`cdc.redact`), or None when the string is fine.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.redact import scrub_parse_error

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_URL_HINT = "percent-encode special characters of the password in a URL ('#' as %23, '@' as %40, '/' as %2F, space as %20)"


def is_url(dsn: str) -> bool:
    return dsn.startswith(POSTGRES_PREFIXES)


def postgres_dsn_problem(dsn: str) -> str | None:
    """Why libpq would refuse ``dsn`` (a URL or key=value string), or None. Never names the password."""
    if not dsn.strip():
        return "connection string must not be empty"
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        hint = _URL_HINT if is_url(dsn) else "quote a value with spaces or quotes: password='it''s secret'"
        return f"cannot parse the connection string: {scrub_parse_error(str(exc), dsn)}; {hint}"
    if is_url(dsn):
        # libpq reads an unencoded '#' as part of the password; every URL parser (and reader) takes
        # it for the start of a fragment.
        if "#" in dsn:
            return f"unencoded '#' in the URL; {_URL_HINT}"
        if "@" in str(params.get("host", "")):
            return f"more than one '@' in the URL; {_URL_HINT}"
    for port in str(params.get("port", "")).split(","):
        if port and not port.isdigit():  # not echoed: an unencoded ':' or '/' puts password text here
            return f"the port is not a number; {_URL_HINT}" if is_url(dsn) else "the port is not a number"
    timeout = str(params.get("connect_timeout", "")).strip()
    if timeout and not timeout.lstrip("-").isdigit():
        return "connect_timeout in the connection string must be a whole number of seconds"
    return None


def sink_url_problem(url: str) -> str | None:
    """Why ``url`` is not a sink URL we support, or None. Names at most the scheme, never the rest."""
    if url.startswith(SQLITE_PREFIX):
        if not url[len(SQLITE_PREFIX) :]:
            return "sqlite URL needs a file: sqlite:///relative.db or sqlite:////absolute/path.db"
        return None
    if url.startswith(POSTGRES_PREFIXES):
        return postgres_dsn_problem(url)
    supported = (
        "supported are sqlite:///relative.db, sqlite:////absolute/path.db, "
        "postgresql://user:password@host:port/dbname and postgres://..."
    )
    scheme = _SCHEME.match(url)
    if scheme is None or "://" not in url:
        if "=" in url:
            return f"a sink needs a URL, not a key=value connection string; {supported}"
        return f"not a URL; {supported}"
    name = scheme.group(1)
    if name.lower() == "sqlite":
        return "a sqlite URL has three slashes: sqlite:///relative.db or sqlite:////absolute/path.db"
    close = difflib.get_close_matches(name.lower(), ["postgresql", "postgres", "sqlite"], n=1)
    hint = f"did you mean {close[0]}://? " if close else ""
    return f"unsupported URL scheme {name!r}; {hint}{supported}"


def sqlite_path(url: str, base_dir: str | Path | None = None) -> Path | None:
    """File of a ``sqlite:///`` URL, or None for other URLs.

    ``sqlite:///rel.db`` is relative to ``base_dir`` (the YAML file's directory, so a pipeline works
    from any working directory); ``sqlite:////abs/path.db`` is absolute.
    """
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = Path(url[len(SQLITE_PREFIX) :])
    if path.is_absolute():
        return path
    return Path(base_dir if base_dir is not None else Path.cwd()).absolute() / path


def sqlite_directory_problem(path: Path) -> str | None:
    """A SQLite file is created on first use, but never a directory tree: a typo would hide the data."""
    if not path.parent.is_dir():
        return f"directory {path.parent} of the SQLite file does not exist; create it first"
    return None


def with_connect_timeout(dsn: str, seconds: int) -> str:
    """``dsn`` with libpq's ``connect_timeout`` set, unless the DSN sets its own. A URL stays a URL."""
    if "connect_timeout" in conninfo_to_dict(dsn):
        return dsn
    if is_url(dsn):
        parts = urlsplit(dsn)
        query = f"{parts.query}&" if parts.query else ""
        return parts._replace(query=f"{query}connect_timeout={seconds}").geturl()
    return make_conninfo(dsn, connect_timeout=str(seconds))
