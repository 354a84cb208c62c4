"""One schema per kind of JSONL input, checked on load: types, blank text, duplicate ids, bounds.

    rows = read_rows(path, "traces")        # DataError naming `file:line: field` on the first problem
    check_rows(path, numbered_rows, "holdout")

Every reader of a q2g input file (traces, rejected, holdout, metrics rows, baseline rows) goes
through `check_rows` (traces and holdout now; the others' readers are listed in issue 26), so a record with an empty problem, a blank trace, an id that is a list, a
problem that is a number, an id given twice or a NaN score is refused before anything is written,
the same way for every file. Deeply nested JSON is refused by the reader (q2g.data.jsonl).

Why small typed checkers and not pydantic: pydantic 2 is in the venv but is not a q2g dependency;
importing it and building the first model takes 0.1-0.5 s here (AMD EPYC, 2 shared cores), which
every command would pay, for ~60 lines of checks that read as a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from q2g.errors import DataError

NUMBER = (int, float)


@dataclass(frozen=True)
class Schema:
    types: dict  # field -> type or tuple of types; fields listed in `required` must be present
    required: tuple = ()
    nonblank: tuple = ()  # text fields that must hold more than whitespace
    unique: tuple = ()  # fields (together) that identify a record: given twice is an error
    bounds: dict = field(default_factory=dict)  # field -> (min, max), inclusive; numbers must be finite


TRACE_TYPES = {
    "id": str,
    "problem": str,
    "qwen_trace": str,
    "answer": (str, int, float),
    "source": str,
    "validated": bool,
    "problem_id": str,
}
SCHEMAS = {
    "traces": Schema(
        TRACE_TYPES,
        required=("problem", "qwen_trace", "answer", "source"),
        nonblank=("id", "problem", "qwen_trace", "source"),
        unique=("id",),
    ),
    "rejected": Schema(TRACE_TYPES, required=("problem",), nonblank=("id", "problem")),
    "holdout": Schema(
        {
            "id": str,
            "problem": str,
            "answer": (str, int, float),
            "source": str,
            "reference_solution": (str, type(None)),
        },
        required=("id", "problem", "answer", "source"),
        nonblank=("id", "problem", "source"),
        unique=("id",),
    ),
}


def _kind_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return "/".join("null" if k is type(None) else k.__name__ for k in kinds)


def row_problem(row: dict, schema: Schema) -> str | None:
    """Why `row` does not fit `schema` (None: it does); the message starts with the field."""
    missing = [k for k in schema.required if k not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for key, kinds in schema.types.items():
        if key not in row:
            continue
        value, allowed = row[key], kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            shown = repr(value)[:40]
            return f"field {key!r} must be {_kind_names(kinds)}, got {type(value).__name__} {shown}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"field {key!r} must be a finite number, got {value}"
        if key in schema.nonblank and isinstance(value, str) and not value.strip():
            return f"field {key!r} is blank"
        low, high = schema.bounds.get(key, (None, None))
        if isinstance(value, NUMBER) and low is not None and not low <= value <= high:
            return f"field {key!r} must be in [{low}, {high}], got {value}"
    return None


def check_rows(path, numbered: list[tuple[int, dict]], kind: str) -> list[dict]:
    """The rows of `numbered` ((line, row) pairs from `path`), each checked against SCHEMAS[kind]."""
    schema, seen = SCHEMAS[kind], {}
    for lineno, row in numbered:
        why = row_problem(row, schema)
        if why:
            raise DataError(f"{path}:{lineno}: {why}")
        if schema.unique and all(k in row for k in schema.unique[:1]):
            key = tuple(row.get(k) for k in schema.unique)
            if key in seen:
                name = ", ".join(f"{k} {row.get(k)!r}" for k in schema.unique if row.get(k) is not None)
                raise DataError(f"{path}:{lineno}: duplicate record ({name}; first at line {seen[key]})")
            seen[key] = lineno
    return [row for _, row in numbered]


def read_rows(path: Path, kind: str) -> list[dict]:
    """A whole JSONL input of `kind`, read strictly (q2g.data.jsonl) and checked against its schema."""
    from q2g.data.jsonl import read_jsonl_lines

    return check_rows(path, read_jsonl_lines(path), kind)
