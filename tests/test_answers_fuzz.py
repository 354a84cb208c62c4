"""Fuzzing q2g.answers.check.is_correct with seeded, generated GSM8K- and MATH-style outputs (issue #12).

Each generated (model output, gold) pair mixes realistic solution endings with pathological
LaTeX: brackets nested thousands deep, 10^6-digit numbers, long `\\frac` chains, exponent
towers, unclosed boxes. Every check must return True, False or None and stay within the
per-check budget. The test runs 10,000 GSM8K-style and 300 MATH-style cases (25-45 s on one
core); benchmarks/answer_fuzz.py runs the issue's full 10,000 + 2,000 and prints the worst time.
    PYTHONPATH=src pytest tests/test_answers_fuzz.py
"""

import random
import time

import pytest

from q2g.answers import sandbox
from q2g.answers.check import is_correct
from q2g.answers.extract import extract_answer_with_rule

SEED = 12
BUDGET_S = 1.0  # per check, as in test_answers.py
SLACK_S = 1.0  # process scheduling on a busy machine; a worker restart is not counted (below)
N_GSM8K, N_MATH = 10_000, 300
BIG = 10**6  # digits in the longest numbers, brackets in the deepest nesting

# ---------------------------------------------------------------- generators


def _number(rng: random.Random) -> str:
    kind = rng.randrange(8)
    n = rng.randint(-50, 10 ** rng.randint(1, 7))
    if kind == 0:
        return f"{n:,}"
    if kind == 1:
        return f"{n}.{rng.randint(0, 99):02d}"
    if kind == 2:
        return f"{n}/{rng.randint(1, 12)}"
    if kind == 3:
        return f"{n}%"
    if kind == 4:
        return f"\u2212{abs(n)}"
    if kind == 5 and rng.random() < 0.05:
        return rng.choice("123456789") * rng.choice([100, 10_000, BIG])
    return str(n)


def _latex(rng: random.Random, depth: int = 0) -> str:
    """A random LaTeX answer; rarely a pathological one."""
    if rng.random() < 0.04:
        return _pathological_latex(rng)
    if depth > 3 or rng.random() < 0.3:
        return rng.choice([_number(rng), "x", "\\pi", "\\infty", "e", "k", "\\text{east}", "1"])
    a, b = _latex(rng, depth + 1), _latex(rng, depth + 1)
    return rng.choice(
        [
            f"\\frac{{{a}}}{{{b}}}",
            f"\\dfrac{a[:1]}{b[:1]}",
            f"\\sqrt{{{a}}}",
            f"{a}^{{{b}}}",
            f"{a}+{b}",
            f"{a}-{b}",
            f"({a}, {b})",
            f"[{a}, {b})",
            f"\\{{{a}, {b}\\}}",
            f"x = {a}",
            f"{a} \\leq x",
            f"\\begin{{pmatrix}} {a} & {b} \\\\ {b} & {a} \\end{{pmatrix}}",
            f"{a}\\%",
            f"{a}^\\circ",
            f"\\left( {a} \\right)",
            f"{a} \\cdot {b}",
            f"\\sin {a}",
            f"{a}!",
            f"{a}\\text{{ cm}}^2",
        ]
    )


