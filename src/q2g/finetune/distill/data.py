"""--distill chunk-likelihood, the data: which student label tokens form which byte-aligned chunk
of the trace, and the teacher's log-likelihood of that chunk, per training example.

    examples, stats = add_distill(tokenizer, rows, examples, cfg.max_seq_len, traces_path)
    collator = DistillCollator(Collator(tokenizer.pad_token_id))

The teacher's token log-probs and byte spans over the trace text come from the side file beside
the traces (stage 1, `--teacher-logprobs`). The student's target is `prompts.student_target_ids`:
the stripped trace, then its end token; the trace tokens are mapped to bytes of the *stored*
trace text (shifted by the stripped leading whitespace). A chunk closes where a teacher token and
a student token end on the same byte, and is kept only where both sides cover exactly the same
bytes: so the stripped whitespace, a trace cut at --max-seq-len and the end token fall in no
chunk (their labels still carry the cross-entropy). Rehearsal examples have no teacher: no chunk.

Each example gets `distill_chunk` (per position, the chunk of that label, or NO_CHUNK) and
`distill_teacher` (the teacher's chunk log-likelihoods); DistillCollator pads them into
[B, T] and [B, C] (NaN past an example's last chunk) for q2g.finetune.distill.distill_sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from q2g.alignment import byte_spans
from q2g.data.teacher_logprobs import load_teacher_logprobs, side_path
from q2g.errors import DataError
from q2g.examples import IGNORE_INDEX
from q2g.finetune.distill.chunk_kl import NO_CHUNK
from q2g.prompts import student_prompt_ids, target_trace

SIDE_FILE = "teacher_logprobs.jsonl"  # beside traces.jsonl (stage 1, --teacher-logprobs; q2g.data.teacher_logprobs)


def no_logprobs_message(traces_path: Path) -> str:
    return (
        f"{traces_path.parent}: these traces carry no teacher log-probs ({side_path(traces_path).name} is missing or "
        "names none of the validated traces); --distill chunk-likelihood needs them. The reference teacher writes "
        "none: generate with a teacher that keeps them (--teacher-logprobs K), score these traces with one "
        "(q2g generate --score-traces), or drop --distill"
    )


def load_side(traces_path: Path, rows: list[dict]) -> dict:
    """{trace id: TeacherLogprobs} of `rows` from the side file beside `traces_path`, checked against
    each trace's text (q2g.data.teacher_logprobs); no file or no line for any row: a DataError."""
    side = side_path(traces_path)
    if not side.is_file():
        raise DataError(no_logprobs_message(traces_path))
    found = load_teacher_logprobs(side, {str(r.get("id")): r["qwen_trace"] for r in rows})
    if not found:
        raise DataError(no_logprobs_message(traces_path))
    return found


def aligned_chunks(spans_t, spans_s) -> tuple[list[int], list[int], int]:
    """(chunk of each teacher token, chunk of each student token, n chunks); NO_CHUNK where none.

    Chunks lie between consecutive bytes where both tokenizations have a token boundary; one is kept
    where the tokens of each side inside it cover all of its bytes (so a byte range only one side
    tokenized, such as stripped whitespace or a cut tail, is in no chunk). Zero-width tokens: none.
    Where both sides cover the same bytes this is q2g.alignment.chunk_ids (tested); that one refuses
    spans over different bytes, which the student's stripped and cut trace gives here."""
    cuts = sorted(_boundaries(spans_t) & _boundaries(spans_s))
    members_t, members_s = _members(spans_t, cuts), _members(spans_s, cuts)
    ids_t, ids_s = [NO_CHUNK] * len(spans_t), [NO_CHUNK] * len(spans_s)
    n = 0
    for k in sorted(members_t.keys() & members_s.keys()):
        a, b = cuts[k], cuts[k + 1]
        if _tiles(spans_t, members_t[k], a, b) and _tiles(spans_s, members_s[k], a, b):
            for i in members_t[k]:
                ids_t[i] = n
            for i in members_s[k]:
                ids_s[i] = n
            n += 1
    return ids_t, ids_s, n


def _boundaries(spans) -> set[int]:
    return {x for s, e in spans if e > s for x in (s, e)}


