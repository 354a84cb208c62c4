"""Small file helpers shared by the stages: atomic writes and crash-safe JSONL.

Why: every long job here must survive SIGKILL. Whole files are written to a temporary name and
renamed (atomic on POSIX), and JSONL records are appended a group at a time, flushed and fsynced,
so a killed run leaves at worst one torn last line, which `read_jsonl_tolerant` drops.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path, rows: list[dict]) -> None:
    """Append rows in one write, then flush and fsync: a group lands whole or (torn) last."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path, repair: bool = False) -> list[dict]:
    """Rows of a JSONL file being appended to; a torn *last* line is dropped with a warning.

    A bad line anywhere else is corruption, not a crash artefact, and raises ValueError naming
    the line. With repair=True the torn tail is also cut from the file so appends stay clean.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
            good_bytes += len(line) + 1
        except json.JSONDecodeError:
            if not (is_last and not raw.endswith(b"\n")) and not is_last:
                raise ValueError(f"{path}:{i + 1}: not valid JSON (file corrupted?)") from None
            warnings.warn(f"{path}:{i + 1}: dropping a torn last line ({len(line)} bytes) left by an interrupted run")
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(min(good_bytes, len(raw)))
            break
    return rows


def write_jsonl(path, rows: list[dict]) -> None:
    """A whole JSONL file, written atomically (a reader never sees half of it)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def settings_diff(path, config: dict, keys) -> list[str]:
    """How `config` differs on `keys` from the settings saved at `path` (a config.json); empty when
    they agree or nothing was saved. The one "same run?" check: every stage resumes only on []."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{path} is not valid JSON (a damaged output folder?)"]
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples vs lists, paths)
    return [f"{k}: {old.get(k)!r} there, {norm(config.get(k))!r} now" for k in keys
            if norm(old.get(k)) != norm(config.get(k))]
