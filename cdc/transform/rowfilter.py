"""Row filters: a SQL boolean expression over a row's columns, in PostgreSQL syntax (parsed with
sqlglot), evaluated the way PostgreSQL evaluates it, and printed for a publication or a SELECT.

Where PostgreSQL can decide, it does: the publication's WHERE (pushdown) and the snapshot's chunk
SELECT carry the filter. The connector decides only what PostgreSQL cannot decide for it (streamed
changes without pushdown, the before-image of a row moving in or out), and then it resolves every
comparison the way PostgreSQL's parser does (operator resolution, casts, IN lists, literal input
functions) for the types below. What it cannot reproduce exactly is refused when the pipeline is
validated or started, never evaluated approximately:

- types: smallint, integer, bigint, numeric, real, double precision, text, varchar, char(n),
  boolean, date, timestamp, timestamptz, uuid (domains over them too); no arrays, no other types;
- operators: AND OR NOT, = <> < <= > >=, IS [NOT] NULL/TRUE/FALSE, [NOT] IN (...), [NOT] BETWEEN,
  [NOT] LIKE on text kinds with a literal pattern; no functions, casts or arithmetic;
- text kinds compare for (in)equality only: their order depends on the collation;
- literals are read by a strict subset of each type's input function (ISO dates and times, a
  timestamptz literal with an explicit offset, canonical uuids, plain numbers);
- columns of different types are compared only within integers, numeric and integers, floats and
  integers, text and varchar, date and timestamp.

A row is published only when the filter is true (false and NULL both drop it), as PostgreSQL does.

This module parses and checks a filter (:class:`RowFilter`); the types and literal values it compares
are cdc.transform.filter_values', its evaluation is cdc.transform.filter_compiler's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from cdc.sqlnames import ascii_lower
from cdc.transform.filter_compiler import Compiler
from cdc.transform.filter_values import ACCEPTED_TYPES, Evaluator, FilterError, Row, filter_type

# What a filter may be made of: anything else is refused when it is parsed.
_ALLOWED = (
    exp.And, exp.Or, exp.Not, exp.Paren, exp.Is, exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE,
    exp.In, exp.Between, exp.Like, exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Neg,
)
_PG_NAMES = {exp.ILike: "ILIKE", exp.Anonymous: "a function call", exp.Cast: "a cast", exp.Add: "arithmetic",
             exp.Sub: "arithmetic", exp.Mul: "arithmetic", exp.Div: "arithmetic", exp.Subquery: "a subquery",
             exp.Select: "a subquery", exp.NullSafeNEQ: "IS DISTINCT FROM", exp.NullSafeEQ: "IS NOT DISTINCT FROM"}


@dataclass(frozen=True)
class RowFilter:
    text: str  # as written in the pipeline file
    tree: exp.Expression  # column names folded the PostgreSQL way and quoted
    columns: tuple[str, ...]  # column names it reads

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        if not isinstance(text, str) or not text.strip():
            raise FilterError("must be a non-empty SQL boolean expression")
        try:
            tokens = sqlglot.tokenize(text, read="postgres")
            if any(t.token_type == TokenType.SEMICOLON for t in tokens) or any(t.comments for t in tokens):
                raise FilterError("must be one expression, without ';' or comments")
            tree = sqlglot.parse_one(text, read="postgres")
        except (ParseError, TokenError) as exc:
            at = next((f" (column {e['col']})" for e in getattr(exc, "errors", []) if e.get("col")), "")
            raise FilterError(f"does not parse as a PostgreSQL expression{at}") from None
        columns: list[str] = []
        for node in tree.walk():
            if not isinstance(node, _ALLOWED):
                what = next((n for t, n in _PG_NAMES.items() if isinstance(node, t)), None)
                if what is None:
                    what = "a function call" if isinstance(node, exp.Func) else type(node).__name__
                raise FilterError(f"uses {what}, which cdc cannot evaluate the way PostgreSQL does; allowed: AND OR "
                                  "NOT, = <> < <= > >=, IS [NOT] NULL/TRUE/FALSE, IN (...), BETWEEN, LIKE")
            if isinstance(node, exp.In) and (node.args.get("query") or node.args.get("field") or node.args.get("unnest")):
                raise FilterError("IN takes a list of values here, not a subquery")
            if isinstance(node, exp.Like) and node.args.get("escape"):
                raise FilterError("LIKE ... ESCAPE is not supported")
            if isinstance(node, exp.Between) and node.args.get("symmetric"):
                raise FilterError("BETWEEN SYMMETRIC is not supported")
            if isinstance(node, exp.Column):
                if node.table or not isinstance(node.this, exp.Identifier):
                    raise FilterError(f"column {node.sql(dialect='postgres')} must be a bare column name")
                ident = node.this
                if not ident.quoted:  # PostgreSQL folds unquoted names
                    ident.set("this", ascii_lower(ident.this))
                    ident.set("quoted", True)
                if ident.this not in columns:
                    columns.append(ident.this)
        if isinstance(tree, (exp.Literal, exp.Null, exp.Neg)):
            raise FilterError("must be a boolean expression (a comparison, IS, IN, ...)")
        return cls(text, tree, tuple(columns))

    def sql(self) -> str:
        """The filter as PostgreSQL SQL, for a publication's WHERE or a SELECT (identifiers quoted)."""
        return self.tree.sql(dialect="postgres")

    def renamed(self, names: Mapping[str, str]) -> RowFilter:
        """The same filter over columns renamed old -> new (a column the policy follows by identity)."""
        if not any(names.get(c, c) != c for c in self.columns):
            return self
        tree = self.tree.copy()
        for ident in tree.find_all(exp.Identifier):
            ident.set("this", names.get(ident.this, ident.this))
        return RowFilter(self.text, tree, tuple(names.get(c, c) for c in self.columns))

    def evaluator(self, types: Mapping[str, tuple[str, bool]]) -> Evaluator:
        """The filter's three-valued value (True, False, None for NULL) over rows in their JSON value
        forms, for columns of the given (format_type, is_array).

        Raises FilterError when a column is unknown, of a type filters may not name, or compared in a
        way whose PostgreSQL semantics cdc does not reproduce exactly."""
        column_types = {}
        for name in self.columns:
            if name not in types:
                raise FilterError(f"names column {name}, which the table does not have")
            type_name, array = types[name]
            resolved = None if array else filter_type(type_name)
            if resolved is None:
                raise FilterError(f"names column {name} of type {type_name}; filters may compare columns of types "
                                  f"{ACCEPTED_TYPES}")
            column_types[name] = resolved
        return Compiler(column_types).boolean(self.tree)

    def bind(self, types: Mapping[str, tuple[str, bool]]) -> Callable[[Row], bool]:
        """A predicate over rows: whether the filter is true (see evaluator)."""
        evaluate = self.evaluator(types)
        return lambda row: evaluate(row) is True
