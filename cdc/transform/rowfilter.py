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
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from cdc.sqlnames import ascii_lower

Row = Mapping[str, Any]
Evaluator = Callable[[Row], Any]  # -> True, False or None (SQL NULL)

# format_type() spellings (typmods removed) -> the PostgreSQL type the filter compares
_FILTER_TYPES = {
    "smallint": "int2", "integer": "int4", "bigint": "int8", "numeric": "numeric", "real": "float4",
    "double precision": "float8", "text": "text", "character varying": "varchar", "character": "bpchar",
    "boolean": "bool", "date": "date", "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz", "uuid": "uuid",
}
_SQL_NAMES = {v: k for k, v in _FILTER_TYPES.items()} | {"varchar": "varchar", "bpchar": "char(n)"}
ACCEPTED_TYPES = ("smallint, integer, bigint, numeric, real, double precision, text, varchar, char(n), boolean, "
                  "date, timestamp, timestamptz, uuid")
_INTS = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
_FLOATS = ("float4", "float8")
_NUMBERS = frozenset({*_INTS, "numeric", *_FLOATS})
_STRINGS = frozenset({"text", "varchar", "bpchar"})
_ORDERED = _NUMBERS | {"bool", "date", "timestamp", "timestamptz", "uuid"}
UNKNOWN = "unknown"  # a quoted literal (or NULL): it takes the type of what it is compared with
BOOL = "bool"

_ALLOWED = (
    exp.And, exp.Or, exp.Not, exp.Paren, exp.Is, exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE,
    exp.In, exp.Between, exp.Like, exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Neg,
)
_COMPARISONS = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">="}
_PG_NAMES = {exp.ILike: "ILIKE", exp.Anonymous: "a function call", exp.Cast: "a cast", exp.Add: "arithmetic",
             exp.Sub: "arithmetic", exp.Mul: "arithmetic", exp.Div: "arithmetic", exp.Subquery: "a subquery",
             exp.Select: "a subquery", exp.NullSafeNEQ: "IS DISTINCT FROM", exp.NullSafeEQ: "IS NOT DISTINCT FROM"}


class FilterError(ValueError):
    """The filter cannot be used; the message is one line and names no row value."""


class MissingColumn(KeyError):
    """The row lacks a column the filter names (a before-image with only the key, say)."""


def filter_type(format_type: str) -> str | None:
    """The type a filter compares a column of this format_type() as, None when filters may not name it."""
    return _FILTER_TYPES.get(re.sub(r"\(\d+(,\d+)?\)", "", format_type))


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
        return _Compiler(column_types).boolean(self.tree)

    def bind(self, types: Mapping[str, tuple[str, bool]]) -> Callable[[Row], bool]:
        """A predicate over rows: whether the filter is true (see evaluator)."""
        evaluate = self.evaluator(types)
        return lambda row: evaluate(row) is True


# ---- values: literals read as each type's input function reads them, column values as published --

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "+infinity": "Infinity", "-infinity": "-Infinity",
                  "inf": "Infinity", "+inf": "Infinity", "-inf": "-Infinity"}
_NUMERIC_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "+infinity": "Infinity", "-infinity": "-Infinity"}
_BOOLS = {"t": True, "true": True, "y": True, "yes": True, "on": True, "1": True,
          "f": False, "false": False, "n": False, "no": False, "off": False, "0": False}
_UUID = re.compile(r"([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})")
# ISO dates and times as cdc publishes them and PostgreSQL prints them (BC, years past 9999, offsets)
_DATETIME = re.compile(r"(\d{4,})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,6}))?)?)?"
                       r"(Z|[+-]\d\d(?::?\d\d)?)?( BC)?")
