"""Traces -> masked training examples, and the collator that batches them (used by stage 2).

    rows = read_traces(Path("dataset/traces.jsonl"))[1]
    examples, stats = build_dataset(tokenizer, rows, max_seq_len=1024)

An example is the one student format (`prompts.student_prompt_ids` + `student_target_ids`):
input_ids = prompt + trace + end token, labels = -100 on the prompt, so the model is trained on
exactly what evaluation prompts it with, and only the trace carries loss. Traces are validated
field by field (types included) with file:line in the error; holdout problems are refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from q2g.data.jsonl import read_jsonl_lines
from q2g.data.schema import check_rows
from q2g.data.sources import SOURCES
from q2g.data.splits import find_leaks
from q2g.errors import DataError
from q2g.prompts import student_prompt_ids, student_target_ids

IGNORE_INDEX = -100  # label of tokens that are not trained (prompt, padding)
TRACE_FIELDS = {"problem": str, "qwen_trace": str, "answer": (str, int, float), "source": str}
TRACE_TYPES = {**TRACE_FIELDS, "validated": bool}  # "validated": "true" would silently drop the trace


def locate_traces(traces: str, split: str | None) -> tuple[Path, Path]:
    """(traces.jsonl, split.json) from a folder or a file, and an optional split path."""
    path = Path(traces)
    traces_path = path / "traces.jsonl" if path.is_dir() else path
    split_path = Path(split) if split else traces_path.parent / "split.json"
    if not traces_path.is_file():
        raise DataError(f"{traces_path}: traces file not found (run `q2g generate` first)")
    if not split_path.is_file():
        raise DataError(
            f"{split_path}: split manifest not found; it is needed to refuse holdout "
            f"problems (pass --split, or keep split.json beside the traces)"
        )
    return traces_path, split_path


def read_traces(path: Path) -> tuple[list[dict], list[dict]]:
    """(all rows, validated rows); a bad or empty file is a DataError naming the file (and line)."""
    rows = check_rows(path, read_jsonl_lines(path, required=TRACE_FIELDS, types=TRACE_TYPES), "traces")
    if not rows:
        raise DataError(f"{path}: no traces (the file is empty)")
    for lineno, row in enumerate(rows, 1):
        if row["source"] not in SOURCES:
            raise DataError(
                f"{path}: trace {row.get('id', lineno)}: source {row['source']!r} is not one of {', '.join(SOURCES)}"
            )
    validated = [r for r in rows if r.get("validated") is True]
    if not validated:
        raise DataError(f"{path}: none of the {len(rows)} traces is marked `validated: true`")
    return rows, validated


def refuse_leaks(rows: list[dict], manifest: dict, traces_path: Path, split_path: Path) -> None:
    leaks = find_leaks(rows, manifest)
    if leaks:
        shown = "; ".join(f"{x['id']} = holdout {x['holdout_id']} (by {x['by']})" for x in leaks[:5])
        raise DataError(
            f"{traces_path}: {len(leaks)} of {len(rows)} validated traces are holdout problems of "
            f"{split_path}; refusing to train on the evaluation set. Examples: {shown}"
        )


def teacher_info(rows: list[dict]) -> list[dict]:
    """Distinct (teacher, backend) pairs of the traces, with their counts."""
    pairs = Counter((r.get("teacher"), r.get("backend")) for r in rows)
    return [{"teacher": t, "backend": b, "n": n} for (t, b), n in pairs.most_common()]


def build_example(tokenizer, problem: str, trace: str, max_seq_len: int) -> dict | None:
    """input_ids = student prompt + trace + end token; labels = -100 on the prompt.

    Too long: the trace is cut from the right (the prompt is kept whole). A prompt that leaves
    no room for a single target token returns None (the caller counts it as skipped).
    """
    prompt = student_prompt_ids(tokenizer, problem)
    if len(prompt) >= max_seq_len:
        return None
    target = student_target_ids(tokenizer, trace)[: max_seq_len - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def build_dataset(
    tokenizer, rows: list[dict], max_seq_len: int, text_field: str = "qwen_trace"
) -> tuple[list[dict], dict]:
    """Examples of `rows` (their `text_field` is the target) and counts of what was cut or skipped."""
    examples, skipped, cut = [], 0, 0
    for row in rows:
        ex = build_example(tokenizer, row["problem"], row[text_field], max_seq_len)
        if ex is None:
            skipped += 1
            continue
        cut += len(ex["input_ids"]) == max_seq_len
        examples.append(ex)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, {
        "n_train_examples": len(examples),
        "n_skipped_prompt_too_long": skipped,
        "n_truncated": cut,
        "n_train_tokens": n_tokens,
    }


@dataclass
class Collator:
    """Right-pads a batch: padding has attention 0 and label -100 (padded by position, so an EOS
    that doubles as the pad token is still trained where it ends a trace)."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        out = {
            "input_ids": torch.full((len(batch), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
            "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(b["labels"])
        return out
