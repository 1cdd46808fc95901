"""Row filters: a SQL boolean expression over a row's columns, in PostgreSQL syntax (parsed with
sqlglot), evaluated the way a publication's WHERE evaluates it, and printed for one.

cdc evaluates a deliberate subset that gives the same answer in Python as in PostgreSQL: AND, OR,
NOT, comparisons, IS [NOT] NULL / TRUE / FALSE, IN (list), BETWEEN, LIKE, literals and column names,
over columns of kinds whose order does not depend on a collation or a type's own operators. A row
is published only when the filter is true (false and NULL both drop it), as PostgreSQL does.
Anything else is refused when the pipeline is loaded or started, never evaluated approximately.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from cdc.sqlnames import ascii_lower

Row = Mapping[str, Any]
Evaluator = Callable[[Row], Any]

_NUMERIC = frozenset({"smallint", "integer", "bigint", "numeric", "real", "double"})
# Kinds a filter may name. Text compares by collation in PostgreSQL, so only = <> IN LIKE on it.
FILTER_KINDS = _NUMERIC | {"boolean", "text", "uuid"}

_ALLOWED = (
    exp.And, exp.Or, exp.Not, exp.Paren, exp.Is, exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE,
    exp.In, exp.Between, exp.Like, exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Neg,
)
_ORDERING = (exp.LT, exp.LTE, exp.GT, exp.GTE, exp.Between)
_PG_NAMES = {exp.ILike: "ILIKE", exp.Anonymous: "a function call", exp.Cast: "a cast", exp.Add: "arithmetic",
             exp.Sub: "arithmetic", exp.Mul: "arithmetic", exp.Div: "arithmetic", exp.Subquery: "a subquery",
             exp.Select: "a subquery"}


class FilterError(ValueError):
    """The filter cannot be used; the message is one line and names no row value."""


class MissingColumn(KeyError):
    """The row lacks a column the filter names (a before-image with only the key, say)."""


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
                raise FilterError(f"uses {what}, which cdc cannot evaluate the way PostgreSQL does; "
                                  "allowed: AND OR NOT, = <> < <= > >=, IS [NOT] NULL/TRUE/FALSE, IN (...), BETWEEN, LIKE")
            if isinstance(node, exp.In) and (node.args.get("query") or node.args.get("field") or node.args.get("unnest")):
                raise FilterError("IN takes a list of literals here, not a subquery")
            if isinstance(node, exp.Like) and node.args.get("escape"):
                raise FilterError("LIKE ... ESCAPE is not supported")
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
        """The filter as PostgreSQL SQL, for a publication's WHERE (identifiers quoted)."""
        return self.tree.sql(dialect="postgres")

    def bind(self, kinds: Mapping[str, tuple[str, bool]]) -> Callable[[Row], bool]:
        """A predicate over rows (JSON value forms) for columns of the given (kind, is_array).

        Raises FilterError when a column is unknown or of a kind the filter cannot compare."""
        for name in self.columns:
            if name not in kinds:
                raise FilterError(f"names column {name}, which the table does not have")
            kind, array = kinds[name]
            if array or kind not in FILTER_KINDS:
                raise FilterError(f"names column {name} of kind {kind}{'[]' if array else ''}; "
                                  f"filters may compare columns of kinds {', '.join(sorted(FILTER_KINDS))}")
        evaluate = _Compiler(kinds).boolean(self.tree)
        return lambda row: evaluate(row) is True


# ---- compilation to closures --------------------------------------------------------------------

_LITERAL = "literal"


def _num(value: Any) -> tuple[int, Any]:
    """A sortable number: PostgreSQL orders NaN above every other value and NaN = NaN."""
    d = value if isinstance(value, (Decimal, float, int)) and not isinstance(value, bool) else Decimal(str(value))
    if isinstance(d, float):
        return (1, 0) if d != d else (0, d)
    if isinstance(d, Decimal) and d.is_nan():
        return (1, 0)
    return (0, d)


def _column_value(kind: str) -> Callable[[Any], Any]:
    if kind in _NUMERIC:
        return _num
    return lambda v: v


def _coerce_literal(value: Any, kind: str, where: str) -> Any:
    """A literal compared with a column of `kind`, as PostgreSQL would read it for that type."""
    if value is None:
        return None
    if kind in _NUMERIC:
        if isinstance(value, bool):
            raise FilterError(f"{where}: a boolean is compared with a {kind} column")
        try:
            d = Decimal(str(value).strip())
        except InvalidOperation:
            raise FilterError(f"{where}: {value!r} is not a valid {kind}") from None
        if kind in ("smallint", "integer", "bigint") and d.is_finite() and d != d.to_integral_value() and isinstance(value, str):
            raise FilterError(f"{where}: {value!r} is not a valid {kind}")
        return _num(d)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if not isinstance(value, str):  # PostgreSQL has no boolean = integer
            raise FilterError(f"{where}: a boolean column is compared with a number")
        text = value.strip().lower()
        if text in ("t", "true", "y", "yes", "on", "1"):
            return True
        if text in ("f", "false", "n", "no", "off", "0"):
            return False
        raise FilterError(f"{where}: {value!r} is not a valid boolean")
    if not isinstance(value, str) or isinstance(value, bool):
        raise FilterError(f"{where}: a {kind} column is compared with a non-string literal")
    if kind == "uuid":
        import uuid

        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise FilterError(f"{where}: {value!r} is not a valid uuid") from None
    return value


def _like_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):  # PostgreSQL's default LIKE escape
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


