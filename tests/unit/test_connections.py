"""Connection strings: load-time checks, timeouts added to them, and redaction of passwords."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc.config import load_pipeline_text
from cdc.config.connections import postgres_dsn_problem, sink_url_problem, with_connect_timeout
from cdc.errors import ConfigError
from cdc.redact import redact, scrub, scrub_parse_error
from cdc.sqlnames import ascii_lower, quote_ident

SECRET = "zebra42"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("postgresql://app:zebra42@db/shop", "postgresql://app:***@db/shop"),
        ("postgresql://app:zeb@ra:42@db/shop", "postgresql://app:***@db/shop"),  # unencoded '@' and ':'
        ("postgresql://app@db:5432/shop", "postgresql://app@db:5432/shop"),  # no password: unchanged
        ("host=db password=zebra42 user=app", "host=db password=*** user=app"),
        ("host=db password = 'zeb ra42' user=app", "host=db password = *** user=app"),
        ("host=db password='zebra42", "host=db password=***"),  # unterminated quote
        ("postgresql://db/shop?user=app&password=zebra42", "postgresql://db/shop?user=app&password=***"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_scrub_removes_the_password_in_every_form_it_was_written() -> None:
    dsn = "postgresql://app:zeb%23ra42@db/shop"  # the password is 'zeb#ra42'
    message = 'FATAL: password "zeb#ra42" rejected; raw zeb%23ra42'
    assert "zeb" not in scrub(message, dsn)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db password=zebra42 secret user=app",  # missing "=" after "secret"
        "postgresql://app:zebra42 x@db/shop",  # unexpected spaces found in "zebra42 x"
        "postgresql://app:zebra42%zz@db/shop",  # invalid percent-encoded token: "zebra42%zz"
    ],
)
def test_parse_errors_hide_what_libpq_quotes_from_the_password(dsn: str) -> None:
    with pytest.raises(Exception) as info:
        conninfo_to_dict(dsn)
    assert SECRET in str(info.value) or "secret" in str(info.value)  # libpq does quote it
    safe = scrub_parse_error(str(info.value), dsn)
    assert SECRET not in safe and "secret" not in safe and "\n" not in safe


def test_parse_errors_keep_option_names() -> None:
    dsn = "postgresql://app:zebra42@db/shop?sslmod=require"
    with pytest.raises(Exception) as info:
        conninfo_to_dict(dsn)
    assert scrub_parse_error(str(info.value), dsn) == 'invalid URI query parameter: "sslmod"'


@pytest.mark.parametrize(
    "dsn, words",
    [
        ("postgresql://app:zebra42#x@db/shop", "'#'"),
        ("postgresql://app:zebra42@x@db/shop", "'@'"),
        ("postgresql://app:zebra42/x@db/shop", "port is not a number"),
        ("postgresql://app@db/shop?connect_timeout=soon", "connect_timeout"),
        ("host=db port=zebra42", "port is not a number"),
        ("   ", "must not be empty"),
    ],
)
def test_postgres_dsn_problems(dsn: str, words: str) -> None:
    problem = postgres_dsn_problem(dsn)
    assert problem is not None and words in problem and SECRET not in problem


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://app:p%23s%40w%3Ard%20x@db:5432/shop", "host=db user=app password='p#s@w:rd x'", "postgres://db"],
)
def test_correctly_written_dsns_pass(dsn: str) -> None:
    assert postgres_dsn_problem(dsn) is None


@pytest.mark.parametrize(
    "url, words",
    [
        ("mysql://app:zebra42@db/shop", "unsupported URL scheme 'mysql'"),
        ("postgresq://app:zebra42@db/shop", "did you mean postgresql://?"),
        ("host=db password=zebra42", "not a key=value connection string"),
        ("sqlite://replica.db", "three slashes"),
        ("replica.db", "not a URL"),
    ],
)
def test_sink_url_problems_name_at_most_the_scheme(url: str, words: str) -> None:
    problem = sink_url_problem(url)
    assert problem is not None and words in problem and SECRET not in problem


def test_connect_timeout_is_added_unless_the_dsn_sets_one() -> None:
    assert with_connect_timeout("postgresql://app@db/shop", 7) == "postgresql://app@db/shop?connect_timeout=7"
    assert with_connect_timeout("postgresql://db/shop?sslmode=disable", 7).endswith("?sslmode=disable&connect_timeout=7")
    assert with_connect_timeout("postgresql://db/shop?connect_timeout=3", 7) == "postgresql://db/shop?connect_timeout=3"
    assert conninfo_to_dict(with_connect_timeout("host=db password='a b'", 7)) == {
        "host": "db", "password": "a b", "connect_timeout": "7"
    }


MINIMAL = """\
pipeline: shop
source:
  postgres: postgresql://cdc@db.internal:5432/shop
  tables: [public.customers]