def _members(spans, cuts) -> dict[int, list[int]]:
    """{k: tokens inside [cuts[k], cuts[k + 1])}."""
    import bisect

    out: dict[int, list[int]] = {}
    for i, (s, e) in enumerate(spans):
        k = bisect.bisect_right(cuts, s) - 1
        if e > s and 0 <= k < len(cuts) - 1 and e <= cuts[k + 1]:
            out.setdefault(k, []).append(i)
    return out


def _tiles(spans, members, a: int, b: int) -> bool:
    """Do the spans of `members` cover [a, b) without a gap?"""
    pos = a
    for s, e in sorted(spans[i] for i in members):
        if s > pos:
            return False
        pos = max(pos, e)
    return pos == b


def student_trace_spans(tokenizer, trace: str) -> list[tuple[int, int]]:
    """Byte spans, in the stored trace text, of the trace tokens of prompts.student_target_ids."""
    text = target_trace(trace)
    shift = len(trace[: len(trace) - len(trace.lstrip())].encode("utf-8"))  # the stripped leading whitespace
    return [(s + shift, e + shift) for s, e in byte_spans(tokenizer, text)]


def example_fields(tokenizer, example: dict, trace: str, record, tally: dict | None = None) -> dict:
    """distill_chunk (per position of the example) and distill_teacher (per chunk) of one example;
    `tally` (optional) adds up the alignment counts of chunk_report."""
    n_prompt = sum(1 for x in example["labels"] if x == IGNORE_INDEX)
    spans_t = record.spans
    spans_s = student_trace_spans(tokenizer, trace)[: len(example["input_ids"]) - n_prompt]
    ids_t, ids_s, n = aligned_chunks(spans_t, spans_s)
    teacher = [0.0] * n
    for c, lp in zip(ids_t, record.logprobs):
        if c != NO_CHUNK:
            teacher[c] += float(lp)
    chunk = [NO_CHUNK] * len(example["input_ids"])
    chunk[n_prompt : n_prompt + len(ids_s)] = ids_s
    if tally is not None:
        count(tally, spans_t, ids_t, ids_s, n, spans_s[-1][1] - spans_s[0][0] if spans_s else 0)
    return {"distill_chunk": chunk, "distill_teacher": teacher}


def count(tally: dict, spans_t, ids_t, ids_s, n: int, n_bytes: int) -> None:
    """Add one example's chunks to `tally`: bytes of the trace the student trains on (after the strip and
    the cut at --max-seq-len), bytes in chunks, bytes in chunks of one token on both sides."""
    width = [0] * n
    for (s, e), c in zip(spans_t, ids_t):
        if c != NO_CHUNK:
            width[c] += e - s
    n_t = [ids_t.count(c) for c in range(n)] if n else []
    n_s = [ids_s.count(c) for c in range(n)] if n else []
    for key, value in (
        ("trace_bytes", n_bytes),
        ("chunk_bytes", sum(width)),
        ("one_to_one_bytes", sum(w for w, a, b in zip(width, n_t, n_s) if a == b == 1)),
        ("chunks", n),
        ("teacher_tokens", sum(n_t)),
        ("student_tokens", sum(n_s)),
    ):
        tally[key] = tally.get(key, 0) + value


def chunk_report(tally: dict) -> dict:
    """The alignment actually trained on: shares of the trained trace bytes, mean chunk length, tokens per chunk."""
    chunks, chunk_bytes = max(tally.get("chunks", 0), 1), max(tally.get("chunk_bytes", 0), 1)
    return {
        "chunks": tally.get("chunks", 0),
        "bytes_in_chunks": tally.get("chunk_bytes", 0) / max(tally.get("trace_bytes", 0), 1),
        "bytes_in_one_token_chunks": tally.get("one_to_one_bytes", 0) / chunk_bytes,
        "mean_chunk_bytes": tally.get("chunk_bytes", 0) / chunks,
        "teacher_tokens_per_chunk": tally.get("teacher_tokens", 0) / chunks,
        "student_tokens_per_chunk": tally.get("student_tokens", 0) / chunks,
    }