def _pathological_latex(rng: random.Random) -> str:
    n = rng.choice([50, 500, 5000, BIG // 10])
    m = min(n, 5000)
    make = rng.choice(
        [  # built lazily: some are megabytes
            lambda: "{" * n + "x" + "}" * n,
            lambda: "\\frac{1}{" * n + "2" + "}" * n,
            lambda: "\\frac{" * n,
            lambda: "9^{" * m + "9" + "}" * m,
            lambda: "10^{" + "9" * rng.choice([6, 50, BIG]) + "}",
            lambda: "9" * rng.choice([1000, BIG]),
            lambda: "(" * n + "1" + ")" * rng.randrange(n + 1),
            lambda: "\\sqrt{" * m + "2" + "}" * m,
            lambda: "x^2+" * n + "1",
            lambda: "\\boxed{" * n,
            lambda: "1," * n + "1",
            lambda: "(a+b+c+d+1)^{" + str(rng.randint(20, 40)) + "}",
            lambda: "".join(rng.choices("{}()[]^_\\$&", k=m)),
        ]
    )
    return make()


GSM8K_WRAPPERS = [
    "#### {a}",
    "The answer is {a}.",
    "So the total is $\\boxed{{{a}}}$.",
    "Answer: {a}",
    "She has {a} left.",
    "The final answer is {a}",
    "**Answer:** {a} dollars",
    "{a}",
    "#### {a}\n#### ",
    "\\boxed{{{a}",
    "\n" * 1000 + "A: {a}",
]
MATH_WRAPPERS = [
    "so $\\boxed{{{a}}}$.",
    "The answer is ${a}$.",
    "Answer \\[ {a} \\]",
    "${a}$",
    "Final Answer: The final answer is ${a}$. I hope it is correct.",
    "\\boxed{{{a}}} and \\boxed{{{b}}}",
    "Final answer: the value is {a}.",
    "\\fbox{{{a}}}",
    "\\boxed{{{a}",
    "Thus $x = {a}$",
    "{a}",
    "The answer is " * 50 + "{a}",
    "$$ {a} $$ hence $\\boxed{{{b}}}$",
]


def _prose(rng: random.Random) -> str:
    words = ["We", "compute", "so", "then", "$x$", "=", "3", "+", "4", "<<3+4=7>>7", "\\frac{1}{2}", ",", "."]
    return " ".join(rng.choice(words) for _ in range(rng.randrange(60)))


def gsm8k_cases(rng: random.Random, n: int):
    """(model output, gold) pairs in GSM8K style."""
    for _ in range(n):
        a = _number(rng)
        text = _prose(rng) + "\n" + rng.choice(GSM8K_WRAPPERS).format(a=a)
        gold = rng.choices(
            [a, _number(rng), a.replace(",", ""), "", "abc", "1/0", "9" * 1000], weights=[6, 6, 3, 1, 1, 1, 1]
        )[0]
        yield text, gold


def math_cases(rng: random.Random, n: int):
    """(model output, gold) pairs in MATH style."""
    for _ in range(n):
        a, b = _latex(rng), _latex(rng)
        text = _prose(rng) + "\n" + rng.choice(MATH_WRAPPERS).format(a=a, b=b)
        gold = rng.choices([a, b, _latex(rng), a.replace(" ", ""), ""], weights=[4, 2, 4, 2, 1])[0]
        yield text, gold


# ---------------------------------------------------------------- checks


def timed_check(text: str, gold: str, source: str, budget: float) -> tuple[object, float]:
    """is_correct's verdict and seconds taken, the worker (re)started beforehand and not timed."""
    sandbox.start_worker()
    start = time.perf_counter()
    verdict = is_correct(text, gold, source, timeout=budget)
    return verdict, time.perf_counter() - start


def run(cases, source: str, budget: float) -> dict:
    """Checks every case; returns counts by verdict, the worst time and its case."""
    counts, worst, worst_case = {True: 0, False: 0, None: 0}, 0.0, None
    for text, gold in cases:
        verdict, took = timed_check(text, gold, source, budget)
        assert verdict in (True, False, None), (text[:200], gold[:200], verdict)
        counts[verdict] += 1
        if took > worst:
            worst, worst_case = took, (text[-120:], gold[:60])
    return {"counts": counts, "worst_s": worst, "worst_case": worst_case}


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    assert sandbox.start_worker() is True


def test_generators_are_seeded_and_pathological():
    first = list(math_cases(random.Random(SEED), 50))
    assert first == list(math_cases(random.Random(SEED), 50))
    texts = [t for t, _ in math_cases(random.Random(SEED), N_MATH)]
    assert max(map(len, texts)) >= BIG // 10  # the huge inputs are in the test's share
    assert any("\\frac{1}{\\frac{1}{" in t for t in texts)


@pytest.mark.parametrize("source, n, gen", [("gsm8k", N_GSM8K, gsm8k_cases), ("math", N_MATH, math_cases)])
def test_fuzz_never_raises_and_stays_within_budget(source, n, gen):
    result = run(gen(random.Random(SEED), n), source, BUDGET_S)
    assert sum(result["counts"].values()) == n
    assert result["counts"][True] > 0 and result["counts"][False] > 0  # not all one verdict
    assert result["worst_s"] < BUDGET_S + SLACK_S, result


def test_fuzz_extraction_returns_strings_and_known_rules():
    rules = {None, "boxed_multi", "boxed", "final_answer_is", "answer_is", "A_colon", "mv_latex", "mv_expr"}
    for text, _ in math_cases(random.Random(SEED + 1), 100):
        answer, rule = extract_answer_with_rule(text, "math", timeout=BUDGET_S)
        assert rule in rules and (answer is None) == (rule is None)
        assert answer is None or isinstance(answer, str)