_DAY_US = 86_400_000_000


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, for any (astronomical) year."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _instant(text: str, literal: str | None = None) -> tuple:
    """A sortable key of a date, timestamp or timestamptz text: (-1,) -infinity, (1,) infinity,
    (0, microseconds since 1970-01-01 UTC) otherwise; a date is its midnight.

    `literal` is the type a literal is read as: then only the forms PostgreSQL reads the same way
    whatever the session's DateStyle and TimeZone are accepted."""
    lowered = text.strip().lower() if literal else text
    if lowered in ("infinity", "+infinity"):
        return (1,)
    if lowered == "-infinity":
        return (-1,)
    m = _DATETIME.fullmatch(text.strip() if literal else text)
    if m is None:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, offset, bc = m.groups()
    if literal:
        if len(year) != 4 or bc or (literal == "date" and (hour or offset)) or (literal == "timestamp" and offset) \
                or (literal == "timestamptz" and not (hour and offset)):
            raise ValueError(text)
    y, mo, d = int(year), int(month), int(day)
    if y == 0 or not 1 <= mo <= 12 or not 1 <= d <= _days_in_month(y, mo):
        raise ValueError(text)
    h, mi, s = int(hour or 0), int(minute or 0), int(second or 0)
    if h > 23 or mi > 59 or s > 59:
        raise ValueError(text)
    us = int((fraction or "").ljust(6, "0"))
    if bc:
        y = 1 - y
    shift = 0
    if offset and offset != "Z":
        digits = offset[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:] or 0)
        if oh > 15 or om > 59:
            raise ValueError(text)
        shift = (oh * 60 + om) * 60_000_000 * (1 if offset[0] == "+" else -1)
    return (0, _days_from_civil(y, mo, d) * _DAY_US + ((h * 60 + mi) * 60 + s) * 1_000_000 + us - shift)


def _float32(value: float | Decimal | int) -> float:
    """The real (float4) nearest to `value`, ties to even, as strtof and C casts round; as a float.

    Exact for every decimal: the candidate from a double is checked against its neighbours."""
    if isinstance(value, float) and value != value:
        return value
    exact = Decimal(value) if not isinstance(value, Decimal) else value
    if exact.is_infinite():
        return float(exact)
    if abs(float(exact)) == float("inf"):
        raise ValueError("out of range for type real")
    try:
        guess = struct.unpack("<f", struct.pack("<f", float(exact)))[0]
    except OverflowError:
        raise ValueError("out of range for type real") from None
    bits = struct.unpack("<i", struct.pack("<f", guess))[0]
    best = None
    for candidate_bits in (bits - 1, bits, bits + 1):
        try:
            candidate = struct.unpack("<f", struct.pack("<i", candidate_bits))[0]
        except struct.error:
            continue
        if candidate != candidate or candidate in (float("inf"), float("-inf")):
            continue
        distance = abs(Decimal(candidate) - exact)
        even = candidate_bits % 2 == 0
        if best is None or distance < best[0] or (distance == best[0] and even):
            best = (distance, candidate)
    assert best is not None
    return best[1]


def _float_key(value: float) -> tuple:
    """PostgreSQL orders NaN above every float (infinity too) and NaN = NaN; -0 = 0."""
    return (1, 0.0) if value != value else (0, value)


def _numeric_key(value: Decimal) -> tuple:
    return (1, Decimal(0)) if value.is_nan() else (0, value)


def _parse_float(text: str, type_name: str) -> float:
    """float4in / float8in, for the forms they read the same way in every PostgreSQL version."""
    stripped = text.strip()
    special = _FLOAT_SPECIAL.get(stripped.lower())
    if special is not None:
        return float(special)
    if not _NUMBER.fullmatch(stripped):
        raise ValueError(text)
    return _to_float(Decimal(stripped), type_name)


def _to_float(value: Decimal, type_name: str) -> float:
    """A number converted to real or double precision, refusing what PostgreSQL reports out of range."""
    if not value.is_finite():
        return float(value)
    result = _float32(value) if type_name == "float4" else float(value)
    if result in (float("inf"), float("-inf")) or (result == 0 and value != 0):
        raise ValueError(f"out of range for type {'real' if type_name == 'float4' else 'double precision'}")
    return result


def parse_input(text: str, type_name: str) -> Any:
    """A quoted literal read as `type_name`'s input function reads it, in the value form comparisons
    use (see _Compiler); ValueError when PostgreSQL would refuse it or might read it differently."""
    if type_name in _INTS:
        if not _INTEGER.fullmatch(text.strip()):
            raise ValueError(text)
        value = int(text)
        low, high = _INTS[type_name]
        if not low <= value <= high:
            raise ValueError(f"out of range for type {type_name}")
        return value
    if type_name == "numeric":
        stripped = text.strip()
        special = _NUMERIC_SPECIAL.get(stripped.lower())
        if special is not None:
            return Decimal(special)
        if not _NUMBER.fullmatch(stripped):
            raise ValueError(text)
        return Decimal(stripped)
    if type_name in _FLOATS:
        return _parse_float(text, type_name)
    if type_name == "bool":
        return _BOOLS[text.strip().lower()]  # KeyError is a LookupError, turned into a refusal below
    if type_name in ("date", "timestamp", "timestamptz"):
        return _instant(text, literal=type_name)
    if type_name == "uuid":
        m = _UUID.fullmatch(text.lower())
        if m is None or (("-" in text) and text.count("-") != 4):
            raise ValueError(text)
        return "-".join(m.groups())
    if type_name == "bpchar":
        return text.rstrip(" ")  # bpchar's comparisons ignore trailing spaces
    return text  # text, varchar


