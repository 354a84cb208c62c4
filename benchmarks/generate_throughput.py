"""Tokens per second of the `hf` teacher backend: its default batching vs one problem at a time.

    python benchmarks/generate_throughput.py                      # real Gemma 3 270M, CPU or GPU
    python benchmarks/generate_throughput.py --problems 32 --max-new-tokens 128 --device cuda
    python benchmarks/generate_throughput.py --threads 1      # CPU shared with other jobs

Both modes run the same backend (q2g.backends.hf: teacher prompts, length-grouped left-padded
batches, KV cache) on the same problems (the first N GSM8K train problems of the shipped subset)
with the stage's sampling settings. So that both do the same work, every sequence generates
exactly --max-new-tokens tokens: the end tokens are suppressed until then (min_new_tokens), and
the script checks the count. One warm-up call runs first and is not timed.
"""

from __future__ import annotations

import argparse
import time

from q2g.cpu_info import cpu_line


def timed(backend, problems, seed: int) -> tuple[int, float]:
    start = time.perf_counter()
    samples = backend.generate(problems, k=1, seed=seed)
    seconds = time.perf_counter() - start
    return sum(s.n_tokens for row in samples for s in row), seconds


def main(argv=None) -> int:
    import torch

    from q2g.backends import DEFAULT_BATCH_SIZE
    from q2g.backends.hf import HFBackend
    from q2g.data.loaders import load_gsm8k
    from q2g.models import DEMO_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE["hf"], help="the backend's default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads (1 avoids OpenMP stalls on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    problems = load_gsm8k("train", data_dir="packaged")[: args.problems]
    backend = HFBackend(
        args.model,
        temperature=0.3,
        top_p=0.95,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
    )
    backend.model.generation_config.min_new_tokens = args.max_new_tokens  # no early stop in either mode
    backend.generate(problems[:2], k=1, seed=0)  # warm-up
    rows = []
    for mode, batch_size in (("batched (default)", args.batch_size), ("one at a time", 1)):
        backend.batch_size = batch_size
        tokens, seconds = timed(backend, problems, seed=0)
        expected = len(problems) * args.max_new_tokens
        assert tokens == expected, f"{mode}: {tokens} tokens generated, expected {expected}"
        rows.append((mode, len(problems), tokens, seconds))
    slowest = rows[-1][2] / rows[-1][3]
    print(
        f"model {args.model} on {backend.device} ({next(backend.model.parameters()).dtype}, "
        f"{torch.get_num_threads()} CPU threads), "
        f"{args.max_new_tokens} new tokens per problem, batch size {args.batch_size}"
    )
    print(f"CPU: {cpu_line()}")  # every timing says its CPU
    print(f"{'mode':<20} {'problems':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>6}")
    for mode, n, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{mode:<20} {n:>8} {tokens:>7} {seconds:>8.2f} {rate:>8.1f} {rate / slowest:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
