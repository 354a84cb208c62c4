"""Judging a teacher's samples into trace records, and the records files (traces / rejected).

A sample is a trace (`validated: true`, in traces.jsonl) when it finished, its final answer
equals the gold one (answers.check.is_correct) and no earlier correct sample of the problem has
the same text; else it goes to rejected.jsonl with a reason: truncated, no_answer,
gold_unparseable, wrong_answer, duplicate, or failed (the backend could not get it).
"""

from __future__ import annotations

import json
import unicodedata
from collections import defaultdict
from pathlib import Path

from q2g.answers.check import is_correct
from q2g.answers.extract import extract_answer_with_rule
from q2g.errors import DataError
from q2g.io import atomic_write_text, read_jsonl_tolerant


def normalize_trace(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def rejection(sample, problem: dict, extracted) -> str | None:
    """Why a sample is not a trace (None: it is one, unless a duplicate)."""
    if sample.error:  # the backend could not get it; the next run asks again
        return "failed"
    if sample.truncated:  # an unfinished trace would teach the student to stop mid-solution
        return "truncated"
    if extracted is None:
        return "no_answer"
    verdict = is_correct(sample.answer_text, problem["answer"], problem["source"])
    return "gold_unparseable" if verdict is None else None if verdict else "wrong_answer"


def judge(problem: dict, samples: list, meta: dict) -> list[dict]:
    """One record per sample; `validated` True for the first correct copy of each distinct text."""
    records, seen = [], set()
    for index, sample in enumerate(samples):
        extracted, rule = extract_answer_with_rule(sample.answer_text, problem["source"])  # not the thinking
        reason = rejection(sample, problem, extracted)
        if reason is None:
            key = normalize_trace(sample.text)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        record = {
            "problem": problem["problem"],
            "qwen_trace": sample.text.strip(),
            "answer": problem["answer"],
            "source": problem["source"],
            "validated": reason is None,
        }
        if reason:
            record["reason"] = reason
        if sample.error:
            record["error"] = sample.error
        record.update(
            id=f"{problem['id']}#s{index}",
            problem_id=problem["id"],
            sample=index,
            subject=problem["subject"],
            level=problem["level"],
            **meta,
            extracted_answer=extracted,
            answer_rule=rule,
            n_tokens=sample.n_tokens,
        )
        records.append(record)
    return records


# What resume and merge read of a record; a file without them is from an older q2g or another tool.
RECORD_FIELDS = ("id", "problem_id", "sample", "source", "validated", "n_tokens")


def read_records(paths: dict[str, Path]) -> list[dict]:
    """Records already written (traces and rejects); a torn last line is cut off the file.
    A record without RECORD_FIELDS is refused (DataError naming the file, record and field)."""
    records = []
    for key in ("traces", "rejected"):
        rows = read_jsonl_tolerant(paths[key], repair=True)
        for n, row in enumerate(rows, 1):
            missing = [f for f in RECORD_FIELDS if not isinstance(row, dict) or f not in row]
            if missing:
                raise DataError(
                    f"{paths[key]}: record {n} has no field {missing[0]!r} (written by an older q2g or "
                    "another tool?); use another --out, or --overwrite to start again"
                )
        records += rows
    return records


def retried(records: list[dict]) -> list[dict]:
    """Records without the failed samples that a later run got (its record replaces them)."""
    got = {r["id"] for r in records if r.get("reason") != "failed"}
    return [r for r in records if r.get("reason") != "failed" or r["id"] not in got]


def done_problems(records: list[dict], k: int) -> set[str]:
    """Problems whose k samples are all on disk (in either file)."""
    samples: dict[str, set[int]] = defaultdict(set)
    for r in records:
        samples[r["problem_id"]].add(r["sample"])
    return {pid for pid, s in samples.items() if len(s) >= k}


def write_sorted(path: Path, records: list[dict], order: dict[str, int]) -> None:
    """Rewrite a records file deduplicated by id and in problem order (atomic)."""
    unique = {}
    for r in records:
        unique.setdefault(r["id"], r)
    rows = sorted(unique.values(), key=lambda r: (order.get(r["problem_id"], len(order)), r["sample"]))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
