"""lm-evaluation-harness's wikitext task, text side: its documents, its detokenizer, its rolling
windows and its word count, so `--ppl-protocol lm-eval` scores what HFLM's `loglikelihood_rolling`
scores (tests/test_evaluate_metrics.py checks the pieces against lm-eval itself).
"""

from __future__ import annotations

import re


def rolling_windows(ids: list[int], max_length: int, prefix_id: int) -> list[tuple[list[int], list[int], int]]:
    """lm-evaluation-harness's `loglikelihood_rolling` windows (`get_rolling_token_windows` with
    context_len=1, made disjoint, as HFLM feeds them): every token is scored once, `max_length`
    per window; the first window is fed [prefix] + its tokens, each later one the `max_length`
    tokens before its last (so a short last window gets a full window of context)."""
    windows = []
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        inputs = [prefix_id] + ids[: end - 1] if start == 0 else ids[end - max_length - 1 : end - 1]
        windows.append((inputs, ids[start:end], 0))
    return windows


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness's wikitext task counts them, on the document text (a
    trailing newline adds one empty 'word' there too; kept so the numbers compare)."""
    return len(re.split(r"\s+", text))


def wikitext_documents(text: str) -> list[str]:
    """The text cut into articles as EleutherAI/wikitext_document_level does: a new document
    starts at each top-level ` = Title = ` line (`= = Section = =` lines stay inside)."""
    docs, lines = [], []
    for line in text.split("\n"):
        bare = line.replace("= = =", "===").replace("= =", "==").strip()
        if bare.startswith("= ") and bare.endswith(" ="):
            if "\n".join(lines).strip():
                docs.append("\n".join(lines))
            lines = []
        lines.append(line)
    return docs + ["\n".join(lines)]


# lm-eval's `wikitext_detokenizer`, in its order: plain replacements and regex substitutions.
_DETOKENIZE = (
    ("s '", "s'"),
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
    for old, new in _DETOKENIZE:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def _fit_prefix(doc: str, n_tokens: int, encode) -> str:
    """The longest prefix of `doc` cut after a run of whitespace whose encoding has <= n_tokens."""
    cuts = [m.end() for m in re.finditer(r"\s+", doc)]
    lo, hi = 0, len(cuts)  # cuts[:lo] fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encode(doc[: cuts[mid - 1]])) <= n_tokens else (lo, mid - 1)
    return doc[: cuts[lo - 1]] if lo else ""


def lm_eval_documents(tokenizer, text: str, detokenize: bool, max_tokens: int | None) -> tuple[list, bool]:
    """([(original document, its token ids)], truncated) as lm-eval's wikitext task scores them;
    with `max_tokens` the documents are kept in order up to the budget, the last one cut at a word."""

    # HFLM encodes with the tokenizer's own special tokens: a tokenizer that adds <bos> (Gemma)
    # puts one before the text, and it is scored after the <bos> prefix. Kept, so numbers compare.
    def encode(doc):
        return tokenizer(wikitext_detokenize(doc) if detokenize else doc)["input_ids"]

    out, left = [], max_tokens
    for doc in wikitext_documents(text):
        ids = encode(doc)
        if left is not None and len(ids) > left:
            doc = _fit_prefix(doc, left, encode)
            return out + ([(doc, encode(doc))] if doc else []), True
        out.append((doc, ids))
        left = None if left is None else left - len(ids)
    return out, False
