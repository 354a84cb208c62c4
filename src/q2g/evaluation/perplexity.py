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
"""

from __future__ import annotations

import math

from q2g import scoring as forward_nll
from q2g.errors import BadInput
from q2g.evaluation.model_state import (
    LOGITS_BUDGET_BYTES,
    autocast,
    bytes_per_position,
    eval_mode,
    progress_bar,
)
from q2g.evaluation.wikitext import count_words, lm_eval_documents, rolling_windows

# A window is (input ids, target ids, tail): the logits of the len(targets) positions that
# end `tail` positions before the input's end predict the targets.


def plan_windows(n_tokens: int, max_length: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) text-token indices of each window: the model sees
    [bos] + ids[begin:end] (or ids[begin:end]) and is scored on ids[first_scored:end]."""
    if max_length < 2 or not 1 <= stride <= max_length - 1:
        raise ValueError(f"need max_length >= 2 and 1 <= stride < max_length, got {max_length}, {stride}")
    budget = max_length - 1 if bos else max_length
    windows, begin, prev_end = [], 0, 0
    while n_tokens:
        end = min(begin + budget, n_tokens)
        # Without bos a window's first token has no context, so it cannot be scored.
        windows.append((begin, end, max(prev_end, begin + (0 if bos else 1))))
        if end == n_tokens:
            break
        begin, prev_end = begin + stride, end
    return windows


def q2g_windows(ids: list[int], max_length: int, stride: int, bos_id) -> list[tuple[list[int], list[int], int]]:
    prefix = [bos_id] if bos_id is not None else []
    return [
        (prefix + ids[b:e], ids[f:e], 1) for b, e, f in plan_windows(len(ids), max_length, stride, bos_id is not None)
    ]


def _window_batches(windows, max_windows: int, per_position: int):
    """Consecutive windows of equal input length, grouped so their kept logits fit the budget."""
    batch: list = []
    for w in windows:
        kept = max(len(t) + tail for _, t, tail in batch + [w])
        too_big = (len(batch) + 1) * kept * per_position > LOGITS_BUDGET_BYTES
        if batch and (len(w[0]) != len(batch[0][0]) or len(batch) >= max_windows or too_big):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _batch_nll(model, batch) -> float:
    """Summed NLL of the targets of a batch of equal-length windows (forward_nll: the decoder's
    hidden states through the LM head a chunk at a time, no [B, T, V] logits)."""
    return forward_nll.windows_nll(model, batch)


def windows_nll(model, windows, batch_size: int, progress=True, precision=None) -> float:
    """Summed NLL of every window's targets, `batch_size` windows (at most) per forward."""
    import torch

    per_position = bytes_per_position(model, precision)
    nll = 0.0
    n_targets = sum(len(t) for _, t, _ in windows)
    with (
        eval_mode(model),
        autocast(model, precision),
        torch.inference_mode(),
        progress_bar(progress, total=n_targets, desc="perplexity", unit="tok", unit_scale=True) as bar,
    ):
        for batch in _window_batches(windows, batch_size, per_position):
            nll += _batch_nll(model, batch)
            bar.update(sum(len(t) for _, t, _ in batch))
    return nll


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