def column_value(type_name: str) -> Callable[[Any], Any]:
    """A column's value as cdc publishes it (cdc.source.postgres.values) -> the comparison form."""
    if type_name in _INTS:
        return int  # bigint beyond 2^53 travels as a string
    if type_name == "numeric":
        return Decimal
    if type_name == "float8":
        return float  # "NaN", "Infinity" and "-Infinity" travel as strings
    if type_name == "float4":
        return lambda v: _float32(float(v))
    if type_name == "bpchar":
        return lambda v: v.rstrip(" ")
    if type_name in ("date", "timestamp", "timestamptz"):
        return _instant
    return lambda v: v  # text, varchar, bool, uuid (printed lower case, canonical)


# ---- compilation to closures, with PostgreSQL's operator resolution --------------------------------

_RANK = {"int2": 0, "int4": 1, "int8": 2, "numeric": 3, "float4": 4, "float8": 5}  # implicit casts go up


@dataclass(frozen=True)
class _Operand:
    evaluate: Evaluator  # -> the value in its own type's comparison form, None for NULL
    type: str  # a PostgreSQL type of _FILTER_TYPES' values, UNKNOWN (quoted literal, NULL) or BOOL
    column: bool = False
    literal: Any = None  # a literal's value: int/Decimal for numbers, str for quoted text, bool
    is_null: bool = False

    @property
    def constant(self) -> bool:
        return not self.column and self.type != BOOL or self.is_null


def _sql(type_name: str) -> str:
    return _SQL_NAMES.get(type_name, type_name)


def _domain(type_name: str) -> str:
    if type_name in _INTS:
        return "int"
    if type_name in _FLOATS:
        return "float"
    if type_name in ("text", "varchar"):
        return "text"
    if type_name in ("date", "timestamp", "timestamptz"):
        return "instant"
    return type_name  # numeric, bpchar, bool, uuid


def _number_literal(text: str) -> tuple[str, int | Decimal]:
    """An unquoted number's type as PostgreSQL's lexer gives it: integer, bigint, else numeric."""
    if _INTEGER.fullmatch(text):
        value = int(text)
        for type_name in ("int4", "int8"):
            low, high = _INTS[type_name]
            if low <= value <= high:
                return type_name, value
    return "numeric", Decimal(text)


def _and(a: Any, b: Any) -> Any:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _or(a: Any, b: Any) -> Any:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


