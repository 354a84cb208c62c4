"""Shards: `--shard I/N` takes the problems whose stable hash of id is I mod N; merging them.

Shard I of N writes traces.shard-I-of-N.jsonl, rejected.shard-I-of-N.jsonl and
summary.shard-I-of-N.json; once all N summaries say complete, `merge_shards` writes traces.jsonl,
rejected.jsonl and summary.json (records sorted in problem order, times summed over shards).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from q2g.backends import stable_int
from q2g.data.teacher_logprobs import finish_side_file
from q2g.errors import DataError
from q2g.generate.records import read_records, write_sorted
from q2g.generate.summary import Tally
from q2g.io import atomic_write_json, atomic_write_text, read_input_bytes, read_jsonl_tolerant


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(match[1]), int(match[2])


def layout_problem(out: Path, shard: tuple[int, int]) -> str | None:
    """Why shard I/N cannot join `out` (shard files of another N are there: they could never merge)."""
    found = {
        int(m[1]) for p in out.glob("traces.shard-*-of-*.jsonl") if (m := re.search(r"-of-(\d+)\.jsonl$", p.name))
    }
    others = sorted(found - {shard[1]})
    if others:
        return f"--shard {shard[0]}/{shard[1]}: {out} holds shards of {others[0]} (use --shard I/{others[0]} or another --out)"
    return None


def in_shard(problem_id: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or stable_int("shard", problem_id) % shard[1] == shard[0]


def output_paths(out: Path, shard: tuple[int, int] | None) -> dict[str, Path]:
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return {
        "traces": out / f"traces{tag}.jsonl",
        "rejected": out / f"rejected{tag}.jsonl",
        "teacher_logprobs": out / f"teacher_logprobs{tag}.jsonl",
        "summary": out / f"summary{tag}.json",
    }


def merge_side_files(out: Path, n: int) -> None:
    """teacher_logprobs.jsonl from the shards' side files (when --teacher-logprobs wrote them)."""
    parts = [output_paths(out, (i, n))["teacher_logprobs"] for i in range(n)]
    if not any(p.exists() for p in parts):
        return
    rows = [row for p in parts for row in read_jsonl_tolerant(p)]
    atomic_write_text(out / "teacher_logprobs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    finish_side_file(out / "teacher_logprobs.jsonl", read_jsonl_tolerant(out / "traces.jsonl"))


def complete_shards(out: Path, required: bool) -> tuple[dict, int] | None:
    """(summary of each shard, N) when all N shards in `out` are complete; else None, or with
    `required` a DataError saying what is missing (checked before anything is written)."""
    found = {}
    for path in out.glob("summary.shard-*-of-*.json"):
        i, n = map(int, re.fullmatch(r"summary\.shard-(\d+)-of-(\d+)\.json", path.name).groups())
        found[(i, n)] = json.loads(read_input_bytes(path).decode("utf-8"))
    counts = {n for _, n in found}
    if len(counts) != 1:
        if required:
            problem = f"shards of different N {sorted(counts)}" if counts else "no shard outputs found"
            raise DataError(f"{out}: {problem}")
        return None
    n = counts.pop()
    missing = [i for i in range(n) if not found.get((i, n), {}).get("complete")]
    if missing:
        if required:
            raise DataError(f"{out}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} not complete yet")
        return None
    return found, n


def merge_shards(out: Path, order: dict[str, int], required: bool, extra: dict) -> dict | None:
    """Merge complete shards into traces.jsonl / rejected.jsonl / summary.json (None: not all done)."""
    complete = complete_shards(out, required)
    if complete is None:
        return None
    found, n = complete
    records = []
    for i in range(n):
        records += read_records(output_paths(out, (i, n)))
    timing = defaultdict(lambda: {"timed_tokens": 0, "seconds": 0.0})
    for summary in found.values():  # time = sum over shards (GPU-seconds when they ran side by side)
        for source, row in summary["sources"].items():
            timing[source]["timed_tokens"] += row["timed_tokens"]
            timing[source]["seconds"] += row["seconds"]
    write_sorted(out / "traces.jsonl", [r for r in records if r["validated"]], order)
    merge_side_files(out, n)
    write_sorted(out / "rejected.jsonl", [r for r in records if not r["validated"]], order)
    tally = Tally(timing)
    tally.add_records(list({r["id"]: r for r in records}.values()))
    summary = tally.summary(
        complete=True, **{**extra, "shard": None, "merged_shards": n, "problems_planned": len(order)}
    )
    atomic_write_json(out / "summary.json", summary)
    return summary
