"""Pipeline YAML loading: the typed model, env expansion, and file:line in every problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cdc.config import (
    KafkaConfig,
    PipelineConfig,
    SourceConfig,
    TableRef,
    kafka_topic_name,
    load_pipeline,
    load_pipeline_text,
)
from cdc.config.common import RetryConfig
from cdc.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV = {"KAFKA_BOOTSTRAP": "kafka1:9092,kafka2:9092"}

MINIMAL = """\
pipeline: shop
source:
  postgres: postgresql://cdc@db.internal:5432/shop
  tables: [public.customers]
kafka:
  bootstrap_servers: k:9092
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> PipelineConfig:
    return load_pipeline(write(tmp_path, text), env=ENV if env is None else env)


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """Problems of a bad file, with the tmp dir stripped: ['p.yaml:3: ...']."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    assert info.value.exit_code == 2
    return [p.replace(f"{tmp_path}/", "") for p in info.value.problems]


def only_problem(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    found = problems(tmp_path, text, env)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------------------------------


def test_every_field(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
        version: 1
        pipeline: shop
        source:
          postgres: postgresql://cdc@db.internal:5432/shop
          tables: [public.customers, 'public."Order Items"', Audit.Log]
          slot: my_slot
          publication: my_pub
          status_interval_s: 2.5
          connect_timeout_s: 3
          retry: {give_up_after_s: 60}
        kafka:
          bootstrap_servers: ${KAFKA_BOOTSTRAP}
          topic: "cdc-{pipeline}-{table}"
          partitions: 1
          replication_factor: 2
          linger_ms: 0
          max_batch_bytes: 65536
          idempotence: false
          request_timeout_ms: 5000
          retry: {initial_delay_s: 1, max_delay_s: 10}
        sinks:
          replica:
            url: postgresql://app@replica:5432/shop
            tables: {public.customers: customers, 'public."Order Items"': order_items}
            batch_size: 50
            apply: transactional
            on_column_drop: drop
            connect_timeout_s: 4
            retry: {give_up_after_s: 0}
            on_error: dlq
          local:
            url: sqlite:///local.db
        """,
    )
    customers, items, audit = TableRef("public", "customers"), TableRef("public", "Order Items"), TableRef("audit", "log")
    assert cfg.version == 1
    assert cfg.pipeline == "shop"
    assert cfg.path == tmp_path / "p.yaml"
    assert cfg.source == SourceConfig(
        postgres="postgresql://cdc@db.internal:5432/shop",
        tables=[customers, items, audit],
        slot="my_slot",
        publication="my_pub",
        status_interval_s=2.5,
        connect_timeout_s=3,
        retry=RetryConfig(give_up_after_s=60),
    )
    assert cfg.kafka == KafkaConfig(
        bootstrap_servers="kafka1:9092,kafka2:9092",
        topic="cdc-{pipeline}-{table}",
        partitions=1,
        replication_factor=2,
        linger_ms=0,
        max_batch_bytes=65536,
        idempotence=False,
        request_timeout_ms=5000,
        retry=RetryConfig(initial_delay_s=1, max_delay_s=10),
    )
    assert list(cfg.sinks) == ["replica", "local"]
    replica, local = cfg.sinks["replica"], cfg.sinks["local"]
    assert replica.model_dump() == {
        "name": "replica",
        "url": "postgresql://app@replica:5432/shop",
        "only": None,
        "tables": {customers: {"name": "customers", "columns": None}, items: {"name": "order_items", "columns": None}},
        "batch_size": 50,
        "apply": "transactional",
        "max_transaction_events": 100_000,
        "on_column_drop": "drop",
        "connect_timeout_s": 4,
        "retry": {"initial_delay_s": 0.5, "max_delay_s": 30.0, "give_up_after_s": 0.0},
        "on_error": "dlq",
    }
    assert (local.name, local.tables, local.batch_size, local.apply, local.on_error) == ("local", {}, 5000, None, "halt")
    assert (cfg.apply_mode("replica"), cfg.apply_mode("local")) == ("transactional", "transactional")  # 3 tables
    assert (replica.dialect, local.dialect) == ("postgres", "sqlite")
    assert replica.sqlite_path is None
    assert local.sqlite_path == tmp_path / "local.db"
    assert cfg.sqlite_path("local") == tmp_path / "local.db"
    assert cfg.target_table("replica", items) == "order_items"
    assert cfg.target_table("replica", audit) == "log"
    assert cfg.target_table("local", items) == "Order Items"
    assert [cfg.topic_for(t) for t in cfg.source.tables] == ["cdc-shop-customers", "cdc-shop-Order_Items", "cdc-shop-log"]


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL.replace("pipeline: shop", "pipeline: Shop-EU.v2"))
    assert cfg.version == 1
    assert cfg.source.slot == cfg.source.publication == "cdc_shop_eu_v2"
    assert cfg.source.status_interval_s == 10.0
    assert cfg.kafka == KafkaConfig(bootstrap_servers="k:9092")
    assert (cfg.kafka.topic, cfg.kafka.partitions, cfg.kafka.replication_factor) == ("{pipeline}.{schema}.{table}", 1, 1)
    assert (cfg.kafka.linger_ms, cfg.kafka.max_batch_bytes) == (5, 1048576)
    assert cfg.sinks == {}  # a connector-only pipeline
    assert cfg.topic_for(TableRef("public", "customers")) == "Shop-EU.v2.public.customers"


