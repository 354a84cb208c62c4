"""How fast and how faithful `q2g.answers.check.is_correct` is on the real reference solutions.

    PYTHONPATH=src python benchmarks/answer_check_speed.py [--data ../shared/data]

Prints one row per set: the checks made, the share whose verdict is the expected one (True
against the problem's own gold, False against another problem's), and the time per check. The
"other gold" rows are the ones that reach math-verify's symbolic check, the labelled corpus row
(tests/assets/math_labelled.jsonl) also its extraction; the worker process that runs both is
started (and timed) before any row, so no row pays for importing sympy.
"""

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "assets" / "math_labelled.jsonl"


def load(data: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (data / name).read_text().splitlines() if line.strip()]


def cases(data: Path):
    """(set name, [(text, gold, source, expected verdict)]) for each row of the table."""
    from q2g.answers.extract import last_boxed

    for split in ("test", "train"):
        rows = load(data, f"gsm8k/{split}.jsonl")
        golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
        yield f"gsm8k {split}", [(r["answer"], g, "gsm8k", True) for r, g in zip(rows, golds)]
    others = random.Random(0).sample(golds, len(golds))  # gsm8k train
    yield "gsm8k train, other gold", [(r["answer"], o, "gsm8k", g == o) for r, g, o in zip(rows, golds, others)]
    math = load(data, "math/test.jsonl")
    yield "math test", [(r["solution"], last_boxed(r["solution"]), "math", True) for r in math]
    m500 = load(data, "math500/test.jsonl")
    yield "math500", [(r["solution"], r["answer"], "math", True) for r in m500]
    others = random.Random(0).sample([r["answer"] for r in m500], len(m500))
    yield "math500, other gold", [(r["solution"], o, "math", r["answer"] == o) for r, o in zip(m500, others)]
    labelled = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    yield "math labelled corpus", [(r["text"], r["gold"], "math", r["expected"]) for r in labelled]


def measure(checks) -> dict:
    from q2g.answers.check import is_correct

    times, agree = [], 0
    for text, gold, source, expected in checks:
        start = time.perf_counter()
        verdict = is_correct(text, gold, source)
        times.append((time.perf_counter() - start) * 1000)
        agree += verdict is expected
    times.sort()
    return {
        "n": len(checks),
        "agree": 100 * agree / len(checks),
        "median": statistics.median(times),
        "p99": times[int(0.99 * (len(times) - 1))],
        "worst": times[-1],
    }


def main() -> None:
    default = os.environ.get("Q2G_SHARED_DATA", REPO.parent / "shared" / "data")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(default), help="the shared data folder")
    args = parser.parse_args()

    from q2g.answers.sandbox import CHECK_TIMEOUT_S, start_worker

    start = time.perf_counter()
    start_worker()
    print(f"worker start-up: {time.perf_counter() - start:.2f} s; budget per check {CHECK_TIMEOUT_S} s\n")
    print(f"{'set':<26}{'n':>6}{'agree %':>9}{'median ms':>11}{'p99 ms':>9}{'worst ms':>10}")
    for name, checks in cases(args.data):
        r = measure(checks)
        print(f"{name:<26}{r['n']:>6}{r['agree']:>9.2f}{r['median']:>11.3f}{r['p99']:>9.2f}{r['worst']:>10.1f}")


if __name__ == "__main__":
    main()
