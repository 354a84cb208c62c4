"""CPU decoding's linear layers: MKL (torch's fp32 `linear`) against oneDNN with packed weights
(q2g.cpu_linears), side by side in one run, then greedy decoding of the real Gemma 3 270M
with each.

    PYTHONPATH=src python benchmarks/cpu_linears.py             # run it ALONE (~4 min on 2 cores)
    PYTHONPATH=src python benchmarks/cpu_linears.py --tiny      # a tiny random Gemma 3: a smoke run

1. The model's own layers at decode batch sizes and at a training-sized row count: the output head
   (Gemma 3's tied 262,144 x 640) and the body's projections (126 for Gemma 3 270M), each through
   MKL, oneDNN with the weight packed once, and (the head) numpy's BLAS.
2. pass@1-style greedy decoding (q2g.decoding.generate, the refill loop) of --problems GSM8K test
   prompts, --new-tokens each, batch --batch: plain layers against packed ones; the tokens must be
   the same. Prints the CPU model; the table goes to benchmarks/results/cpu_linears_<cpu>.txt.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best(fn, reps: int) -> float:
    fn()
    out = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def layers_table(model, rows_list, reps: int) -> list[str]:
    import numpy as np
    import torch

    from q2g.cpu_linears import PackedLinear, linears

    layers = linears(model)
    head, body = layers[-1], layers[:-1]
    assert head is model.get_output_embeddings()
    wt = np.ascontiguousarray(head.weight.detach().numpy().T)
    lines = [
        f"| rows | head MKL s | head oneDNN s | head numpy BLAS s | head oneDNN vs MKL "
        f"| {len(body)} body layers MKL s | oneDNN s | body oneDNN vs MKL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.randn(rows, 1, head.in_features)
            packed = PackedLinear(head, rows)
            xn = x.reshape(rows, -1).numpy()
            mkl, dnn = best(lambda x=x: head(x), reps), best(lambda x=x, p=packed: p(x), reps)
            blas = best(lambda xn=xn: xn @ wt, reps)
            del packed
            xs = [torch.randn(rows, 1, m.in_features) for m in body]
            bpacked = [PackedLinear(m, rows) for m in body]
            bmkl = best(lambda xs=xs: [m(x) for m, x in zip(body, xs)], reps)
            bdnn = best(lambda xs=xs, bp=bpacked: [p(x) for p, x in zip(bp, xs)], reps)
            del bpacked
            lines.append(
                f"| {rows} | {mkl:.4f} | {dnn:.4f} | {blas:.4f} | {mkl / dnn:.2f}x "
                f"| {bmkl:.4f} | {bdnn:.4f} | {bmkl / bdnn:.2f}x |"
            )
    return lines


def decode(model, model_dir: str, problems: int, new_tokens: int, batch: int) -> list[str]:

    from q2g import cpu_linears, decoding, models, prompts
    from q2g.data.splits import select_split

    tok = models.load_tokenizer(model_dir, padding_side="left")
    _, held, _ = select_split(
        data_dir="packaged", datasets=["gsm8k"], holdout="official-test", fraction=0.25, limit=4 * problems
    )
    ids = [prompts.student_prompt_ids(tok, r["problem"]) for r in held[:problems]]
    kw = dict(max_new_tokens=new_tokens, end_ids=prompts.end_token_ids(tok), batch_size=batch)
    lines = ["| linear layers | decode s | generated tok/s | same tokens as plain |", "|---|---:|---:|---|"]
    plain = None
    for name, faster in (("plain (MKL)", float("inf")), ("oneDNN (q2g default where faster)", 0.0)):
        cpu_linears._PACKS.clear()
        cpu_linears._CHOICE.clear()
        cpu_linears.FASTER = faster  # a benchmark's own process: nothing else reads it
        decoding.generate(model, tok, ids[:batch], **{**kw, "max_new_tokens": 2})  # warm-up, pack, timing
        start = time.perf_counter()
        gens = decoding.generate(model, tok, ids, **kw)
        secs = time.perf_counter() - start
        tokens = [g.token_ids for g in gens]
        plain = tokens if plain is None else plain
        n = sum(len(t) for t in tokens)
        lines.append(f"| {name} | {secs:.1f} | {n / secs:.1f} | {tokens == plain} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 (smoke run)")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from q2g import cpu_info

    out = [f"CPU: {cpu_info.cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from helpers import build_tiny

        from q2g import cpu_linears

        model_dir = str(build_tiny("gemma3", Path(tempfile.mkdtemp()) / "g"))
        cpu_linears.MIN_DIM = 8  # the tiny model is 32 wide
        rows_list, reps = (1, 8), 2
    else:
        from q2g.demo_model import demo_gemma_dir

        model_dir = str(demo_gemma_dir())
        rows_list, reps = (1, 8, 24, 64, 720), args.reps
    from q2g import models

    model = models.load_model(model_dir).eval()  # loaded once, for both parts
    out += layers_table(model, rows_list, reps)
    out += [
        "",
        f"greedy decoding: {args.problems} GSM8K test prompts x {args.new_tokens} new tokens, batch {args.batch}",
    ]
    out += decode(model, model_dir, args.problems, args.new_tokens, args.batch)
    text = "\n".join(out)
    print(text)
    if not args.tiny:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu_info.cpu_model().lower()).strip("-") or "cpu"
        path = ROOT / "benchmarks" / "results" / f"cpu_linears_{slug}.txt"
        path.write_text(text + "\n")
        print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