def test_sinks_key_with_everything_commented_out_means_no_sinks(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + "sinks:\n  # replica:\n  #   url: sqlite:///x.db\n")
    assert cfg.sinks == {}


def test_example_pipeline_loads() -> None:
    cfg = load_pipeline(REPO / "pipelines" / "shop.yaml", env={})
    assert cfg.pipeline == "shop"
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.source.postgres.startswith("postgresql://")
    assert cfg.source.slot == "cdc_shop"
    assert TableRef("public", "Order Items") in cfg.source.tables
    assert cfg.sinks["replica"].sqlite_path == REPO / "pipelines" / "shop-replica.db"
    cfg = load_pipeline(REPO / "pipelines" / "shop.yaml", env={"KAFKA_BOOTSTRAP": "broker:9093"})
    assert cfg.kafka.bootstrap_servers == "broker:9093"


# --------------------------------------------------------------------------------------------------
# Environment variables
# --------------------------------------------------------------------------------------------------


def bootstrap(tmp_path: Path, value: str, env: dict[str, str]) -> str:
    text = MINIMAL.replace("bootstrap_servers: k:9092", f"bootstrap_servers: {value}")
    return load(tmp_path, text, env).kafka.bootstrap_servers


def test_env_whole_value(tmp_path: Path) -> None:
    assert bootstrap(tmp_path, "${B}", {"B": "h:1"}) == "h:1"


def test_env_several_in_one_string(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        MINIMAL.replace("postgresql://cdc@db.internal:5432/shop", "postgresql://${USER}@${HOST}/db"),
        {"USER": "me", "HOST": "db1"},
    )
    assert cfg.source.postgres == "postgresql://me@db1/db"


def test_env_default(tmp_path: Path) -> None:
    assert bootstrap(tmp_path, "${B:-127.0.0.1:9092}", {}) == "127.0.0.1:9092"
    assert bootstrap(tmp_path, "${B:-127.0.0.1:9092}", {"B": ""}) == "127.0.0.1:9092"  # empty counts as unset
    assert bootstrap(tmp_path, "${B:-127.0.0.1:9092}", {"B": "h:2"}) == "h:2"


def test_env_dollar_dollar_is_literal(tmp_path: Path) -> None:
    assert bootstrap(tmp_path, "'a$${B}'", {}) == "a${B}"


def test_env_value_with_yaml_syntax_stays_a_string(tmp_path: Path) -> None:
    # Expanded after parsing: ': ' and ' #' in the value are not YAML.
    assert bootstrap(tmp_path, "${B}", {"B": "h:1 # not a comment: {x}"}) == "h:1 # not a comment: {x}"


def test_env_in_a_number_field(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + "  replication_factor: ${RF}\n", {"RF": "3"})
    assert cfg.kafka.replication_factor == 3


