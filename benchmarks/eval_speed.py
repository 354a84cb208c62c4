"""Speed of evaluation on the real Gemma 3 270M, old vs new side by side in one process:

- pass@1 decoding: HF `model.generate` per length-sorted batch (decoding.generate_static) vs q2g's
  decoding.generate (the refill loop), at the same batch, on GSM8K problems, with evaluation's end
  tokens and stop strings; generated tok/s, the ratio, and whether the tokens are the same.
- held-out loss: logits of every position (the path evaluation used before, kept here as `logits_examples_nll`) vs forward_nll.labels_nll (LM
  head only on the solution's positions, chunked); solution tokens/s and both losses.
- perplexity: the kept-logits path evaluation used before (`logits_windows_nll`) vs forward_nll.windows_nll on the same q2g windows; scored tok/s.

Each pair runs alternately `--reps` times (best time kept), so a machine's load hits both alike.

    python benchmarks/eval_speed.py --threads 2                                   # the lead's numbers, alone
    python benchmarks/eval_speed.py --threads 2 --problems 8 --new-tokens 32 --heldout 4 --ppl-tokens 512
    python benchmarks/eval_speed.py --model <tiny model folder> --problems 4 --new-tokens 8   # a smoke run

Defaults: 15 problems x up to 96 new tokens at batch 8, 15 held-out solutions, 2048 WikiText
tokens (window 512, stride 256). Run on purpose, never as a timed test. The first run converts
the model (~1 min, once).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from q2g import decoding, models, prompts
from q2g import scoring as forward_nll
from q2g.data import loaders
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.heldout_loss import _example_batches, heldout_examples
from q2g.scoring import _window_batches, q2g_windows

CE_CHUNK = 1024  # the old path's fp32 log-softmax slice


def logits_examples_nll(model, batch, pad_id) -> tuple[float, int]:
    """The old held-out path: full [B, T, V] logits, then the labelled positions' cross-entropy."""
    import torch.nn.functional as F

    from q2g.examples import IGNORE_INDEX, Collator

    cols = Collator(pad_id)(batch)
    logits = model(input_ids=cols["input_ids"], attention_mask=cols["attention_mask"], use_cache=False).logits
    total, count = 0.0, 0
    for row, labels in zip(logits, cols["labels"]):
        keep = labels[1:] != IGNORE_INDEX
        preds, target = row[:-1][keep], labels[1:][keep]
        for a in range(0, len(target), CE_CHUNK):
            total += F.cross_entropy(preds[a : a + CE_CHUNK].float(), target[a : a + CE_CHUNK], reduction="sum").item()
        count += len(target)
    return total, count


def logits_windows_nll(model, batch) -> float:
    """The old perplexity path: the kept logits of a batch of equal-length windows."""
    import torch
    import torch.nn.functional as F

    inputs = torch.tensor([inp for inp, _, _ in batch])
    keep = max(len(t) + tail for _, t, tail in batch)
    logits = model(input_ids=inputs, logits_to_keep=keep, use_cache=False).logits
    total = 0.0
    for row, (_, targets, tail) in zip(logits, batch):
        preds = row[keep - tail - len(targets) : keep - tail]
        total += F.cross_entropy(preds.float(), torch.tensor(targets), reduction="sum").item()
    return total


def best_of(reps: int, pair: dict) -> dict:
    """{name: (seconds, result)} of each function in `pair`, alternating, best of `reps`."""
    out: dict = {}
    for _ in range(reps):
        for name, fn in pair.items():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            if name not in out or seconds < out[name][0]:
                out[name] = (seconds, result)
    return out


def pass1_rows(model, tok, problems, args) -> list[dict]:
    ids = [prompts.student_prompt_ids(tok, p["problem"]) for p in problems]
    kw = dict(
        max_new_tokens=args.new_tokens,
        end_ids=prompts.end_token_ids(tok),
        stop_strings=prompts.STUDENT_STOP_STRINGS,
        batch_size=args.batch_size,
    )
    runs = best_of(
        args.reps,
        {
            "HF generate (static batches)": lambda: decoding.generate_static(model, tok, ids, **kw),
            "q2g decoding.generate": lambda: decoding.generate(model, tok, ids, **kw),
        },
    )
    (old_s, old), (new_s, new) = runs.values()
    same = "yes" if [g.token_ids for g in old] == [g.token_ids for g in new] else "NO"
    n = sum(g.n_tokens for g in new)
    return [
        {"what": name, "tokens": n, "seconds": s, "value": "", "same": same if i else ""}
        for i, (name, (s, _)) in enumerate(runs.items())
    ]


