"""Speed of q2g.evaluate on the real Gemma 3 270M: pass@1 decoding old vs new (one
`model.generate` per length-sorted batch vs the refill loop, which drops finished rows and
refills their slots; same tokens, checked here), greedy generation tokens/s at batch 1 vs 8 (fp32,
and bf16 autocast on the CPU), and sliding-window perplexity tokens/s at window 512 vs 1024.

    python benchmarks/eval_speed.py                      # ~10 min on 2 idle CPU cores
    python benchmarks/eval_speed.py --problems 4 --new-tokens 16 --ppl-tokens 1024   # quick look
    python benchmarks/eval_speed.py --model <tiny model folder> --only pass1 --extra-stop e   # a smoke run

The pass@1 table decodes as evaluation does (end tokens and "\nProblem:" stop): its gain is the
share of slots a static batch wastes on rows that already ended, so it depends on how unevenly the
model stops. `--extra-stop` adds stop strings, to make a random tiny model stop unevenly.
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
    from q2g import prompts
    from q2g.evaluation import decoding

    ids = [prompts.student_prompt_ids(tok, p["problem"]) for p in problems]
    start = time.perf_counter()
    with autocast(kind, device):
        # No stop strings / end ids: every row runs the full budget, so rows/s compare fairly.
        gens = decoding.generate(model, tok, ids, max_new_tokens=new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    n = sum(g.n_tokens for g in gens)
    return {"what": f"generate {kind} batch {batch_size}", "tokens": n, "seconds": seconds, "tok_s": n / seconds}


def bench_pass1(model, tok, problems, new_tokens, batch_size, path, device, extra_stop=()) -> tuple[dict, list]:
    """pass@1 decoding as evaluation runs it, by the `static` (old) or `refill` (new) path."""
    from q2g import prompts
    from q2g.evaluation import decoding

    ids = [prompts.student_prompt_ids(tok, p["problem"]) for p in problems]
    run = decoding.generate_static if path == "static" else decoding.generate_refill
    forwards = [0]  # model forwards (decode steps + prefills): the machine-independent cost
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    start = time.perf_counter()
    try:
        gens = run(
            model,
            tok,
            ids,
            max_new_tokens=new_tokens,
            end_ids=prompts.end_token_ids(tok),
            stop_strings=(*prompts.STUDENT_STOP_STRINGS, *extra_stop),
            batch_size=batch_size,
        )
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    n = sum(g.n_tokens for g in gens)
    return {
        "what": f"pass@1 decode {path} batch {batch_size}",
        "tokens": n,
        "seconds": seconds,
        "tok_s": n / seconds,
        "problems_s": len(ids) / seconds,
        "stopped": sum(g.stopped for g in gens),
        "forwards": forwards[0],
    }, gens


def print_pass1_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "measurement",
        "new tokens",
        "rows stopped",
        "forwards",
        "seconds",
        "problems/s",
        "x static",
        "same tokens",
    ):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        table.add_row(
            row["what"],
            str(row["tokens"]),
            str(row["stopped"]),
            str(row["forwards"]),
            f"{row['seconds']:.2f}",
            f"{row['problems_s']:.2f}",
            f"{row['speedup']:.2f}",
            row["same"],
        )
    Console(width=130).print(table)


def pass1_rows(model, tok, problems, args, device) -> list[dict]:
    rows = []
    for bs in args.pass1_batch_sizes:
        old, old_gens = bench_pass1(model, tok, problems, args.new_tokens, bs, "static", device, args.extra_stop)
        new, new_gens = bench_pass1(model, tok, problems, args.new_tokens, bs, "refill", device, args.extra_stop)
        same = "yes" if [g.token_ids for g in old_gens] == [g.token_ids for g in new_gens] else "NO"
        rows += [
            {**old, "speedup": 1.0, "same": ""},
            {**new, "speedup": old["seconds"] / new["seconds"], "same": same},
        ]
    return rows


def bench_ppl(model, tok, text, max_length, n_tokens, batch_size, kind, device) -> dict:
    from q2g.evaluate import EvalConfig, perplexity

    cfg = EvalConfig(
        ppl_max_length=max_length, ppl_stride=max_length // 2, ppl_max_tokens=n_tokens, eval_batch_size=batch_size
    )
    start = time.perf_counter()
    with autocast(kind, device):
        r = perplexity(model, tok, text, cfg, progress=False)
    seconds = time.perf_counter() - start
    return {
        "what": f"perplexity {kind} len {max_length} stride {max_length // 2} batch {batch_size}",
        "tokens": r["n_tokens_scored"],
        "seconds": seconds,
        "tok_s": r["n_tokens_scored"] / seconds,
        "ppl": r["token_perplexity"],
    }


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("measurement", "tokens", "seconds", "tok/s", "x first row", "token ppl"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows:
        ppl = f"{row['ppl']:.3f}" if "ppl" in row else ""
        table.add_row(
            row["what"],
            str(row["tokens"]),
            f"{row['seconds']:.1f}",
            f"{row['tok_s']:.1f}",
            f"{row['tok_s'] / rows[0]['tok_s']:.2f}",
            ppl,
        )
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
    p.add_argument("--pass1-problems", type=int, default=32, help="GSM8K + MATH problems for the pass@1 table")
    p.add_argument("--pass1-batch-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--extra-stop", nargs="*", default=[], help="stop strings added in the pass@1 table")
    p.add_argument("--only", choices=("all", "pass1"), default="all")
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
    mixed = data.load_gsm8k("test", "packaged")[: args.pass1_problems // 2]
    mixed += data.load_math("test", data_dir="packaged")[: args.pass1_problems - len(mixed)]
    print_pass1_table(
        pass1_rows(model, tok, mixed, args, device),
        f"pass@1 decoding: {len(mixed)} GSM8K + MATH problems, cap {args.new_tokens} new tokens, "
        f"old (static batches) vs new (refill)",
    )
    if args.only == "pass1":
        return

    gen_rows = [
        bench_generation(model, tok, problems, args.new_tokens, bs, kind, device)
        for kind in ("fp32", "bf16-autocast")
        for bs in (1, 8)
    ]
    print_table(gen_rows, f"greedy generation: {len(problems)} GSM8K problems x {args.new_tokens} new tokens")
    ppl_rows = [
        bench_ppl(model, tok, text, length, args.ppl_tokens, bs, "fp32", device)
        for length in (512, 1024)
        for bs in (1, 8)
    ]
    # bf16 autocast is ~5x slower on CPUs without native bf16 matmuls: a quarter of the text shows it.
    ppl_rows.append(bench_ppl(model, tok, text, 1024, args.ppl_tokens // 4, 8, "bf16-autocast", device))
    print_table(ppl_rows, f"sliding-window perplexity over the first {args.ppl_tokens} WikiText tokens")


if __name__ == "__main__":
    main()
