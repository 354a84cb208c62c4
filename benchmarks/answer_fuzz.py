"""Fuzz `q2g.answers.check.is_correct` with the issue #12 counts: 10,000 GSM8K-style, 2,000 MATH-style.

    PYTHONPATH=src python benchmarks/answer_fuzz.py [--seed 12] [--gsm8k 10000] [--math 2000]

The generators and the check are those of tests/test_answers_fuzz.py (which runs a smaller MATH
share); the budget per check is CHECK_TIMEOUT_S. Prints the verdict counts per source, the
worst time of one check (worker restarts excluded: they are not a check's cost) and its case.
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=12, help="seed of the case generators")
    parser.add_argument("--gsm8k", type=int, default=10_000, help="GSM8K-style cases")
    parser.add_argument("--math", type=int, default=2_000, help="MATH-style cases")
    args = parser.parse_args()

    from test_answers_fuzz import gsm8k_cases, math_cases, run

    from q2g.answers.sandbox import CHECK_TIMEOUT_S, start_worker

    start_worker()
    print(f"budget per check {CHECK_TIMEOUT_S} s, seed {args.seed}")
    for source, n, gen in [("gsm8k", args.gsm8k, gsm8k_cases), ("math", args.math, math_cases)]:
        start = time.perf_counter()
        r = run(gen(random.Random(args.seed), n), source, CHECK_TIMEOUT_S)
        c = r["counts"]
        print(
            f"{source:<6} n={n:>6}  True {c[True]:>5}  False {c[False]:>5}  None {c[None]:>5}  "
            f"worst {r['worst_s']:.3f} s  total {time.perf_counter() - start:.1f} s"
        )
        print(f"       worst case: {r['worst_case']!r}")


if __name__ == "__main__":
    main()