def test_more_than_one_partition_is_refused(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  partitions: 3\n")
    assert found.startswith("p.yaml:7: kafka.partitions:") and "only 1 partition" in found, found


def test_env_missing(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("k:9092", "${KAFKA_BOOTSTRAP}"), env={})
    assert found == "p.yaml:6: environment variable KAFKA_BOOTSTRAP is not set (used in kafka.bootstrap_servers)"


def test_env_malformed_reference(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("k:9092", "${KAFKA-BOOTSTRAP}"), env={})
    assert found.startswith("p.yaml:6: kafka.bootstrap_servers: malformed variable reference")


def test_default_env_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_TEST_BOOTSTRAP", "from-os:9092")
    path = write(tmp_path, MINIMAL.replace("k:9092", "${CDC_TEST_BOOTSTRAP}"))
    assert load_pipeline(path).kafka.bootstrap_servers == "from-os:9092"


# --------------------------------------------------------------------------------------------------
# Problems carry file:line
# --------------------------------------------------------------------------------------------------


def test_yaml_syntax_error(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  topic: [unclosed\nsinks: {}\n")
    assert found.startswith("p.yaml:8: invalid YAML:"), found


def test_yaml_syntax_error_bad_indentation(tmp_path: Path) -> None:
    found = only_problem(tmp_path, "pipeline: shop\nsource:\n  postgres: x\n tables: [a]\n")
    assert found.startswith("p.yaml:4: invalid YAML:"), found


def test_empty_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "# nothing\n").startswith("p.yaml:1: the file is empty")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "\n- pipeline: shop\n").startswith("p.yaml:2: top level must be a mapping")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "sink: {}\n")
    assert found == "p.yaml:7: sink: unknown key; did you mean 'sinks'?"


