"""Stage 1's teacher log-probs (--teacher-logprobs K): the side-file lines of a batch's kept traces,
and teacher-forced scoring of traces the teacher did not write (--score-traces FILE).

    q2g generate --backend vllm --teacher-logprobs 5 ...             # beside the traces it writes
    q2g generate --backend hf --teacher Qwen/Qwen2.5-7B-Instruct \\
        --score-traces other_run/traces.jsonl --teacher-logprobs 5 --out scored/   # scored/teacher_logprobs.jsonl

The side file's format, writer and loader are in q2g.data.teacher_logprobs. vllm and openai hand
back the generated tokens with each sample; hf scores each kept trace by a forward pass
(backends/hf_score.py). --score-traces asks the backend's `score`: hf a forward pass, vllm its
prompt log-probs, openai an echoed /completions with logprobs. It is resumable (traces already
scored are skipped).
"""

from __future__ import annotations

from pathlib import Path

from q2g.data.jsonl import read_jsonl
from q2g.data.teacher_logprobs import SIDE_NAME, finish_side_file, side_entry
from q2g.errors import BadInput
from q2g.io import append_jsonl, read_jsonl_tolerant
from q2g.out_guard import check_output, hold_lock, lock_beside


def side_rows(backend, batch: list[dict], samples: list[list], records: list[dict], top_k: int, name: str) -> list:
    """Side-file lines of the kept traces among `records` (one batch's new records)."""
    kept = [r for r in records if r["validated"]]
    by_problem = {p["id"]: (p, s) for p, s in zip(batch, samples)}
    if backend.name == "hf":  # teacher-forced over the trace text as stored; vllm / openai return them
        tokens = backend.score([(by_problem[r["problem_id"]][0], r["qwen_trace"]) for r in kept], top_k)
    else:
        tokens = [by_problem[r["problem_id"]][1][r["sample"]].logprobs for r in kept]
    rows = [side_entry(r["id"], name, r["qwen_trace"], t) for r, t in zip(kept, tokens) if t is not None]
    return [row for row in rows if row is not None]


def report(path: Path, traces: list[dict]) -> None:
    have = len(read_jsonl_tolerant(path)) if path.exists() else 0
    missing = (
        f" ({len(traces) - have} without: their text is not a run of whole teacher tokens)"
        if have < len(traces)
        else ""
    )
    print(f"teacher log-probs of {have} of {len(traces)} traces -> {path}{missing}", flush=True)


def score_traces(args, load_backend) -> int:
    """--score-traces FILE: the teacher's log-probs of FILE's kept traces into --out/teacher_logprobs.jsonl."""
    if args.backend == "reference":
        raise BadInput("--score-traces needs a teacher model: --backend hf, vllm or openai, not reference")
    source = Path(args.score_traces)
    types = {"id": str, "problem": str, "qwen_trace": str}
    traces = [r for r in read_jsonl(source, required=types, types=types) if r.get("validated", True)]
    # the side file may sit beside the traces it scores (finetune reads it there), so the guard
    # checks the file itself: never the traces file, the teacher or anything inside them
    if not str(args.out).strip():
        raise BadInput("--out: an empty path (it would write into the current folder); name a folder")
    path = check_output(
        Path(args.out) / f"{SIDE_NAME}.jsonl",
        "--out",
        inputs={"--score-traces": source, "--teacher": args.teacher},
        folder=False,
    )
    folder, lock = lock_beside(path)
    with hold_lock(folder, name=lock):
        done = {row.get("id") for row in read_jsonl_tolerant(path, repair=True) if isinstance(row, dict)}
        todo = [r for r in traces if r["id"] not in done]
        backend = load_backend(args.backend, args) if todo else None
        for i in range(0, len(todo), args.batch_size):
            batch = todo[i : i + args.batch_size]
            tokens = backend.score([(r, r["qwen_trace"]) for r in batch], args.teacher_logprobs)
            rows = [side_entry(r["id"], args.teacher, r["qwen_trace"], t) for r, t in zip(batch, tokens)]
            append_jsonl(path, [row for row in rows if row is not None])
        finish_side_file(path, traces)
    report(path, traces)
    return 0
