"""Byte-aligned chunks between two tokenizations of the same text (a teacher's and a student's).

Qwen (152k byte-level BPE) and Gemma (262k SentencePiece-style) cut a text differently, so their
token probabilities cannot be compared position by position. They can be compared per *chunk*:
a chunk closes where both tokenizations end a token on the same byte (Minixhofer et al. 2025, ALM;
TRL's GOLD groups tokens the same way), and the log-probability of a chunk on either side is the sum
of its tokens' log-probabilities. Chunk log-probs of one side sum to that side's sequence log-prob.

    spans_t = byte_spans(teacher_tok, text)          # [(start, end), ...] in text.encode("utf-8")
    spans_s = byte_spans(student_tok, text)
    ids_t, ids_s, n = chunk_ids(spans_t, spans_s)     # chunk index of every token on each side
    chunk_logprobs(teacher_token_logprobs, ids_t, n)  # per-chunk sums
    print(format_compat_report(compat_report(teacher_tok, student_tok, texts)))

Spans are exact when a tokenizer is lossless (its tokens' bytes concatenate to the text: byte-level
BPE, SentencePiece with byte fallback, added tokens); otherwise (a normalizer that changes the text,
unknown tokens) they come from the tokenizer's character offsets, a token that ends inside a
character taking its own byte length. Either way they cover the text without gaps or overlaps.
This module sits below generate/ and finetune/ and imports no stage.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import re
import weakref

Span = tuple[int, int]
_DIGIT = re.compile(rb"[0-9]")
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# The X-Token failure (NeMo RL): one tokenizer writes numbers digit by digit, the other in groups.
XTOKEN_WARNING = (
    "digit splitting differs: the {single} writes numbers one digit per token, the {grouped} up to {n} "
    "digits per token, so every multi-digit number is one chunk on the {single}'s side of many tokens. "
    "Methods that map token distributions one-to-one across tokenizers fail here (NeMo RL's X-Token "
    "analysis of GOLD); chunk likelihoods stay exact but carry less signal on numbers."
)


class _TokenBytes:
    """id -> the bytes a token stands for, filled lazily (a vocabulary has up to 262k tokens)."""

    def __init__(self, tokenizer):
        backend = tokenizer.backend_tokenizer
        self.backend = backend
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.byte_level = "ByteLevel" in repr(backend.decoder) or "ByteLevel" in repr(backend.pre_tokenizer)
        self.unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()} if self.byte_level else {}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        got = self.cache.get(token_id)
        if got is None:
            got = self.cache[token_id] = self._lookup(token_id)
        return got

    def many(self, ids: list[int]) -> list[bytes]:
        get = self.cache.get
        pieces = [get(i) for i in ids]
        if None in pieces:
            pieces = [self(i) for i in ids]
        return pieces

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.backend.id_to_token(token_id) or ""
        if self.byte_level and all(c in self.unicode_to_byte for c in piece):
            return bytes(self.unicode_to_byte[c] for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece's word marker is a space


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of every byte-level BPE)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _table(tokenizer) -> _TokenBytes:
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = _TokenBytes(tokenizer)
    return table


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes that token `token_id` stands for under `tokenizer` (an HF fast tokenizer)."""
    return _table(tokenizer)(token_id)