def test_unknown_nested_key(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  linger: 5\n")
    assert found == "p.yaml:7: kafka.linger: unknown key; did you mean 'linger_ms'?"


def test_unknown_key_in_sink(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "sinks:\n  r:\n    url: sqlite:///r.db\n    name: other\n")
    assert found.startswith("p.yaml:10: sinks.r.name: unknown key"), found


def test_loader_owned_path_key_is_unknown(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "path: /etc/x.yaml\n" + MINIMAL).startswith("p.yaml:1: path: unknown key")


def test_wrong_type_tables(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("tables: [public.customers]", "tables: 5"))
    assert found == "p.yaml:4: source.tables: Input should be a valid list (got 5)"


def test_wrong_type_partitions(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + '  partitions: "x"\n')
    assert found.startswith("p.yaml:7: kafka.partitions: Input should be a valid integer"), found


def test_wrong_type_boolean_is_not_a_number(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  partitions: true\n")
    assert found.startswith("p.yaml:7: kafka.partitions:"), found


def test_out_of_range(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  partitions: 0\n")
    assert found.startswith("p.yaml:7: kafka.partitions: Input should be greater than or equal to 1"), found


def test_section_of_wrong_type(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("kafka:\n  bootstrap_servers: k:9092\n", "kafka: k:9092\n"))
    assert found.startswith("p.yaml:5: kafka: Input should be a valid dictionary"), found


def test_missing_required_key(tmp_path: Path) -> None:
    text = MINIMAL.replace("  bootstrap_servers: k:9092\n", "  linger_ms: 2\n")
    assert only_problem(tmp_path, text) == "p.yaml:5: kafka.bootstrap_servers: required key is missing"


def test_missing_top_level_key(tmp_path: Path) -> None:
    text = "\n# a comment\n" + MINIMAL.replace("kafka:\n  bootstrap_servers: k:9092\n", "")
    assert only_problem(tmp_path, text) == "p.yaml:3: kafka: required key is missing"


def test_missing_sink_url(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "sinks:\n  replica:\n    batch_size: 5\n")
    assert found == "p.yaml:8: sinks.replica.url: required key is missing"


def test_empty_tables(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("[public.customers]", "[]"))
    assert found.startswith("p.yaml:4: source.tables: List should have at least 1 item"), found


def test_duplicate_key(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "  partitions: 1\n  partitions: 2\n")
    assert found == "p.yaml:8: kafka.partitions: duplicate key 'partitions' (first at line 7)"


def test_duplicate_top_level_section(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "kafka:\n  bootstrap_servers: other:9092\n")
    assert found.startswith("p.yaml:7: kafka: duplicate key"), found


def test_bad_table_identifier(tmp_path: Path) -> None:
    text = MINIMAL.replace("  tables: [public.customers]\n", "  tables:\n    - public.customers\n    - order items\n")
    found = only_problem(tmp_path, text)
    assert found.startswith("p.yaml:6: source.tables[1]: invalid table name 'order items'"), found


@pytest.mark.parametrize(
    "name",
    ["a.b.c", "public.", '"unterminated', 'public.""', "x;drop", "a--b", "1abc", "select", "f()", "$x", "", "a b"],
)
def test_invalid_table_names(name: str) -> None:
    with pytest.raises(ValueError):
        TableRef.parse(name)


def test_duplicate_table(tmp_path: Path) -> None:
    text = MINIMAL.replace("  tables: [public.customers]\n", "  tables:\n    - public.customers\n    - Customers\n")
    found = only_problem(tmp_path, text)
    assert found == "p.yaml:6: source.tables[1]: duplicate table public.customers (same as source.tables[0])"


def test_bad_slot_name(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("  tables:", "  slot: Shop-Slot\n  tables:"))
    assert found.startswith("p.yaml:4: source.slot: slot name 'Shop-Slot' must be"), found


def test_slot_name_too_long(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL.replace("  tables:", f"  slot: {'s' * 64}\n  tables:"))[0].startswith("p.yaml:4: source.slot")


def test_bad_pipeline_name(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL.replace("pipeline: shop", "pipeline: 'my shop'"))
    assert found.startswith("p.yaml:1: pipeline: pipeline name 'my shop'"), found


def test_unsupported_version(tmp_path: Path) -> None:
    found = only_problem(tmp_path, "version: 2\n" + MINIMAL)
    assert found.startswith("p.yaml:1: version: unsupported version 2"), found


def test_unsupported_sink_scheme(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "sinks:\n  wh:\n    url: mysql://wh/shop\n")
    # Only the scheme is named: the rest of a URL may hold a password.
    assert found.startswith("p.yaml:9: sinks.wh.url: unsupported URL scheme 'mysql'"), found
    assert "sqlite:///" in found and "postgresql://" in found


def test_unknown_topic_placeholder(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + '  topic: "{pipeline}.{tbl}"\n')
    assert found.startswith("p.yaml:7: kafka.topic: unknown placeholder {tbl}"), found


def test_unknown_table_in_sink_renames(tmp_path: Path) -> None:
    text = MINIMAL + "sinks:\n  replica:\n    url: sqlite:///r.db\n    tables:\n      public.customers: c\n      public.nope: n\n"
    found = only_problem(tmp_path, text)
    assert found == "p.yaml:12: sinks.replica.tables: unknown table public.nope: not in source.tables"


def test_bad_table_identifier_in_sink_renames(tmp_path: Path) -> None:
    text = MINIMAL + "sinks:\n  replica:\n    url: sqlite:///r.db\n    tables:\n      a.b.c: n\n"
    found = only_problem(tmp_path, text)
    assert found.startswith("p.yaml:11: sinks.replica.tables: key 'a.b.c': invalid table name"), found


def test_target_name_collision(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, crm.customers]")
    found = only_problem(tmp_path, text + "sinks:\n  replica:\n    url: postgresql://r/db\n")
    assert found.startswith("p.yaml:8: sinks.replica.tables: tables public.customers and crm.customers both map to target table 'customers'")


def test_target_name_collision_is_case_insensitive_for_sqlite(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.orders]")
    text += "sinks:\n  replica:\n    url: sqlite:///r.db\n    tables:\n      public.orders: Customers\n"
    assert only_problem(tmp_path, text).startswith("p.yaml:11: sinks.replica.tables: tables public.customers and public.orders")
    # PostgreSQL keeps quoted names apart.
    assert load(tmp_path, text.replace("sqlite:///r.db", "postgresql://r/db")).target_table("replica", TableRef("public", "orders")) == "Customers"


def test_several_problems_reported_together_sorted_by_line(tmp_path: Path) -> None:
    text = """\
    pipeline: shop
    source:
      postgres: postgresql://x/y
      tables:
        - public.customers
        - bad name
      slot: Bad-Slot
    kafka:
      bootstrap_servers: ${NOPE}
      partitions: "x"
      linger: 3
    sinks:
      replica:
        url: mysql://x
      wh:
        url: sqlite:///w.db
        tables: {public.customers: t1, public.orders: t1}
    """
    found = problems(tmp_path, text, env={})
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == [6, 7, 9, 10, 11, 14], found
    assert found[2] == "p.yaml:9: environment variable NOPE is not set (used in kafka.bootstrap_servers)"


def test_unknown_sink_table_reported_with_field_errors_elsewhere(tmp_path: Path) -> None:
    text = MINIMAL + "  partitions: x\nsinks:\n  r:\n    url: sqlite:///r.db\n    tables: {public.nope: n}\n"
    found = problems(tmp_path, text)
    assert [p.split(": ")[0] for p in found] == ["p.yaml:7", "p.yaml:11"], found


# --------------------------------------------------------------------------------------------------
# Table names, topics, locations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref", "short"),
    [
        ("public.customers", TableRef("public", "customers"), "public.customers"),
        ("customers", TableRef("public", "customers"), "public.customers"),
        ("Sales.Orders", TableRef("sales", "orders"), "sales.orders"),
        ('public."Order Items"', TableRef("public", "Order Items"), 'public."Order Items"'),
        ('"Sales"."Orders"', TableRef("Sales", "Orders"), '"Sales"."Orders"'),
        ('"say ""hi"""', TableRef("public", 'say "hi"'), 'public."say ""hi"""'),
        ("public.order", TableRef("public", "order"), 'public."order"'),  # reserved word: quoted when printed
        ("  public . t$1 ", TableRef("public", "t$1"), "public.t$1"),
    ],
)
def test_table_ref_parse_and_str(text: str, ref: TableRef, short: str) -> None:
    assert TableRef.parse(text) == ref
    assert str(ref) == short
    assert TableRef.parse(str(ref)) == ref  # the short form reads back as the same table


def test_table_ref_quoted() -> None:
    assert TableRef("public", "Order Items").quoted() == '"public"."Order Items"'
    assert TableRef("public", 'a"b').quoted() == '"public"."a""b"'


def test_topic_naming(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL.replace("[public.customers]", """[public.customers, 'public."Order Items"', 'public."ÄÖ/x"']"""))
    assert cfg.topic_for(TableRef("public", "Order Items")) == "shop.public.Order_Items"
    assert cfg.topic_for(TableRef("public", "ÄÖ/x")) == "shop.public.___x"
    assert kafka_topic_name("x" * 300) == "x" * 249


def test_topic_collision(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "  tables: [public.customers]\n", '  tables:\n    - public."Order Items"\n    - public."Order/Items"\n'
    )
    found = only_problem(tmp_path, text)
    assert found == (
        "p.yaml:6: kafka.topic: tables public.\"Order Items\" and public.\"Order/Items\" both map to topic "
        "'shop.public.Order_Items'"
    )


def test_topic_collision_without_table_placeholder(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.orders]") + '  topic: "{pipeline}"\n'
    assert only_problem(tmp_path, text).startswith("p.yaml:4: kafka.topic: tables public.customers and public.orders")


def test_topic_collision_with_the_pipelines_own_topics(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.transactions]") + '  topic: "{pipeline}.{table}"\n'
    assert only_problem(tmp_path, text) == (
        "p.yaml:4: kafka.topic: topic 'shop.transactions' for public.transactions collides with the pipeline's "
        "own topic 'shop.transactions'"
    )


def test_topic_collision_dot_vs_underscore(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", """[public.a_b, 'public."a.b"']""")
    assert "Kafka treats '.' and '_'" in only_problem(tmp_path, text)


def test_where_and_table_location(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
        pipeline: shop
        source:
          postgres: postgresql://x/y
          tables:
            - public.customers
            - 'public."Order Items"'
        kafka:
          bootstrap_servers: k:9092
        sinks:
          replica:
            url: sqlite:///r.db
            tables:
              'public."Order Items"': items
        """,
    )
    p = f"{tmp_path}/p.yaml"
    assert cfg.where("source", "tables", 1) == f"{p}:6"
    assert cfg.where(("source", "tables", 1)) == f"{p}:6"
    assert cfg.where("source", "postgres") == f"{p}:3"
    assert cfg.where("sinks", "replica") == f"{p}:10"
    assert cfg.where("source", "slot") == f"{p}:2"  # defaulted: falls back to its section
    assert cfg.table_location(TableRef("public", "Order Items")) == f"{p}:6"
    assert cfg.table_location(TableRef("public", "Order Items"), sink="replica") == f"{p}:13"
    assert cfg.table_location(TableRef("public", "customers"), sink="replica") == f"{p}:5"


def test_messages_use_the_file_name_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL + "  partitions: 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_pipeline("p.yaml", env={})
    assert info.value.problems[0].startswith("p.yaml:7: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.problems[0]


# --------------------------------------------------------------------------------------------------
# sqlite paths and load_pipeline_text
# --------------------------------------------------------------------------------------------------


def test_sqlite_relative_to_yaml_dir_not_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "conf"
    (sub / "data").mkdir(parents=True)  # a missing directory is an error (see below)
    path = write(sub, MINIMAL + "sinks:\n  rel:\n    url: sqlite:///data/rel.db\n  abs:\n    url: sqlite:////var/lib/abs.db\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(Path("conf") / "p.yaml", env={})
    assert cfg.path == path
    assert cfg.sinks["rel"].sqlite_path == sub / "data" / "rel.db"
    assert cfg.sinks["abs"].sqlite_path == Path("/var/lib/abs.db")


def test_sqlite_url_without_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path, MINIMAL + "sinks:\n  r:\n    url: sqlite:///\n").startswith("p.yaml:9: sinks.r.url: sqlite URL needs a file")


def test_load_pipeline_text(tmp_path: Path) -> None:
    text = MINIMAL + "sinks:\n  r:\n    url: sqlite:///r.db\n"
    cfg = load_pipeline_text(text, "shop.yaml", env={}, base_dir=tmp_path)
    assert cfg.path == tmp_path / "shop.yaml"
    assert cfg.sinks["r"].sqlite_path == tmp_path / "r.db"
    assert cfg.where("sinks", "r") == "shop.yaml:8"
    with pytest.raises(ConfigError) as info:
        load_pipeline_text(MINIMAL + "  partitions: x\n", env={})
    assert info.value.problems[0].startswith("<string>:7: kafka.partitions")


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    sinks = """\
        sinks:
          a: &base
            url: postgresql://r/db
            batch_size: 10
          b:
            <<: *base
            batch_size: 20
        """
    cfg = load(tmp_path, MINIMAL + textwrap.dedent(sinks))
    assert (cfg.sinks["b"].url, cfg.sinks["b"].batch_size) == ("postgresql://r/db", 20)


# --------------------------------------------------------------------------------------------------
# Models built in code still enforce cross-section rules
# --------------------------------------------------------------------------------------------------


def test_direct_construction_validates_cross_rules(tmp_path: Path) -> None:
    cfg = PipelineConfig(
        pipeline="shop",
        source={"postgres": "postgresql://x/y", "tables": ["customers"]},
        kafka={"bootstrap_servers": "k:9092"},
        sinks={"r": {"name": "r", "url": "sqlite:///r.db"}},
        path=tmp_path / "x.yaml",
    )
    assert cfg.source.slot == "cdc_shop"
    assert cfg.sinks["r"].sqlite_path == tmp_path / "r.db"
    assert cfg.where("source") == str(tmp_path / "x.yaml")  # no line information
    with pytest.raises(ValueError, match="unknown table public.nope"):
        PipelineConfig(
            pipeline="shop",
            source={"postgres": "postgresql://x/y", "tables": ["customers"]},
            kafka={"bootstrap_servers": "k:9092"},
            sinks={"r": {"name": "r", "url": "sqlite:///r.db", "tables": {"nope": "x"}}},
            path=tmp_path / "x.yaml",
        )


SUBSCRIBED = """\
pipeline: shop
source:
  postgres: postgresql://cdc@db.internal:5432/shop
  tables: [public.customers, 'public."Order Items"', audit.log]
kafka:
  bootstrap_servers: k:9092
sinks:
  slim:
    url: sqlite:///slim.db
"""


def test_a_sink_subscribes_to_some_tables_and_columns(tmp_path):
    cfg = load(tmp_path, SUBSCRIBED + """\
    only: [public.customers, 'public."Order Items"']
    tables:
      public.customers: {name: people, columns: [email, country]}
      'public."Order Items"': items
""")
    slim = cfg.sinks["slim"]
    customers, items, audit = (TableRef("public", "customers"), TableRef("public", "Order Items"),
                               TableRef("audit", "log"))
    assert [slim.subscribes(t) for t in (customers, items, audit)] == [True, True, False]
    assert slim.target_table(customers) == "people" and slim.target_table(items) == "items"
    assert slim.kept_columns(customers) == {"email", "country"} and slim.kept_columns(items) is None


def test_a_subscription_to_unknown_or_unsubscribed_tables_is_an_error_at_its_line(tmp_path):
    path = write(tmp_path, SUBSCRIBED + """\
    only: [public.customers, public.nope]
    tables:
      'public."Order Items"': {columns: [sku]}
""")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    problems = "\n".join(err.value.problems)
    assert f"{path}:10: sinks.slim.only: unknown table public.nope: not in source.tables" in problems, problems
    assert f'{path}:12: sinks.slim.tables: table public."Order Items" is not in sinks.slim.only' in problems, problems


def laughs(levels: int) -> str:
    """A "billion laughs" YAML head: each level lists the one before nine times (9**levels values)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_nested_aliases_are_refused_with_file_and_line(tmp_path: Path) -> None:
    # 9**6 values: small enough to expand in a test, yet far beyond any pipeline.
    text = laughs(6) + "pipeline: shop\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline_text(text, "p.yaml", env={})
    (problem,) = caught.value.problems
    assert problem.startswith("p.yaml:") and "aliases expand to more than" in problem, problem
    line = int(problem.split(":")[1])
    assert 1 <= line <= 6, problem  # one of the anchors


def test_a_file_larger_than_a_pipeline_can_be_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("pipeline: shop\n# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    assert caught.value.problems[0].startswith(f"{path}:1: the file has "), caught.value.problems


@pytest.mark.parametrize("written, meant", [("{keep_lst: 4}", "keep_last"), ("hsh", "hash"), ("{keep_frist: 1}", "keep_first")])
def test_a_misspelt_mask_gets_a_did_you_mean(written: str, meant: str) -> None:
    text = textwrap.dedent(f"""\
        pipeline: shop
        source:
          postgres: postgresql://cdc@db/shop
          tables: [public.customers]
        kafka:
          bootstrap_servers: k:9092
        privacy:
          tables:
            public.customers:
              mask:
                phone: {written}
        """)
    with pytest.raises(ConfigError) as caught:
        load_pipeline_text(text, "p.yaml", env={})
    (problem,) = caught.value.problems
    assert problem.startswith("p.yaml:11: ") and f"did you mean {meant!r}?" in problem, problem


def test_topic_collision_with_the_schema_changes_topic(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.schema_changes]") + '  topic: "{pipeline}.{table}"\n'
    assert only_problem(tmp_path, text) == (
        "p.yaml:4: kafka.topic: topic 'shop.schema_changes' for public.schema_changes collides with the pipeline's "
        "own topic 'shop.schema_changes'"
    )


def test_topic_collision_with_the_schemas_topic(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.schemas]") + '  topic: "{pipeline}.{table}"\n'
    assert only_problem(tmp_path, text) == (
        "p.yaml:4: kafka.topic: topic 'shop.schemas' for public.schemas collides with the pipeline's own topic 'shop.schemas'"
    )


def test_topic_collision_with_the_verify_topic(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.customers]", "[public.customers, public.verify]") + '  topic: "{pipeline}.{table}"\n'
    assert only_problem(tmp_path, text) == (
        "p.yaml:4: kafka.topic: topic 'shop.verify' for public.verify collides with the pipeline's own topic 'shop.verify'"
    )
