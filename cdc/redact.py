"""Keep passwords out of messages and logs: the one place that knows how a DSN or URL hides one.

Any text that may contain a connection string (a DSN, a sink URL, a driver's error message about
one) goes through :func:`redact` or :func:`scrub` before it is printed or logged. Nothing here
raises: these run while reporting other errors, on input that may not even parse.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from psycopg.conninfo import conninfo_to_dict

MASK = "***"

# scheme://user:PASSWORD@... Greedy up to the line's last '@': an unencoded '@', ':' or '/' in the
# password must not leave a tail of it visible (masking too much is the safe side).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)[^\n]*@")
# password=... in a key=value DSN (quoted or not, an unterminated quote runs to the end) or a URL query.
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE)
# A double-quoted fragment in a libpq message ('missing "=" after "cret"').
_QUOTED = re.compile(r'"([^"]*)"')


def redact(text: str) -> str:
    """``text`` with every password of a URL or ``password=`` DSN in it replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)
    return _KEYWORD_PASSWORD.sub(lambda m: m["head"] + MASK, text)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (libpq lists each failed attempt on a line of its own)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def passwords_in(dsn: str) -> list[str]:
    """The password of ``dsn`` in every form it may be echoed in (as written, decoded, encoded)."""
    found = {m.group(0).partition("=")[2].strip().strip("'") for m in _KEYWORD_PASSWORD.finditer(dsn)}
    url = _URL_PASSWORD.search(dsn)
    if url:
        found.add(url.group(0)[len(url["head"]) : -1])
    try:
        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # unparsable: the forms above are all there is
        password = None
    if password:
        found.add(str(password))
    found |= {unquote(p) for p in found} | {quote(p, safe="") for p in found}
    return sorted((p for p in found if p), key=len, reverse=True)  # longest first: no partial masks


def scrub(text: str, *dsns: str) -> str:
    """``text`` (e.g. a driver's error message) without the passwords of ``dsns``, nor of any DSN
    or URL it quotes itself."""
    text = redact(text)
    for dsn in dsns:
        for password in passwords_in(dsn):
            text = text.replace(password, MASK)
    return text


def scrub_parse_error(message: str, dsn: str) -> str:
    """One line from libpq's complaint about an unparsable ``dsn``, hiding every quoted fragment
    except option names: libpq quotes the piece it choked on, which can be a piece of the password
    ('missing "=" after "cret"')."""

    def fragment(m: re.Match[str]) -> str:
        piece = m.group(1)
        is_option_name = re.fullmatch(r"[A-Za-z_]+", piece) and re.search(
            rf"(^|[\s?&]){re.escape(piece)}\s*=", dsn
        )
        return m.group(0) if is_option_name or piece == "=" else f'"{MASK}"'

    one_line = " ".join(message.split())
    return scrub(_QUOTED.sub(fragment, one_line), dsn)
