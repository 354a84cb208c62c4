"""q2g.answers against the full real data in ../shared/data (or $Q2G_SHARED_DATA); skipped without it.

Reference solutions must be judged correct against their own gold answers, also when the answer
is restated the way models write it, and wrong against another problem's gold. About 10 s.
    PYTHONPATH=src pytest -m shared tests/test_answers_shared.py
"""

import json
import random
import re

import pytest

from q2g.answers.check import is_correct
from q2g.answers.extract import extract_answer_with_rule, last_boxed
from q2g.answers.normalize import normalize_math, normalize_number

pytestmark = pytest.mark.shared


def _rows(shared_data, name: str) -> list[dict]:
    path = shared_data / name
    if not path.exists():
        pytest.skip(reason=f"{path} is not on this machine")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gsm8k_gold(solution: str) -> str:
    return solution.rsplit("####", 1)[1].strip()


def _report(failures: list[str], n: int) -> str:
    return f"{len(failures)}/{n} judged wrong:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("split", ["test", "train"])
def test_gsm8k_reference_solutions_are_correct(shared_data, split):
    rows = _rows(shared_data, f"gsm8k/{split}.jsonl")
    assert len(rows) == {"test": 1319, "train": 7473}[split]
    failures = []
    for i, row in enumerate(rows):
        gold = _gsm8k_gold(row["answer"])
        head = row["answer"].rsplit("####", 1)[0]
        # As written, and restated the ways models write it (the hash line replaced).
        for text, rule in [
            (row["answer"], "gsm8k_hash"),
            (f"{head}The answer is {gold}.", "answer_is"),
            (f"{head}So the total is $\\boxed{{{gold}}}$.", "boxed"),
        ]:
            if is_correct(text, gold, "gsm8k") is not True or extract_answer_with_rule(text, "gsm8k")[1] != rule:
                failures.append(f"{split}[{i}] {rule}: gold {gold!r} got {extract_answer_with_rule(text, 'gsm8k')}")
    assert not failures, _report(failures, 3 * len(rows))


def test_gsm8k_other_golds_are_wrong(shared_data):
    rows = _rows(shared_data, "gsm8k/test.jsonl")
    golds = [_gsm8k_gold(r["answer"]) for r in rows]
    shuffled = random.Random(0).sample(golds, len(golds))
    failures = [
        f"[{i}] {r['answer'][-40:]!r} vs {other!r}"
        for i, (r, gold, other) in enumerate(zip(rows, golds, shuffled))
        if normalize_number(gold) != normalize_number(other) and is_correct(r["answer"], other, "gsm8k")
    ]
    assert not failures, _report(failures, len(rows))


def test_math_reference_solutions_are_correct(shared_data):
    rows = _rows(shared_data, "math/test.jsonl")
    assert len(rows) == 5000
    failures = [
        f"{r['unique_id']}: gold {last_boxed(r['solution'])!r}"
        for r in rows
        if is_correct(r["solution"], last_boxed(r["solution"]), "math") is not True
    ]
    assert len(failures) <= 0.005 * len(rows), _report(failures, len(rows))


def _restated(solution: str) -> str:
    """The solution with its boxes unwrapped and the answer stated in the Minerva few-shot format."""
    gold = last_boxed(solution)
    unboxed = re.sub(r"\\(?:boxed|fbox)(?=\{)", "", solution)
    return f"{unboxed}\nFinal Answer: The final answer is ${gold}$. I hope it is correct."


def test_math_restated_answers_are_correct(shared_data):
    rows = _rows(shared_data, "math/test.jsonl")
    failures = []
    for r in rows:
        text, gold = _restated(r["solution"]), last_boxed(r["solution"])
        if is_correct(text, gold, "math") is not True:
            failures.append(f"{r['unique_id']}: gold {gold!r} got {extract_answer_with_rule(text, 'math')}")
    # Known: a gold broken across lines (`90\text{ square\nunits}`) is cut at the line end.
    assert len(failures) <= 0.005 * len(rows), _report(failures, len(rows))


def test_math500_official_answers_match_last_boxed(shared_data):
    rows = _rows(shared_data, "math500/test.jsonl")
    assert len(rows) == 500
    failures = [
        f"{r['unique_id']}: boxed {last_boxed(r['solution'])!r} vs answer {r['answer']!r}"
        for r in rows
        if is_correct(r["solution"], r["answer"], "math") is not True
    ]
    assert len(failures) <= 0.01 * len(rows), _report(failures, len(rows))


def test_math500_other_golds_are_wrong(shared_data):
    # Many of these pairs reach the symbolic check: it must not call different answers equal.
    rows = _rows(shared_data, "math500/test.jsonl")
    others = random.Random(0).sample([r["answer"] for r in rows], len(rows))
    failures = [
        f"{r['unique_id']}: {r['answer']!r} judged equal to {other!r}"
        for r, other in zip(rows, others)
        if normalize_math(other) != normalize_math(r["answer"]) and is_correct(r["solution"], other, "math")
    ]
    assert len(failures) <= 2, _report(failures, len(rows))
