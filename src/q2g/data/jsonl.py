"""The strict JSONL reader for data and traces files: every problem is reported as `file:line: why`.

rows = read_jsonl(path, required=("question", "answer"), types={"question": str})
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from q2g.errors import DataError
from q2g.io import read_input_bytes

MAX_LINE_CHARS = 1 << 24  # 16 M characters: a MATH problem with its solution is a few thousand


def read_jsonl(path: Path, required: Iterable[str] = (), types: dict | None = None) -> list[dict]:
    """Read a JSONL file; a bad line, a missing field or a field of the wrong type (`types`:
    field -> type or tuple of types) raises DataError naming file:line; undecodable bytes name the
    byte offset."""
    return [row for _, row in read_jsonl_lines(path, required, types)]


def read_jsonl_lines(path: Path, required: Iterable[str] = (), types: dict | None = None) -> list[tuple[int, dict]]:
    """`read_jsonl` with each row's line number, for errors found later (`file:line: ...`)."""
    required, types = tuple(required), types or {}
    raw = read_input_bytes(path)
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors) is not part of the first record
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte offset {e.start}: {raw[e.start : e.start + 4]!r})") from None
    long = next((i for i, line in enumerate(text.split("\n"), 1) if len(line) > MAX_LINE_CHARS), None)
    if long is not None:
        raise DataError(
            f"{path}:{long}: a line of more than {MAX_LINE_CHARS:,} characters (not one record: a damaged file?)"
        )
    return [
        (lineno, _jsonl_row(path, lineno, line, required, types))
        for lineno, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]


def _jsonl_row(path, lineno: int, line: str, required: tuple, types: dict) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a q2g record") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
    for key, kind in types.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = row.get(key)
        if key in row and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise DataError(
                f"{path}:{lineno}: field {key!r} must be {names}, got {type(row[key]).__name__} "
                f"{json.dumps(row[key])[:40]}"
            )
    return row