kafka:
  bootstrap_servers: k:9092
"""


def test_timeouts_have_defaults_and_reach_the_connection_strings(tmp_path: Path) -> None:
    cfg = load_pipeline_text(MINIMAL + "sinks:\n  r:\n    url: postgresql://r/db\n", "p.yaml", env={}, base_dir=tmp_path)
    assert (cfg.source.connect_timeout_s, cfg.sinks["r"].connect_timeout_s, cfg.kafka.request_timeout_ms) == (10, 10, 30000)
    assert conninfo_to_dict(cfg.source.conninfo)["connect_timeout"] == "10"
    assert cfg.sinks["r"].connect_url == "postgresql://r/db?connect_timeout=10"


def test_a_dsn_problem_is_reported_at_its_line_without_the_value(tmp_path: Path) -> None:
    text = MINIMAL.replace("postgresql://cdc@db", "postgresql://cdc:zebra42 x@db")
    with pytest.raises(ConfigError) as info:
        load_pipeline_text(text, "p.yaml", env={}, base_dir=tmp_path)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("p.yaml:3: source.postgres: cannot parse")
    assert SECRET not in str(info.value)


def test_a_wrong_type_for_a_dsn_does_not_echo_it(tmp_path: Path) -> None:
    text = MINIMAL + "sinks:\n  r:\n    url: [postgresql://app:zebra42@db/x]\n"
    with pytest.raises(ConfigError) as info:
        load_pipeline_text(text, "p.yaml", env={}, base_dir=tmp_path)
    assert info.value.problems[0].startswith("p.yaml:9: sinks.r.url:") and SECRET not in str(info.value)


def test_a_malformed_variable_reference_names_its_place_not_the_value(tmp_path: Path) -> None:
    text = MINIMAL.replace("postgresql://cdc@db", "postgresql://cdc:zebra42${x@db")
    with pytest.raises(ConfigError) as info:
        load_pipeline_text(text, "p.yaml", env={}, base_dir=tmp_path)
    assert info.value.problems == [
        "p.yaml:3: source.postgres: malformed variable reference at character 25: use ${NAME} or "
        "${NAME:-default}; write $${ for a literal ${"
    ]


def test_a_sqlite_file_in_a_missing_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline_text(MINIMAL + "sinks:\n  r:\n    url: sqlite:///nope/r.db\n", "p.yaml", env={}, base_dir=tmp_path)
    assert info.value.problems == [f"p.yaml:9: sinks.r.url: directory {tmp_path / 'nope'} of the SQLite file does not exist; create it first"]
    assert not (tmp_path / "nope").exists()


def test_the_model_never_prints_a_connection_string(tmp_path: Path) -> None:
    text = MINIMAL.replace("cdc@db", "cdc:zebra42@db") + "sinks:\n  r:\n    url: postgresql://a:zebra42@r/db\n"
    cfg = load_pipeline_text(text, "p.yaml", env={}, base_dir=tmp_path)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)


def test_sql_names() -> None:
    assert quote_ident('Order "Items"') == '"Order ""Items"""'
    assert ascii_lower("ÉCOLE Straße İ") == "École straße İ"  # only ASCII letters fold