def encode_with_spans(tokenizer, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
    """(token ids, byte spans) of every text, no special tokens added; one batched encode."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [(enc.ids, _spans(tokenizer, text, enc)) for text, enc in zip(texts, encodings)]


def byte_spans(tokenizer, text: str) -> list[Span]:
    """[start, end) byte offsets into text.encode('utf-8') of each token of `text` (no specials added)."""
    return encode_with_spans(tokenizer, [text])[0][1]


def byte_spans_batch(tokenizer, texts: list[str]) -> list[list[Span]]:
    """byte_spans of many texts in one batched encode."""
    return [spans for _, spans in encode_with_spans(tokenizer, texts)]


def _spans(tokenizer, text: str, encoding) -> list[Span]:
    data = text.encode("utf-8")
    pieces = _table(tokenizer).many(encoding.ids)
    lengths = list(map(len, pieces))
    if b"".join(pieces) == data:
        return _from_ends(list(itertools.accumulate(lengths)))  # lossless: exact
    return _from_ends(_ends_from_offsets(text, encoding.offsets, lengths, len(data)))


def _ends_from_offsets(text: str, offsets: list[Span], lengths: list[int], total: int) -> list[int]:
    """Each token's end byte from its character offsets; a token whose successor starts inside its
    last character ends mid-character, after its own byte length."""
    char_to_byte = [0, *itertools.accumulate(len(c.encode("utf-8")) for c in text)]
    ends, prev = [], 0
    for i, (_, char_end) in enumerate(offsets):
        end = char_to_byte[char_end]
        if i + 1 < len(offsets) and offsets[i + 1][0] < char_end:
            end = min(end, prev + lengths[i])
        prev = max(end, prev)
        ends.append(prev)
    if ends:
        ends[-1] = total  # whatever the offsets left out at the end belongs to the last token
    return ends


def _from_ends(ends: list[int]) -> list[Span]:
    return list(zip([0, *ends[:-1]], ends)) if ends else []


def _check_cover(spans: list[Span], side: str) -> int:
    """The bytes `spans` cover; ValueError at a gap, an overlap or a negative span."""
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    if starts[:1] in ([], [0]) and starts[1:] == ends[:-1] and all(map(operator.le, starts, ends)):
        return ends[-1] if ends else 0
    prev = 0
    for k, (start, end) in enumerate(spans):
        if start != prev or end < start:
            raise ValueError(f"side {side}: token {k} spans [{start}, {end}) after byte {prev}: a gap or overlap")
        prev = end
    raise AssertionError("unreachable")


def common_ends(spans_a: list[Span], spans_b: list[Span]) -> list[int]:
    """The bytes (> 0, ascending) where a token of each side ends: the ends of the chunks."""
    return sorted({end for _, end in spans_a if end > 0} & {end for _, end in spans_b if end > 0})


def chunk_ids(spans_a: list[Span], spans_b: list[Span]) -> tuple[list[int], list[int], int]:
    """For each token of side a and of side b, the index of its chunk, and the number of chunks.

    A chunk closes at every byte > 0 where a token of a and a token of b both end; both sides must
    cover the same bytes. A token of zero bytes joins the chunk its end falls in.
    """
    total_a, total_b = _check_cover(spans_a, "a"), _check_cover(spans_b, "b")
    if total_a != total_b:
        raise ValueError(f"the two tokenizations cover {total_a} and {total_b} bytes: not the same text")
    common = common_ends(spans_a, spans_b)
    index = functools.partial(bisect.bisect_left, common)
    ids_a = list(map(index, (end for _, end in spans_a)))
    ids_b = list(map(index, (end for _, end in spans_b)))
    return ids_a, ids_b, len(common)


def chunk_logprobs(token_logprobs, ids: list[int], n_chunks: int) -> list[float]:
    """Per-chunk sums of per-token log-probs (ids from chunk_ids)."""
    if len(token_logprobs) != len(ids):
        raise ValueError(f"{len(token_logprobs)} log-probs for {len(ids)} tokens")
    sums = [0.0] * n_chunks
    for lp, k in zip(token_logprobs, ids):
        sums[k] += float(lp)
    return sums


def _side_stats(tokenizer, encoded) -> dict:
    """Token counts and how this tokenizer writes digits, over the report's texts."""
    n_tokens = sum(len(ids) for ids, _ in encoded)
    digit_tokens = single = widest = 0
    for ids, _ in encoded:
        for i in ids:
            n = len(_DIGIT.findall(token_bytes(tokenizer, i)))
            if n:
                digit_tokens += 1
                single += n == 1
                widest = max(widest, n)
    probe = [
        token_bytes(tokenizer, i).decode("utf-8", "replace") for i in encode_with_spans(tokenizer, ["1234567"])[0][0]
    ]
    return {
        "name": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "tokens": n_tokens,
        "digit_tokens": digit_tokens,
        "single_digit_share": single / digit_tokens if digit_tokens else None,
        "max_digits_per_token": widest,
        "splits_digits": widest <= 1,
        "digits_1234567": probe,
        "eos_token": tokenizer.eos_token,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def compat_report(tok_teacher, tok_student, texts: list[str]) -> dict:
    """How well two tokenizers align on `texts`: share of bytes in one-token-to-one-token chunks,
    mean chunk length, digit splitting on each side, EOS and chat-template differences, warnings."""
    texts = [t for t in texts if t]
    enc_t, enc_s = encode_with_spans(tok_teacher, texts), encode_with_spans(tok_student, texts)
    n_bytes = one_to_one = n_chunks = 0
    for (_, spans_t), (_, spans_s) in zip(enc_t, enc_s):
        ids_t, ids_s, n = chunk_ids(spans_t, spans_s)
        count_t, count_s = [0] * n, [0] * n
        for k in ids_t:
            count_t[k] += 1
        for k in ids_s:
            count_s[k] += 1
        ends = common_ends(spans_t, spans_s)
        for k in range(n):
            if count_t[k] == 1 and count_s[k] == 1:
                one_to_one += ends[k] - (ends[k - 1] if k else 0)
        n_bytes += spans_t[-1][1] if spans_t else 0
        n_chunks += n
    teacher, student = _side_stats(tok_teacher, enc_t), _side_stats(tok_student, enc_s)
    report = {
        "texts": len(texts),
        "bytes": n_bytes,
        "chunks": n_chunks,
        "one_to_one_byte_share": one_to_one / n_bytes if n_bytes else None,
        "mean_chunk_bytes": n_bytes / n_chunks if n_chunks else None,
        "teacher_tokens_per_chunk": teacher["tokens"] / n_chunks if n_chunks else None,
        "student_tokens_per_chunk": student["tokens"] / n_chunks if n_chunks else None,
        "teacher": teacher,
        "student": student,
        "same_eos": teacher["eos_token"] == student["eos_token"],
        "same_chat_template": getattr(tok_teacher, "chat_template", None)
        == getattr(tok_student, "chat_template", None),
    }
    report["warnings"] = _warnings(report)
    return report


def _warnings(report: dict) -> list[str]:
    teacher, student = report["teacher"], report["student"]
    out = []
    if teacher["digit_tokens"] and student["digit_tokens"] and teacher["splits_digits"] != student["splits_digits"]:
        single, grouped = ("teacher", "student") if teacher["splits_digits"] else ("student", "teacher")
        out.append(XTOKEN_WARNING.format(single=single, grouped=grouped, n=report[grouped]["max_digits_per_token"]))
    if not report["same_eos"]:
        out.append(
            f"EOS differs (teacher {teacher['eos_token']!r}, student {student['eos_token']!r}): the end of a "
            "trace is learned from the student's own EOS label, not from the teacher's probability of its EOS."
        )
    if not report["same_chat_template"]:
        out.append(
            "chat templates differ: teacher log-probs were taken in the teacher's prompt format; only the trace "
            "text (not the prompt) is aligned."
        )
    return out


def format_compat_report(d: dict) -> str:
    """The report as a few printable lines."""
    share = d["one_to_one_byte_share"]
    lines = [
        f"Tokenizer compatibility over {d['texts']} texts ({d['bytes']} bytes, {d['chunks']} chunks):",
        f"  bytes in one-token-to-one-token chunks: {share:.1%}" if share is not None else "  no text",
    ]
    if d["mean_chunk_bytes"] is not None:
        lines.append(
            f"  mean chunk: {d['mean_chunk_bytes']:.2f} bytes, {d['teacher_tokens_per_chunk']:.2f} teacher / "
            f"{d['student_tokens_per_chunk']:.2f} student tokens"
        )
    for side in ("teacher", "student"):
        s = d[side]
        digits = "one digit per token" if s["splits_digits"] else f"up to {s['max_digits_per_token']} digits per token"
        lines.append(
            f"  {side} {s['name']}: vocab {s['vocab_size']}, {s['tokens']} tokens, {digits} "
            f"('1234567' -> {'|'.join(s['digits_1234567'])}), EOS {s['eos_token']!r}, "
            f"chat template {'yes' if s['has_chat_template'] else 'no'}"
        )
    lines += [f"  WARNING: {w}" for w in d["warnings"]]
    return "\n".join(lines)
