"""Case filters: which cases a search may return, compiled to parameterised SQL.

A filter maps a field to a condition:
- a value: the field equals it (`{"eye": "left"}`);
- a list, tuple or set: the field is one of them (`{"grade": [2, 3]}`);
- a dict of operators: every one holds (`{"age": {">=": 60, "<": 80}, "grade": {"!=": 0}}`);
  the operators are =, !=, <, <=, >, >= and "in" (with a list).
Equality (=, !=, in) is by value: an id given as the text "10534" matches a stored number
10534 and the reverse, so a patient is never missed for how its id was typed; order comparisons
(<, <=, >, >=) compare numbers with numbers. A field that no case has is an error that lists
the known fields. Field names and values only ever reach SQLite as bound parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from .records import COLUMNS

INT64 = (-(2**63), 2**63 - 1)
OPERATORS = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "in": "IN"}
Where = Mapping[str, Union[Any, Sequence[Any], Mapping[str, Any]]]


class FilterError(ValueError):
    """A filter that cannot be applied: an unknown field or operator, or a value of the wrong kind."""


def _conditions(value: Any) -> list[tuple[str, Any]]:
    """(operator, operand) pairs of one field's condition."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        pairs = [("in", list(value))]
    else:
        pairs = [("=", value)]
    out = []
    for op, operand in pairs:
        if op not in OPERATORS:
            raise FilterError(f"unknown operator {op!r}; use one of {', '.join(o for o in OPERATORS if o != '==')}")
        values = list(operand) if op == "in" and isinstance(operand, (list, tuple, set, frozenset)) else [operand]
        for v in values:
            if not (v is None or isinstance(v, (str, int, float))):
                raise FilterError(f"filter values must be text or numbers, got {type(v).__name__} {v!r}")
        values = [float(v) if isinstance(v, int) and not INT64[0] <= v <= INT64[1] else v for v in values]  # SQLite's range
        out.append((op, values if op == "in" else values[0]))
    return out


def by_value(values: list[Any]) -> list[Any]:
    """`values` with each number written as text also as its number, and each number also as its
    text: an id given as "10534" matches a stored 10534, and 10534 a stored "10534"."""
    from .labels import parse_value

    out = list(values)
    for v in values:
        if isinstance(v, str):
            try:
                typed = parse_value(v)
            except ValueError:
                continue
            if not isinstance(typed, str):
                out.append(typed)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(str(v))
    return list(dict.fromkeys(out))


def json_path(field: str) -> str:
    """The SQLite JSON path of a metadata field (names holding a double quote are refused when stored)."""
    return f'$."{field}"'


def compile_filter(where: Where | None, exclude: Where | None, known: Iterable[str]) -> tuple[str, list[Any]]:
    """(SQL condition, parameters) selecting cases that match every `where` condition and no
    `exclude` condition (an excluded field that a case lacks does not exclude it)."""
    known = set(known)
    clauses: list[str] = []
    params: list[Any] = []
    for negate, spec in ((False, where or {}), (True, exclude or {})):
        for field, value in spec.items():
            if field not in known:
                raise FilterError(f"unknown field {field!r}; the index knows: {', '.join(sorted(known))}")
            if field in COLUMNS:
                column, column_params = field, []
            else:
                column, column_params = "json_extract(meta, ?)", [json_path(field)]
            for op, operand in _conditions(value):
                if op in ("=", "!="):  # equality is by value: an id as text or as a number is one id
                    op, operand = ("in" if op == "=" else "not in"), [operand]
                if op in ("in", "not in"):
                    operand = by_value(operand)  # never empty for "not in", which comes from one != value
                    test = f"{column} {op.upper()} ({','.join('?' * len(operand))})" if operand else "0"
                    test_params = column_params + list(operand)
                else:
                    test, test_params = f"{column} {OPERATORS[op]} ?", column_params + [operand]
                if negate:
                    test = f"NOT COALESCE({test}, 0)"
                clauses.append(test)
                params += test_params
    return (" AND ".join(clauses) or "1"), params


def parse_condition(text: str) -> tuple[str, str, list[Any]]:
    """'grade>=2' -> ("grade", ">=", [2]); 'eye=left,right' -> ("eye", "in", ["left", "right"]).

    For the command line: values are typed as label CSVs are (fundus_sdk.labels.parse_value).
    The operators are Python's: = (or ==), !=, <, <=, >, >= and in ('eye in left,right').
    """
    field, sep, raw = text.partition(" in ")
    if sep and field.strip() and not any(c in field for c in "=<>!"):
        return field.strip(), "in", [parse_cli_value(text, v) for v in raw.split(",")]
    for op in ("!=", "==", "<=", ">=", "=", "<", ">"):
        field, sep, raw = text.partition(op)
        if sep and field and not any(c in field for c in "=<>!"):
            if raw[:1] in ("=", "<", ">", "!"):  # 'grade=>3' is no operator: never read as the text ">3"
                raise FilterError(f"{text!r}: {op + raw[:1]!r} is not an operator; use one of = != < <= > >= in")
            values = [parse_cli_value(text, v) for v in raw.split(",")]
            if op in ("=", "==") and len(values) > 1:
                return field.strip(), "in", values
            if len(values) != 1:
                raise FilterError(f"{text!r}: only = takes a list of values")
            return field.strip(), "=" if op == "==" else op, values
    raise FilterError(f"{text!r}: expected FIELD=VALUE[,VALUE...], FIELD in VALUE,VALUE... or FIELD<op>VALUE with op "
                      "one of != < <= > >=")  # fmt: skip


def parse_cli_value(text: str, value: str) -> Any:
    """A command-line filter value typed as label cells are (fundus_sdk.labels.parse_value)."""
    from .labels import parse_value

    try:
        return parse_value(value)
    except ValueError as exc:
        raise FilterError(f"{text!r}: {exc}") from None


def conditions_to_where(texts: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Command-line conditions as a filter: {"grade": {">=": 2}, "eye": {"in": ["left"]}}."""
    where: dict[str, dict[str, Any]] = {}
    for text in texts:
        field, op, values = parse_condition(text)
        where.setdefault(field, {})[op] = values if op == "in" else values[0]
    return where
