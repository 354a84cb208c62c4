"""Speed of q2g.evaluate on the real Gemma 3 270M: greedy generation tokens/s at batch 1 vs 8
(fp32, and bf16 autocast on the CPU), and sliding-window perplexity tokens/s at window 512 vs 1024.

    python benchmarks/eval_speed.py                      # ~10 min on 2 idle CPU cores
    python benchmarks/eval_speed.py --problems 4 --new-tokens 16 --ppl-tokens 1024   # quick look

Run on purpose, never as a timed test. The first run converts the model (~1 min, once).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext


def autocast(kind: str, device: str):
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if kind == "bf16-autocast" else nullcontext()


def bench_generation(model, tok, problems, new_tokens, batch_size, kind, device) -> dict:
    from q2g import generation, prompts

    ids = [prompts.student_prompt_ids(tok, p["problem"]) for p in problems]
    start = time.perf_counter()
    with autocast(kind, device):
        # No stop strings / end ids: every row runs the full budget, so rows/s compare fairly.
        gens = generation.generate(model, tok, ids, max_new_tokens=new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    n = sum(g.n_tokens for g in gens)
    return {"what": f"generate {kind} batch {batch_size}", "tokens": n, "seconds": seconds, "tok_s": n / seconds}


def bench_ppl(model, tok, text, max_length, n_tokens, batch_size, kind, device) -> dict:
    from q2g.evaluate import EvalConfig, perplexity

    cfg = EvalConfig(ppl_max_length=max_length, ppl_stride=max_length // 2, ppl_max_tokens=n_tokens, eval_batch_size=batch_size)
    start = time.perf_counter()
    with autocast(kind, device):
        r = perplexity(model, tok, text, cfg, progress=False)
    seconds = time.perf_counter() - start
    return {"what": f"perplexity {kind} len {max_length} stride {max_length // 2} batch {batch_size}",
            "tokens": r["n_tokens_scored"], "seconds": seconds, "tok_s": r["n_tokens_scored"] / seconds,
            "ppl": r["token_perplexity"]}


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("measurement", "tokens", "seconds", "tok/s", "x first row", "token ppl"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        ppl = f"{row['ppl']:.3f}" if "ppl" in row else ""
        table.add_row(row["what"], str(row["tokens"]), f"{row['seconds']:.1f}", f"{row['tok_s']:.1f}",
                      f"{row['tok_s'] / rows[0]['tok_s']:.2f}", ppl)
    Console(width=130).print(table)


def main() -> None:
    import torch

    from q2g import data, models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=models.DEMO_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.pick_device(args.device)
    model = models.load_model(args.model, torch.float32, device).eval()
    tok = models.load_tokenizer(args.model, padding_side="left")
    problems = data.load_gsm8k("test", "packaged")[: args.problems]
    text = data.load_wikitext("packaged")
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bench_generation(model, tok, problems[:1], 4, 1, "fp32", device)  # warm-up

    gen_rows = [bench_generation(model, tok, problems, args.new_tokens, bs, kind, device)
                for kind in ("fp32", "bf16-autocast") for bs in (1, 8)]
    print_table(gen_rows, f"greedy generation: {len(problems)} GSM8K problems x {args.new_tokens} new tokens")
    ppl_rows = [bench_ppl(model, tok, text, length, args.ppl_tokens, bs, "fp32", device)
                for length in (512, 1024) for bs in (1, 8)]
    # bf16 autocast is ~5x slower on CPUs without native bf16 matmuls: a quarter of the text shows it.
    ppl_rows.append(bench_ppl(model, tok, text, 1024, args.ppl_tokens // 4, 8, "bf16-autocast", device))
    print_table(ppl_rows, f"sliding-window perplexity over the first {args.ppl_tokens} WikiText tokens")


if __name__ == "__main__":
    main()