_COMPARE = {"=": lambda a, b: a == b, "<>": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


class _Compiler:
    def __init__(self, types: Mapping[str, str]):
        self.types = types

    # -- operands --

    def operand(self, node: exp.Expression) -> _Operand:
        if isinstance(node, exp.Paren):
            return self.operand(node.this)
        if isinstance(node, exp.Column):
            name = node.this.this
            type_name = self.types[name]
            convert = column_value(type_name)

            def column(row: Row) -> Any:
                try:
                    value = row[name]
                except KeyError:
                    raise MissingColumn(name) from None
                return None if value is None else convert(value)
            return _Operand(column, type_name, column=True)
        if isinstance(node, exp.Null):
            return _Operand(lambda row: None, UNKNOWN, is_null=True)
        if isinstance(node, exp.Boolean):
            value = bool(node.this)
            return _Operand(lambda row: value, BOOL, literal=value)
        if isinstance(node, exp.Neg):
            inner = node.this
            if not (isinstance(inner, exp.Literal) and not inner.is_string):
                raise FilterError("'-' applies to number literals only")
            type_name, value = _number_literal("-" + inner.this)
            return _Operand(lambda row: value, type_name, literal=value)
        if isinstance(node, exp.Literal):
            if node.is_string:
                return _Operand(lambda row: node.this, UNKNOWN, literal=node.this)
            type_name, value = _number_literal(node.this)
            return _Operand(lambda row: value, type_name, literal=value)
        return _Operand(self.boolean(node), BOOL)

    def boolean(self, node: exp.Expression) -> Evaluator:
        """A boolean expression's evaluator: True, False or None (NULL)."""
        evaluate = self._boolean(node)
        if node.args.get("negate"):  # sqlglot's x IS NOT NULL, NOT IN, NOT LIKE, NOT BETWEEN
            return lambda row: None if (v := evaluate(row)) is None else not v
        return evaluate

    def _boolean(self, node: exp.Expression) -> Evaluator:
        if isinstance(node, exp.Paren):
            return self.boolean(node.this)
        where = node.sql(dialect="postgres")
        if isinstance(node, exp.Column):
            if self.types[node.this.this] != BOOL:
                raise FilterError(f"{where} is not a boolean")
            return self.operand(node).evaluate
        if isinstance(node, exp.Null):
            return lambda row: None
        if isinstance(node, exp.Boolean):
            value = bool(node.this)
            return lambda row: value
        if isinstance(node, (exp.And, exp.Or)):
            left, right = self.boolean(node.this), self.boolean(node.expression)
            combine = _and if isinstance(node, exp.And) else _or
            return lambda row: combine(left(row), right(row))
        if isinstance(node, exp.Not):
            inner = self.boolean(node.this)
            return lambda row: None if (v := inner(row)) is None else not v
        if isinstance(node, exp.Is):
            target = node.expression
            if isinstance(target, exp.Null):
                operand = self.operand(node.this).evaluate
                return lambda row: operand(row) is None
            if isinstance(target, exp.Boolean):
                inner = self.boolean(node.this)
                wanted = bool(target.this)
                return lambda row: inner(row) is wanted
            raise FilterError("IS takes NULL, TRUE or FALSE")
        if type(node) in _COMPARISONS:
            return self.comparison(_COMPARISONS[type(node)], self.operand(node.this), self.operand(node.expression), where)
        if isinstance(node, exp.Between):
            # PostgreSQL reads a BETWEEN b AND c as a >= b AND a <= c, each resolved on its own.
            value = self.operand(node.this)
            low = self.comparison(">=", value, self.operand(node.args["low"]), where)
            high = self.comparison("<=", value, self.operand(node.args["high"]), where)
            return lambda row: _and(low(row), high(row))
        if isinstance(node, exp.In):
            return self.member(node, where)
        if isinstance(node, exp.Like):
            return self.like(node, where)
        raise FilterError(f"uses {type(node).__name__}, which cdc cannot evaluate")

    # -- comparisons --

    def comparison(self, op: str, left: _Operand, right: _Operand, where: str) -> Evaluator:
        """left op right, resolved as PostgreSQL resolves the operator for the two types."""
        left, right, left_key, right_key, domain = self.resolve(left, right, where)
        if op not in ("=", "<>") and domain in ("text", "bpchar"):
            raise FilterError(f"{where}: ordering text depends on the collation; use =, <>, IN or LIKE on text")
        compare = _COMPARE[op]
        left_eval, right_eval = left.evaluate, right.evaluate

        def evaluate(row: Row) -> Any:
            a, b = left_eval(row), right_eval(row)
            return None if a is None or b is None else compare(left_key(a), right_key(b))
        return evaluate

    def resolve(self, left: _Operand, right: _Operand, where: str) -> tuple[_Operand, _Operand, Callable, Callable, str]:
        """(left, right, key of the left value, key of the right value, domain): a quoted literal read as
        the other side's type, and keys that compare in the domain."""
        if left.type == UNKNOWN and right.type == UNKNOWN:
            if left.is_null or right.is_null:
                return left, right, (lambda v: v), (lambda v: v), "null"
            raise FilterError(f"{where}: compares two literals; compare a column")
        lt, rt = left.type, right.type
        if lt == UNKNOWN or rt == UNKNOWN:  # a quoted literal is read as the other side's type
            known = rt if lt == UNKNOWN else lt
            literal = left if lt == UNKNOWN else right
            if not literal.is_null:
                try:
                    value = parse_input(literal.literal, known)
                except (ValueError, LookupError):
                    raise FilterError(f"{where}: {literal.literal!r} is not a {_sql(known)} value cdc reads exactly as "
                                      "PostgreSQL does") from None
                literal = _Operand(lambda row: value, known, literal=value)
            if lt == UNKNOWN:
                left = literal
            else:
                right = literal
            lt = rt = known
        if lt in _NUMBERS and rt in _NUMBERS:
            if lt in _INTS and rt in _INTS:
                domain = "int"
            elif lt in _FLOATS or rt in _FLOATS:
                # real against anything but real is widened to double precision (float48 operators,
                # or float8's as the preferred type); real against real compares the same way.
                if left.column and right.column and "numeric" in (lt, rt):
                    raise FilterError(f"{where}: compares a numeric column with a float column")
                domain = "float"
            else:
                domain = "numeric"
        elif lt == rt or {lt, rt} in ({"text", "varchar"}, {"date", "timestamp"}):
            domain = _domain(lt)
        else:
            raise FilterError(f"{where}: compares {_sql(lt)} with {_sql(rt)}, which cdc does not evaluate")
        return left, right, self.key(left, domain, where), self.key(right, domain, where), domain

    def key(self, operand: _Operand, domain: str, where: str) -> Callable[[Any], Any]:
        """The operand's value -> its comparison key in `domain` (constants are converted now)."""
        type_name = operand.type
        if operand.is_null:
            return lambda v: v  # never called: NULL compares to NULL
        if domain == "float" and type_name not in _FLOATS:
            if operand.column:  # integers: exact in double precision up to 2^53, rounded as C rounds beyond
                return lambda v: _float_key(float(v))
            try:
                value = _float_key(_to_float(Decimal(operand.literal), "float8"))
            except ValueError as exc:
                raise FilterError(f"{where}: {exc}") from None
            return lambda v: value
        if domain == "float":
            return _float_key
        if domain == "numeric":
            return lambda v: _numeric_key(Decimal(v))
        return lambda v: v

    def member(self, node: exp.In, where: str) -> Evaluator:
        """x IN (a, b, ...): with two or more items that are not columns, PostgreSQL casts x and them to
        one common type and compares with = ANY(array); other items are compared with = one by one."""
        value = self.operand(node.this)
        items = [self.operand(e) for e in node.expressions]
        constants = [i for i in items if not i.column]
        tests: list[Evaluator] = [self.comparison("=", value, i, where) for i in items if i.column]
        if len(constants) > 1:
            tests.append(self.any_of(value, constants, where))
        else:
            tests += [self.comparison("=", value, i, where) for i in constants]

        def member(row: Row) -> Any:
            result: Any = False
            for test in tests:
                result = _or(result, test(row))
                if result is True:
                    return True
            return result
        return member

    def any_of(self, value: _Operand, items: list[_Operand], where: str) -> Evaluator:
        known = [t for t in [value.type, *(i.type for i in items)] if t != UNKNOWN]
        if not known:
            raise FilterError(f"{where}: compares literals only; compare a column")
        if all(t in _NUMBERS for t in known):
            common = max(known, key=_RANK.__getitem__)  # select_common_type: the highest implicit cast
        elif len(set(known)) == 1 and value.type != UNKNOWN:
            common = known[0]
        else:
            raise FilterError(f"{where}: IN compares values of types {', '.join(sorted(map(_sql, set(known))))}")
        converted = []
        for item in items:
            if item.is_null:
                converted.append(item)
                continue
            try:
                if item.type == UNKNOWN:
                    literal = parse_input(item.literal, common)
                elif common in _FLOATS:
                    literal = _to_float(Decimal(item.literal), common)
                elif common == "numeric":
                    literal = Decimal(item.literal)
                else:
                    literal = item.literal
            except (ValueError, LookupError):
                raise FilterError(f"{where}: {item.literal!r} is not a {_sql(common)} value cdc reads exactly as "
                                  "PostgreSQL does") from None
            converted.append(_Operand(lambda row, v=literal: v, common, literal=literal))
        tests = [self.comparison("=", value, item, where) for item in converted]

        def any_of(row: Row) -> Any:
            result: Any = False
            for test in tests:
                result = _or(result, test(row))
            return result
        return any_of

    def like(self, node: exp.Like, where: str) -> Evaluator:
        operand = node.this.this if isinstance(node.this, exp.Paren) else node.this
        pattern = node.expression
        if not isinstance(operand, exp.Column) or self.types[operand.this.this] not in _STRINGS \
                or not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise FilterError(f"{where}: LIKE compares a text column with a string literal")
        if re.search(r"(?<!\\)(\\\\)*\\$", pattern.this):
            raise FilterError(f"{where}: a LIKE pattern must not end with the escape character")
        regex = _like_regex(pattern.this)
        name = operand.this.this

        def like(row: Row) -> Any:  # on the value as stored: char(n) keeps its padding here
            try:
                value = row[name]
            except KeyError:
                raise MissingColumn(name) from None
            return None if value is None else regex.fullmatch(value) is not None
        return like


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