def add_distill(tokenizer, rows, examples, max_seq_len: int, traces_path: Path) -> tuple[list[dict], dict]:
    """The examples (as examples.build_dataset made them from `rows`, in order) with their chunks,
    and what config.json says of them. Traces without teacher log-probs train on the CE alone."""
    kept = [r for r in rows if len(student_prompt_ids(tokenizer, r["problem"])) < max_seq_len]  # build_dataset's rule
    if len(kept) != len(examples):
        raise RuntimeError(f"add_distill: {len(kept)} traces fit but {len(examples)} examples were built")
    side = load_side(traces_path, kept)
    out, tally, n_with = [], {}, 0
    for row, ex in zip(kept, examples):
        record = side.get(str(row.get("id")))
        if record is None:
            out.append(ex)
            continue
        out.append({**ex, **example_fields(tokenizer, ex, row["qwen_trace"], record, tally)})
        n_with += 1
    names = sorted({side[str(r.get("id"))].tokenizer for r in kept if str(r.get("id")) in side})
    texts = [r["qwen_trace"] for r in kept if str(r.get("id")) in side]
    info = {"examples": n_with, "of": len(kept), "teacher_tokenizers": names, **chunk_report(tally)}
    return out, {**info, **compat(tokenizer, names, texts)}


def compat(tokenizer, names: list[str], texts: list[str]) -> dict:
    """{"compat": q2g.alignment.compat_report of the teacher's tokenizer (named in the side file) and
    the student's over the traces} where that tokenizer loads here, else {"compat_skipped": why}."""
    from q2g.alignment import compat_report
    from q2g.models import load_tokenizer

    if len(names) != 1:
        return {"compat_skipped": f"{len(names)} teacher tokenizers in the side file"}
    try:
        teacher = load_tokenizer(names[0])
    except Exception as e:  # offline, or a name that is no tokenizer: the chunk counts above still hold
        return {"compat_skipped": f"the teacher's tokenizer {names[0]!r} does not load here ({type(e).__name__})"}
    return {"compat": compat_report(teacher, tokenizer, texts)}


def report_text(info: dict) -> str:
    """The log's lines: the chunks trained on, then the tokenizer-compatibility report (or why not)."""
    from q2g.alignment import format_compat_report

    extra = (
        format_compat_report(info["compat"])
        if info.get("compat")
        else f"no tokenizer report: {info['compat_skipped']}"
    )
    return f"{report_line(info, warnings=False)}\n{extra}"


def report_line(info: dict, warnings: bool = True) -> str:
    """One line for report.md (with the warnings of the compatibility report)."""
    warnings = ((info.get("compat") or {}).get("warnings") or []) if warnings else []
    return (
        f"{info['examples']}/{info['of']} examples with teacher log-probs ({', '.join(info['teacher_tokenizers'])}); "
        f"{info['chunks']} chunks cover {info['bytes_in_chunks']:.1%} of the trained trace bytes, "
        f"{info['bytes_in_one_token_chunks']:.1%} of them in chunks of one token on both sides; "
        f"{info['mean_chunk_bytes']:.2f} bytes, {info['teacher_tokens_per_chunk']:.2f} teacher and "
        f"{info['student_tokens_per_chunk']:.2f} student tokens per chunk"
        + "".join(f"; WARNING: {w}" for w in warnings)
    )


@dataclass
class DistillCollator:
    """examples.Collator's batch plus distill_chunk [B, T] (NO_CHUNK where none) and
    distill_teacher [B, C] (NaN past each example's chunks; C >= 1)."""

    base: object

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        out = self.base(batch)
        width = max(1, *(len(b.get("distill_teacher", ())) for b in batch))
        out["distill_chunk"] = torch.full_like(out["labels"], NO_CHUNK)
        out["distill_teacher"] = torch.full((len(batch), width), float("nan"))
        for i, b in enumerate(batch):
            if "distill_chunk" in b:
                out["distill_chunk"][i, : len(b["distill_chunk"])] = torch.tensor(b["distill_chunk"])
                out["distill_teacher"][i, : len(b["distill_teacher"])] = torch.tensor(b["distill_teacher"])
        return out