class _Compiler:
    def __init__(self, kinds: Mapping[str, tuple[str, bool]]):
        self.kinds = kinds

    def compile(self, node: exp.Expression) -> tuple[Evaluator, str]:
        """(evaluator, kind): kind is a column kind, 'boolean', or 'literal' (value known now)."""
        if isinstance(node, exp.Paren):
            return self.compile(node.this)
        if isinstance(node, exp.Column):
            name = node.this.this
            kind = self.kinds[name][0]
            convert = _column_value(kind)

            def column(row: Row) -> Any:
                try:
                    value = row[name]
                except KeyError:
                    raise MissingColumn(name) from None
                return None if value is None else convert(value)

            return column, kind
        if isinstance(node, (exp.Literal, exp.Boolean, exp.Null, exp.Neg)):
            value = self.literal(node)
            return (lambda row: value), _LITERAL
        if isinstance(node, (exp.And, exp.Or)):
            left, right = self.boolean(node.this), self.boolean(node.expression)
            if isinstance(node, exp.And):
                def both(row: Row) -> Any:
                    a, b = left(row), right(row)
                    if a is False or b is False:
                        return False
                    return None if a is None or b is None else True
                return both, "boolean"

            def either(row: Row) -> Any:
                a, b = left(row), right(row)
                if a is True or b is True:
                    return True
                return None if a is None or b is None else False
            return either, "boolean"
        if isinstance(node, exp.Not):
            inner = self.boolean(node.this)
            return (lambda row: None if (v := inner(row)) is None else not v), "boolean"
        if isinstance(node, exp.Is):
            target = node.expression
            if isinstance(target, exp.Null):
                operand, _ = self.compile(node.this)
                return (lambda row: operand(row) is None), "boolean"
            if isinstance(target, exp.Boolean):
                operand = self.boolean(node.this)
                wanted = self.literal(target)
                return (lambda row: operand(row) is wanted), "boolean"
            raise FilterError("IS takes NULL, TRUE or FALSE")
        if isinstance(node, (exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE)):
            (left, right), _ = self.operands(node, [node.this, node.expression])
            compare = {exp.EQ: lambda a, b: a == b, exp.NEQ: lambda a, b: a != b, exp.LT: lambda a, b: a < b,
                       exp.LTE: lambda a, b: a <= b, exp.GT: lambda a, b: a > b,
                       exp.GTE: lambda a, b: a >= b}[type(node)]

            def comparison(row: Row) -> Any:
                a, b = left(row), right(row)
                return None if a is None or b is None else compare(a, b)
            return comparison, "boolean"
        if isinstance(node, exp.Between):
            (value, low, high), _ = self.operands(node, [node.this, node.args["low"], node.args["high"]])

            def between(row: Row) -> Any:
                v, lo, hi = value(row), low(row), high(row)
                ge = None if v is None or lo is None else v >= lo
                le = None if v is None or hi is None else v <= hi
                if ge is False or le is False:
                    return False
                return None if ge is None or le is None else True
            return between, "boolean"
        if isinstance(node, exp.In):
            evaluators, _ = self.operands(node, [node.this, *node.expressions])
            value, items = evaluators[0], evaluators[1:]

            def member(row: Row) -> Any:
                v = value(row)
                if v is None:
                    return None
                found = [item(row) for item in items]
                if any(f is not None and f == v for f in found):
                    return True
                return None if any(f is None for f in found) else False
            return member, "boolean"
        if isinstance(node, exp.Like):
            operand, kind = self.compile(node.this)
            pattern = node.expression
            if kind != "text" or not (isinstance(pattern, exp.Literal) and pattern.is_string):
                raise FilterError("LIKE compares a text column with a string literal")
            regex = _like_regex(pattern.this)
            return (lambda row: None if (v := operand(row)) is None else regex.fullmatch(v) is not None), "boolean"
        raise FilterError(f"uses {type(node).__name__}, which cdc cannot evaluate")

    def boolean(self, node: exp.Expression) -> Evaluator:
        evaluate, kind = self.compile(node)
        if kind not in ("boolean", _LITERAL):
            raise FilterError(f"{node.sql(dialect='postgres')} is not a boolean")
        return evaluate

    def literal(self, node: exp.Expression) -> Any:
        if isinstance(node, exp.Null):
            return None
        if isinstance(node, exp.Boolean):
            return bool(node.this)
        if isinstance(node, exp.Neg):
            inner = node.this
            if not (isinstance(inner, exp.Literal) and not inner.is_string):
                raise FilterError("'-' applies to number literals only")
            return Decimal("-" + inner.this)
        if node.is_string:
            return node.this
        return Decimal(node.this)

    def operands(self, node: exp.Expression, parts: list[exp.Expression]) -> tuple[list[Evaluator], str]:
        """Compile operands that are compared with each other; literals take the columns' type."""
        compiled = [self.compile(p) for p in parts]
        kinds = {k for _, k in compiled if k != _LITERAL}
        where = node.sql(dialect="postgres")
        if len(kinds) > 1 and not kinds <= _NUMERIC:
            raise FilterError(f"{where}: compares values of kinds {', '.join(sorted(kinds))}")
        kind = next(iter(kinds)) if len(kinds) == 1 else ("numeric" if kinds else _LITERAL)
        if isinstance(node, _ORDERING) and kind in ("text",):
            raise FilterError(f"{where}: ordering text depends on the collation; use =, <>, IN or LIKE on text")
        out: list[Evaluator] = []
        for (evaluate, k), part in zip(compiled, parts):
            if k == _LITERAL and kind != _LITERAL:
                value = _coerce_literal(evaluate({}), kind, where)
                out.append(lambda row, value=value: value)
            elif k == _LITERAL:
                value = evaluate({})
                value = _num(value) if isinstance(value, Decimal) else value
                out.append(lambda row, value=value: value)
            else:
                out.append(evaluate)
        return out, kind
