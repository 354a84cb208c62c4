"""The CPU output head of decoding: MKL (torch's fp32 `linear`) against oneDNN (q2g.decoding.cpu_head),
side by side in one run, then greedy decoding of the real Gemma 3 270M with each.

    PYTHONPATH=src python benchmarks/cpu_head.py             # run it ALONE (~3 min on 2 cores)
    PYTHONPATH=src python benchmarks/cpu_head.py --tiny      # a tiny random Gemma 3: a smoke run

1. The bare product rows x 262,144 x 640 (Gemma 3's tied head, fp32) at decode batch sizes and at a
   training-sized row count: MKL, oneDNN with the weight converted once, and numpy's BLAS.
2. pass@1-style greedy decoding (q2g.decoding.generate, the refill loop) of --problems GSM8K test
   prompts, --new-tokens each, batch --batch: the plain head against the oneDNN head; the tokens
   must be the same. Prints the CPU model; the table goes to benchmarks/results/cpu_head_<cpu>.txt.
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


def bare(vocab: int, hidden: int, rows_list, reps: int) -> list[str]:
    import numpy as np
    import torch

    from q2g.decoding.cpu_head import OneDNNHead

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    packed = OneDNNHead(head)
    wt = np.ascontiguousarray(head.weight.detach().numpy().T)
    lines = ["| rows | MKL s | oneDNN s | numpy BLAS s | oneDNN vs MKL |", "|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.randn(rows, 1, hidden)
            xn = x.reshape(rows, hidden).numpy()
            mkl, dnn = best(lambda x=x: head(x), reps), best(lambda x=x: packed(x), reps)
            blas = best(lambda xn=xn: xn @ wt, reps)
            lines.append(f"| {rows} | {mkl:.4f} | {dnn:.4f} | {blas:.4f} | {mkl / dnn:.2f}x |")
    return lines


def decode(model_dir: str, problems: int, new_tokens: int, batch: int) -> list[str]:

    from q2g import decoding, models, prompts
    from q2g.data.splits import select_split
    from q2g.decoding import cpu_head

    model = models.load_model(model_dir).eval()
    tok = models.load_tokenizer(model_dir, padding_side="left")
    _, held, _ = select_split(
        data_dir="packaged", datasets=["gsm8k"], holdout="official-test", fraction=0.25, limit=4 * problems
    )
    ids = [prompts.student_prompt_ids(tok, r["problem"]) for r in held[:problems]]
    kw = dict(max_new_tokens=new_tokens, end_ids=prompts.end_token_ids(tok), batch_size=batch)
    lines = ["| head | decode s | generated tok/s | same tokens as plain |", "|---|---:|---:|---|"]
    plain = None
    for name, faster in (("plain (MKL)", float("inf")), ("oneDNN (q2g default where faster)", 0.0)):
        cpu_head._PACKED.clear()
        cpu_head.FASTER = faster
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

        model_dir = str(build_tiny("gemma3", Path(tempfile.mkdtemp()) / "g"))
        out += bare(4096, 64, (1, 8), 2)
    else:
        from q2g.demo_model import demo_gemma_dir

        model_dir = str(demo_gemma_dir())
        out += bare(262144, 640, (1, 8, 24, 64, 720), args.reps)
    out += [
        "",
        f"greedy decoding: {args.problems} GSM8K test prompts x {args.new_tokens} new tokens, batch {args.batch}",
    ]
    out += decode(model_dir, args.problems, args.new_tokens, args.batch)
    text = "\n".join(out)
    print(text)
    if not args.tiny:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu_info.cpu_model().lower()).strip("-") or "cpu"
        path = ROOT / "benchmarks" / "results" / f"cpu_head_{slug}.txt"
        path.write_text(text + "\n")
        print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