def heldout_rows(model, tok, records, args) -> list[dict]:
    import torch

    from q2g.examples import Collator

    examples, _ = heldout_examples(tok, records, 1024)
    batches = list(_example_batches(examples, args.batch_size, 4 * model.config.get_text_config().vocab_size))

    def old():
        sums = [logits_examples_nll(model, b, tok.pad_token_id) for b in batches]
        return sum(s for s, _ in sums), sum(n for _, n in sums)

    def new():
        sums = []
        for b in batches:
            cols = Collator(tok.pad_token_id)(b)
            sums.append(forward_nll.labels_nll(model, cols["input_ids"], cols["attention_mask"], cols["labels"]))
        return sum(s for s, _ in sums), sum(n for _, n in sums)

    with torch.inference_mode():
        runs = best_of(args.reps, {"held-out loss, all logits": old, "held-out loss, forward_nll": new})
    return [
        {"what": name, "tokens": n, "seconds": s, "value": f"{nll / n:.5f}", "same": ""}
        for name, (s, (nll, n)) in runs.items()
    ]


def ppl_rows(model, tok, text, args) -> list[dict]:
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"][: args.ppl_tokens]
    cfg = EvalConfig(ppl_max_length=512, ppl_stride=256, eval_batch_size=args.batch_size)
    windows = q2g_windows(ids, cfg.ppl_max_length, cfg.ppl_stride, tok.bos_token_id)
    batches = list(_window_batches(windows, args.batch_size, 4 * model.config.get_text_config().vocab_size))
    n = sum(len(t) for _, t, _ in windows)
    with torch.inference_mode():
        runs = best_of(
            args.reps,
            {
                "perplexity, kept logits": lambda: sum(logits_windows_nll(model, b) for b in batches),
                "perplexity, forward_nll": lambda: sum(forward_nll.batch_nll(model, b) for b in batches),
            },
        )
    return [
        {"what": name, "tokens": n, "seconds": s, "value": f"{nll / n:.5f}", "same": ""}
        for name, (s, nll) in runs.items()
    ]


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("measurement", "tokens", "seconds", "tok/s", "x old", "mean NLL", "same tokens"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for i, row in enumerate(rows):
        old = rows[i - i % 2]  # rows come in (old, new) pairs
        table.add_row(
            row["what"],
            str(row["tokens"]),
            f"{row['seconds']:.2f}",
            f"{row['tokens'] / row['seconds']:.1f}",
            f"{old['seconds'] / row['seconds']:.2f}",
            row["value"],
            row["same"],
        )
    Console(width=130).print(table)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=models.DEMO_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--problems", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout", type=int, default=15, help="held-out solutions (0: skip)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="WikiText tokens (0: skip)")
    p.add_argument("--reps", type=int, default=2, help="alternating runs of each pair; the best time is kept")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write every table's rows to this JSON file (gpu_proof.py reads it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.pick_device(args.device)
    model = models.load_model(args.model, torch.float32, device).eval()
    tok = models.load_tokenizer(args.model, padding_side="left")
    problems = loaders.load_gsm8k("test", "packaged")
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    warm = [prompts.student_prompt_ids(tok, "1 + 1?")]
    decoding.generate(model, tok, warm, max_new_tokens=2)  # warm-up; the next one imports q2g.finetune.loss (~5 s)
    with torch.inference_mode():
        forward_nll.batch_nll(model, [(warm[0], warm[0][1:], 1)])
    tables = {"pass1": pass1_rows(model, tok, problems[: args.problems], args)}
    print_table(
        tables["pass1"],
        f"pass@1 decoding: {args.problems} GSM8K problems, <= {args.new_tokens} new tokens, batch {args.batch_size}",
    )
    if args.heldout:
        tables["heldout"] = heldout_rows(model, tok, problems[: args.heldout], args)
        print_table(tables["heldout"], f"held-out loss: {args.heldout} solutions")
    if args.ppl_tokens:
        tables["ppl"] = ppl_rows(model, tok, loaders.load_wikitext("packaged"), args)
        print_table(tables["ppl"], f"perplexity: {args.ppl_tokens} WikiText tokens, window 512/256")
    if args.json:
        meta = {"problems": args.problems, "batch_size": args.batch_size, "new_tokens": args.new_tokens}
        Path(args.json).write_text(json.dumps({**meta, **tables}, indent=1))


if __name__ == "__main__":
    main()
