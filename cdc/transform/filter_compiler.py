"""Row filters compiled to closures over rows, resolving each comparison the way PostgreSQL's parser
does (operator resolution, implicit casts, IN lists, literal input functions): the evaluation half
of cdc.transform.rowfilter, for the types and values of cdc.transform.filter_values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlglot import exp

from cdc.transform.filter_values import (
    BOOL, FLOAT_TYPES, INT_RANGES, INTEGER_TEXT, NUMBER_TYPES, SQL_NAMES, STRING_TYPES, UNKNOWN,
    Evaluator, FilterError, MissingColumn, Row, column_value, float_key, numeric_key, parse_input, to_float,
)

_COMPARISONS = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">="}
_RANK = {"int2": 0, "int4": 1, "int8": 2, "numeric": 3, "float4": 4, "float8": 5}  # implicit casts go up


@dataclass(frozen=True)
class _Operand:
    evaluate: Evaluator  # -> the value in its own type's comparison form, None for NULL
    type: str  # a PostgreSQL type of FILTER_TYPES' values, UNKNOWN (quoted literal, NULL) or BOOL
    column: bool = False
    literal: Any = None  # a literal's value: int/Decimal for numbers, str for quoted text, bool
    is_null: bool = False

    @property
    def constant(self) -> bool:
        return not self.column and self.type != BOOL or self.is_null


def _sql(type_name: str) -> str:
    return SQL_NAMES.get(type_name, type_name)


def _domain(type_name: str) -> str:
    if type_name in INT_RANGES:
        return "int"
    if type_name in FLOAT_TYPES:
        return "float"
    if type_name in ("text", "varchar"):
        return "text"
    if type_name in ("date", "timestamp", "timestamptz"):
        return "instant"
    return type_name  # numeric, bpchar, bool, uuid


def _number_literal(text: str) -> tuple[str, int | Decimal]:
    """An unquoted number's type as PostgreSQL's lexer gives it: integer, bigint, else numeric."""
    if INTEGER_TEXT.fullmatch(text):
        value = int(text)
        for type_name in ("int4", "int8"):
            low, high = INT_RANGES[type_name]
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


class Compiler:
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
        if lt in NUMBER_TYPES and rt in NUMBER_TYPES:
            if lt in INT_RANGES and rt in INT_RANGES:
                domain = "int"
            elif lt in FLOAT_TYPES or rt in FLOAT_TYPES:
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
        if domain == "float" and type_name not in FLOAT_TYPES:
            if operand.column:  # integers: exact in double precision up to 2^53, rounded as C rounds beyond
                return lambda v: float_key(float(v))
            try:
                value = float_key(to_float(Decimal(operand.literal), "float8"))
            except ValueError as exc:
                raise FilterError(f"{where}: {exc}") from None
            return lambda v: value
        if domain == "float":
            return float_key
        if domain == "numeric":
            return lambda v: numeric_key(Decimal(v))
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
        if all(t in NUMBER_TYPES for t in known):
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
                elif common in FLOAT_TYPES:
                    literal = to_float(Decimal(item.literal), common)
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
        if not isinstance(operand, exp.Column) or self.types[operand.this.this] not in STRING_TYPES \
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
