"""WikiText perplexity of an in-memory model, by `--ppl-protocol`.

Perplexity, `--ppl-protocol`:
- `q2g` (default): sliding windows as in the Hugging Face perplexity guide. The text is
  tokenized once without special tokens, cut into windows of `ppl_max_length` tokens that move
  by `ppl_stride`, and each window scores only the tokens the previous one did not. If the
  tokenizer has a bos token, *every* window is fed as [bos] + its tokens (bos counts in the
  window length and is never scored; Gemma's perplexity changes a lot without it), so the
  text's first token is scored too; without one (Qwen) a window's first token is context only.
- `lm-eval`: lm-evaluation-harness's `wikitext` task (HFLM's `loglikelihood_rolling`): the text
  is cut into articles at its top-level ` = Title = ` lines, each article detokenized
  (`wikitext_detokenize`) and encoded with the tokenizer's own special tokens, and scored in
  disjoint windows of `ppl_max_length` predictions, the first fed [bos] (eos without one) before
  its tokens (`rolling_windows`). Set `--ppl-max-length` to lm-eval's max_length to compare.
  Note q2g's WikiText copies hold the non-empty rows only (data.load_wikitext), while
  lm-eval's articles keep the blank rows around headings: same computation, slightly other text.
- `lm-eval-raw`: the same without the detokenizer.
Word/byte perplexity and bits per byte follow lm-eval: words are `len(re.split(r"\\s+", text))`
and bytes `len(text.encode("utf-8"))` of the scored text (lm-eval: of each original article).

lm-evaluation-harness's wikitext task, text side: its documents, its detokenizer, its rolling
windows and its word count, so `--ppl-protocol lm-eval` scores what HFLM's `loglikelihood_rolling`
scores (tests/test_evaluate_metrics.py checks the pieces against lm-eval itself).
"""

from __future__ import annotations

import math
import re

from q2g.errors import BadInput
from q2g.scoring import q2g_windows, windows_nll


def _exp(x: float) -> float:
    """exp, inf past float range (math.exp raises OverflowError there; inf is then refused as non-finite)."""
    return math.inf if x > 709 else math.exp(x)  # NaN stays NaN


def _ppl_numbers(nll: float, n_scored: int, n_words: int, n_bytes: int) -> dict:
    return {
        "token_perplexity": _exp(nll / n_scored),
        "word_perplexity": _exp(nll / n_words),
        "byte_perplexity": _exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "n_tokens_scored": n_scored,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "nll_sum": nll,
    }


def perplexity(model, tokenizer, text: str, cfg, progress=True, precision=None) -> dict:
    """WikiText perplexity of `text` by `cfg.ppl_protocol` (`cfg`: an evaluation.config.EvalConfig;
    not imported here, so the demo model's check can use this module below models.py)."""
    if cfg.ppl_protocol == "q2g":
        return q2g_perplexity(
            model,
            tokenizer,
            text,
            cfg.ppl_max_length,
            cfg.ppl_stride,
            cfg.ppl_max_tokens,
            cfg.eval_batch_size,
            progress,
            precision,
        )
    return lm_eval_perplexity(
        model,
        tokenizer,
        text,
        cfg.ppl_protocol == "lm-eval",
        cfg.ppl_max_length,
        cfg.ppl_max_tokens,
        cfg.eval_batch_size,
        progress,
        precision,
    )


def q2g_perplexity(
    model, tokenizer, text, max_length, stride, max_tokens=None, batch_size=8, progress=True, precision=None
) -> dict:
    """The q2g protocol. With `max_tokens` the text is cut to its first that-many tokens and words
    and bytes are counted on the decoded cut text, so word/byte perplexity stay ratios over the
    same text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = bool(max_tokens) and len(ids) > max_tokens
    if truncated:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    bos_id = tokenizer.bos_token_id
    windows = q2g_windows(ids, max_length, stride, bos_id)
    n_scored = sum(len(t) for _, t, _ in windows)
    if n_scored == 0:
        raise BadInput(
            f"WikiText perplexity: {len(ids)} token(s) of text leave none to score (--ppl-max-tokens {max_tokens}; "
            f"without <bos> a window's first token is context only): give more text or a larger --ppl-max-tokens"
        )
    nll = windows_nll(model, windows, batch_size, progress, precision)
    return {
        **_ppl_numbers(nll, n_scored, count_words(text), len(text.encode("utf-8"))),
        "protocol": "q2g",
        "n_tokens": len(ids),
        "n_windows": len(windows),
        "max_length": max_length,
        "stride": stride,
        "bos": tokenizer.bos_token if bos_id is not None else None,
        "truncated": truncated,
    }


def lm_eval_perplexity(
    model, tokenizer, text, detokenize, max_length, max_tokens=None, batch_size=8, progress=True, precision=None
) -> dict:
    """lm-eval's wikitext task (`detokenize`: lm-eval, else lm-eval-raw); it has no stride. With
    `max_tokens` whole documents are kept up to the budget and the last one is cut at a word."""
    docs, truncated = lm_eval_documents(tokenizer, text, detokenize, max_tokens)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = [w for _, ids in docs for w in rolling_windows(ids, max_length, prefix)]
    n_scored = sum(len(ids) for _, ids in docs)
    if n_scored == 0:
        raise BadInput(
            f"WikiText perplexity: no token to score (empty text, or --ppl-max-tokens {max_tokens} too small)"
        )
    nll = windows_nll(model, windows, batch_size, progress, precision)
    n_words, n_bytes = sum(count_words(d) for d, _ in docs), sum(len(d.encode("utf-8")) for d, _ in docs)
    return {
        **_ppl_numbers(nll, n_scored, n_words, n_bytes),
        "protocol": "lm-eval" if detokenize else "lm-eval-raw",
        "n_tokens": n_scored,
        "n_documents": len(docs),
        "n_windows": len(windows),
        "max_length": max_length,
        "stride": None,
        "bos": tokenizer.bos_token,
        "prefix_token": tokenizer.convert_ids_to_tokens(prefix),
        "truncated": truncated,
    }


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
