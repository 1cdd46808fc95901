"""SQL identifier helpers shared by every layer (config, source, sinks); no imports from cdc."""

from __future__ import annotations

# PostgreSQL (with a UTF-8 database) and SQLite fold only ASCII letters; str.lower() would fold more
# ('İ', 'Σ'...) and so name a different table than the database does.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def quote_ident(name: str) -> str:
    """The identifier in double quotes, embedded quotes doubled: always safe in SQL, case kept."""
    return '"' + name.replace('"', '""') + '"'


def ascii_lower(name: str) -> str:
    """Fold ASCII letters to lower case, as PostgreSQL does to unquoted names and SQLite to all names."""
    return name.translate(_ASCII_LOWER)
