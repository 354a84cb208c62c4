"""The teacher's log-probabilities of its traces: the side file beside traces.jsonl.

    q2g generate --teacher-logprobs 5 ...      # writes teacher_logprobs.jsonl beside traces.jsonl
    from q2g.data.teacher_logprobs import load_teacher_logprobs
    entries = load_teacher_logprobs(folder / "teacher_logprobs.jsonl", {r["id"]: r["qwen_trace"] for r in traces})

One JSON line per kept trace, keyed by the trace id (shards: teacher_logprobs.shard-I-of-N.jsonl):

    {"id": "gsm8k-train-00012#s0", "tokenizer": "Qwen/Qwen2.5-7B-Instruct",
     "text_sha256": "<sha256 of the trace text>", "spans": [[0, 3], [3, 9], ...],
     "logprobs": [-0.01, -1.2, ...], "top": [[["tok", -0.01], [" tok", -4.7]], ...]}

`spans` are the teacher's tokens as [start, end) byte offsets into the trace text's UTF-8 (they cover
it exactly, see q2g.alignment), `logprobs` the teacher's log-probability of each of them (natural
log, temperature 1), `top` (with --teacher-logprobs K) the K most likely tokens at each position,
each as [token, logprob], the token as its text, or as the list of its byte values when it is not
valid UTF-8 on its own (part of a character: byte-level BPE, byte fallback).
A trace whose text is not a run of whole teacher tokens (a thinking teacher's reformatted trace,
whitespace stripped from inside a token) gets no line; the loss then has nothing to match for it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from q2g.errors import DataError
from q2g.io import atomic_write_text, read_jsonl_tolerant

SIDE_NAME = "teacher_logprobs"
FIELDS = ("id", "tokenizer", "text_sha256", "spans", "logprobs")


@dataclass(frozen=True)
class TokenLogprobs:
    """What a backend hands back for one sample: each generated token's bytes and log-prob, and
    optionally the top alternatives at each position as (bytes, logprob)."""

    pieces: list[bytes]
    logprobs: list[float]
    top: list[list[tuple[bytes, float]]] | None = None


@dataclass(frozen=True)
class TeacherLogprobs:
    """One loaded, checked line of the side file."""

    id: str
    tokenizer: str
    spans: list[tuple[int, int]]
    logprobs: list[float]
    top: list[list[tuple[bytes, float]]] | None = None


def side_path(traces_path: Path) -> Path:
    """teacher_logprobs[.shard-I-of-N].jsonl beside traces[.shard-I-of-N].jsonl."""
    return traces_path.with_name(traces_path.name.replace("traces", SIDE_NAME, 1))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _text(piece: bytes) -> str | list[int]:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


def side_entry(trace_id: str, tokenizer: str, text: str, tokens: TokenLogprobs) -> dict | None:
    """The side-file line of a trace whose teacher tokens are `tokens`; None when the trace text is
    not a run of whole tokens of them (the trace was reformatted, or stripped inside a token)."""
    data = text.encode("utf-8")
    raw = b"".join(tokens.pieces)
    ends = list(itertools.accumulate(len(p) for p in tokens.pieces))
    starts = [0, *ends[:-1]]
    start = raw.find(data) if data else -1
    if start < 0 or start not in starts or start + len(data) not in ends:
        return None
    i, j = starts.index(start), ends.index(start + len(data)) + 1
    while i < j - 1 and ends[i] == start:  # zero-byte tokens (a special token decoded to nothing) at the start
        i += 1
    row = {
        "id": trace_id,
        "tokenizer": tokenizer,
        "text_sha256": text_sha256(text),
        "spans": [[s - start, e - start] for s, e in zip(starts[i:j], ends[i:j])],
        "logprobs": [round(float(x), 5) for x in tokens.logprobs[i:j]],
    }
    if tokens.top is not None:
        row["top"] = [[[_text(p), round(float(x), 5)] for p, x in alts] for alts in tokens.top[i:j]]
    return row


def finish_side_file(path: Path, traces: list[dict]) -> None:
    """Rewrite the side file in trace order with one line per kept trace: the last line written for
    it whose text_sha256 matches its text (a regenerated batch may have appended a second one)."""
    if not path.exists():
        return
    want = {r["id"]: text_sha256(r["qwen_trace"]) for r in traces}
    last = {}
    for row in read_jsonl_tolerant(path, repair=True):
        if isinstance(row, dict) and want.get(row.get("id")) == row.get("text_sha256"):
            last[row["id"]] = row
    rows = [last[r["id"]] for r in traces if r["id"] in last]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_teacher_logprobs(path: Path, traces: dict[str, str]) -> dict[str, TeacherLogprobs]:
    """The side file's lines for the traces `traces` ({trace id: trace text}), checked: a line whose
    text_sha256 or spans do not fit its trace's text is refused (DataError naming the trace id and
    file:line). Lines of traces not in `traces` are left out; traces without a line have no entry."""
    from q2g.data.jsonl import read_jsonl_lines

    types = {"id": str, "tokenizer": str, "text_sha256": str, "spans": list, "logprobs": list}
    out = {}
    for lineno, row in read_jsonl_lines(path, required=FIELDS, types=types):
        text = traces.get(row["id"])
        if text is None:
            continue
        where = f"{path}:{lineno}: trace {row['id']!r}"
        if row["text_sha256"] != text_sha256(text):
            raise DataError(f"{where}: text_sha256 does not match the trace's text (log-probs of another text)")
        out[row["id"]] = _checked(row, len(text.encode("utf-8")), where)
    return out


def _checked(row: dict, n_bytes: int, where: str) -> TeacherLogprobs:
    spans, logprobs, top = row["spans"], row["logprobs"], row.get("top")
    try:
        spans = [(int(s), int(e)) for s, e in spans]
        logprobs = [float(x) for x in logprobs]
        top = None if top is None else [[(_bytes(t), float(x)) for t, x in alts] for alts in top]
    except (TypeError, ValueError):
        raise DataError(f"{where}: spans must be [start, end] pairs, logprobs and top numbers") from None
    prev = 0
    for start, end in spans:
        if start != prev or end < start:
            raise DataError(f"{where}: the spans do not cover the trace's {n_bytes} bytes without gaps")
        prev = end
    if prev != n_bytes:
        raise DataError(f"{where}: the spans cover {prev} bytes, the trace has {n_bytes}")
    if len(logprobs) != len(spans) or (top is not None and len(top) != len(spans)):
        raise DataError(f"{where}: {len(spans)} spans but {len(logprobs)} logprobs / {len(top or [])} top rows")
    return TeacherLogprobs(row["id"], row["tokenizer"], spans, logprobs, top)


def _bytes(token: str | list[int]) -> bytes:
    return token.encode("utf-8") if isinstance(token, str) else bytes(token)
