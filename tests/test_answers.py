"""q2g.answers: each extraction rule, equivalences both ways, agreement with a labelled corpus of
MATH gradings (tests/assets/math_labelled.jsonl), the hard time budget, never raising.

Fast and self-contained (no ../shared); the full-data checks are in test_answers_shared.py.
    PYTHONPATH=src pytest tests/test_answers.py
"""

import json
import multiprocessing
import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q2g.answers import extract, sandbox
from q2g.answers.check import answers_match, is_correct
from q2g.answers.extract import extract_answer, extract_answer_with_rule, last_boxed
from q2g.answers.normalize import normalize_math, normalize_number

# Takes sympy minutes, yet passes the cheap screen: the budget has to stop it.
SLOW_PRED, SLOW_GOLD = "\\boxed{(a+b+c+d+1)^{30}}", "(a+b+c+d+2)^{30}"
SLACK_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Start the symbolic-check worker once, so timings below measure checks, not sympy imports."""
    assert is_correct("\\boxed{\\sqrt{4}}", "2", "math") is True


# ---------------------------------------------------------------- last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{a^{b^{c}}}", "a^{b^{c}}"),
        ("\\boxed{}", ""),
        ("\\boxed{2} and then \\boxed{3", "2"),  # cut off mid-answer: the last complete box
        ("\\boxed{3", None),
        ("no box here", None),
        ("\\boxedx", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# ---------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        ("48/2 = <<48/2=24>>24\n#### 72", "72", "gsm8k_hash"),
        ("#### $1,234.00 dollars", "1234.00", "gsm8k_hash"),
        ("So she has $\\boxed{72}$ left. Check: 70 + 2", "72", "boxed"),
        ("\\boxed{3 \\times 4 = 12}", "12", "boxed"),
        ("\\boxed{\\$72}", "72", "boxed"),
        ("\\boxed{\\frac{1}{2}}", "1/2", "boxed"),
        ("3 + 4 = 7. The answer is 72.", "72", "answer_is"),
        ("The answer is: **-5** degrees", "-5", "answer_is"),
        ("the final answer is $72", "72", "final_answer_is"),
        ("The final answer is 5. Wait, no: the answer is 6.", "6", "answer_is"),
        ("Q: how many?\nA: 72", "72", "A_colon"),
        ("steps 1, 2\n**Answer:** 1,234", "1234", "A_colon"),
        ("Answer: 50%", "50", "A_colon"),
        ("She had 3 apples and 4 pears, 7 in all.", "7", "last_number"),
        ("It costs \\$72.", "72", "last_number"),
        ("The temperature fell to \u22123", "-3", "last_number"),
        ("from 2-3 days", "3", "last_number"),  # a hyphen, not a minus
        ("about .5 of it", ".5", "last_number"),
    ],
)
def test_gsm8k_rules(text, answer, rule):
    assert extract_answer_with_rule(text, "gsm8k") == (answer, rule)
    assert extract_answer(text, "gsm8k") == answer


def test_gsm8k_rule_priority():
    assert extract_answer_with_rule("\\boxed{5}\n#### 6", "gsm8k") == ("6", "gsm8k_hash")
    assert extract_answer_with_rule("The answer is 5. \\boxed{6}", "gsm8k") == ("6", "boxed")
    assert extract_answer_with_rule("A: 4\nThe answer is 5. 9 left", "gsm8k") == ("5", "answer_is")
    # A rule whose text holds no number gives way to the next one.
    assert extract_answer_with_rule("#### none\nThe answer is 5.", "gsm8k") == ("5", "answer_is")
    assert extract_answer_with_rule("no digits here", "gsm8k") == (None, None)


@pytest.mark.parametrize(
    "text, value",
    [
        ("$1,234.00", Fraction(1234)),
        ("50%", Fraction(50)),
        ("1/2", Fraction(1, 2)),
        ("0.5", Fraction(1, 2)),
        ("-3", Fraction(-3)),
        ("\\$72.", Fraction(72)),
        ("72 dollars", Fraction(72)),
        ("\\boxed{72}", Fraction(72)),
        (72, Fraction(72)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("1/0", None),
        ("abc", None),
        ("", None),
        (None, None),
        ("9" * 100, None),
    ],
)
def test_normalize_number(text, value):
    assert normalize_number(text) == value


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("$1,234.00", "1234", True),
        ("1234", "1,234", True),
        ("50%", "50", True),
        ("1/2", "0.5", True),
        ("0.3333333", "1/3", True),
        ("72.", "72", True),
        ("72.00", "72", True),
        ("-5", "-5", True),
        ("\\$72", "72", True),
        ("\\boxed{72}", "72", True),
        ("5", "-5", False),
        ("1235", "1234", False),
        ("0.5", "5", False),
        ("1000001", "1000000", False),  # integers are exact, whatever the relative gap
        ("0.3333", "1/3", False),
        (None, "5", False),
        ("", "5", False),
    ],
)
def test_gsm8k_equivalence(pred, gold, expected):
    assert answers_match(pred, gold, "gsm8k") is expected


def test_gsm8k_is_correct_end_to_end():
    assert is_correct("She pays 3 * 4 = 12 dollars.\n#### 12", "12", "gsm8k") is True
    assert is_correct("So the total is $1,234.00.", "1234", "gsm8k") is True
    assert is_correct("The answer is 13.", "12", "gsm8k") is False
    assert is_correct("I cannot tell.", "12", "gsm8k") is False


@pytest.mark.parametrize("gold", ["abc", "", None, "1/0"])
def test_gsm8k_unparseable_gold_is_none(gold):
    assert is_correct("#### 5", gold, "gsm8k") is None


# ---------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "boxed"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", "final_answer_is"),
        ("The final answer is $\\$15.48$.", "\\$15.48", "final_answer_is"),
        ("Thus the answer is \\(x^2\\), done.", "x^2", "answer_is"),
        ("The answer is 3.5.", "3.5", "answer_is"),
        ("The answer is 5. I hope it is correct.", "5", "answer_is"),
        ("Answer: $(1, 2)$", "(1, 2)", "A_colon"),
        ("The value is 5.", "5", "mv_expr"),  # math-verify's fallback: the rule says how lenient
        ("\\boxed{} The answer is 4", "4", "answer_is"),
        # several boxes that together are the answer; an earlier box in a sentence is not one of them
        ("The roots are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3", "boxed_multi"),
        ("$$\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}$$", "(3, 3), (1, 1)", "boxed_multi"),
        ("first \\boxed{1}, then \\boxed{2}", "2", "boxed"),
        ("\\boxed{\\boxed{5}}", "5", "boxed"),
        # a final answer stated after the last box is the model's last word; prose after it is not
        (
            "$= \\boxed{255}$. Final Answer: The final answer is $10,455$. I hope it is correct.",
            "10,455",
            "final_answer_is",
        ),
        ("$\\boxed{3}$. The final answer is positive, because", "3", "boxed"),
        ("Final answer: the smallest $k$ is 12.", "12", "A_colon"),
        ("Final Answer: The largest $n$ is $34$.", "34", "A_colon"),
        ("The answer is x = 5, since the sum is 7", "x = 5, since the sum is 7", "answer_is"),
        # math-verify's own extraction when no strict rule reads the text
        ("So the value is\n\nAnswer \\[ 7 \\]", "7", "mv_latex"),
        (
            "Thus the matrix is $\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$.",
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "mv_latex",
        ),
        ("Of the five, $\\text{Evelyn}$ is the fastest.", "\\text{Evelyn}", "mv_latex"),
        ("The share is 40 percent.", "40", "mv_expr"),
        ("I cannot tell.", None, None),
    ],
)
def test_math_rules(text, answer, rule):
    assert extract_answer_with_rule(text, "math") == (answer, rule)


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\tfrac34", "\\frac{3}{4}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("x = 5", "5"),
        ("10^\\circ", "10"),
        ("10^{\\circ}", "10"),
        ("\\$5", "5"),
        ("5\\%", "5"),
        ("5\\text{ cm}^2", "5"),
        ("\\text{(A)}", "(A)"),
        ("\\text{ east}", "east"),
        ("\\sqrt2", "\\sqrt{2}"),
        (".5", "0.5"),
        ("7.", "7"),
        ("1,\\!000", "1000"),
        ("3/4", "\\frac{3}{4}"),
        ("y = 2x + 3", "2x+3"),
        ("a=1, b=2", "a=1,b=2"),
        ("y \\leq 3", "y\\le3"),
        ("y <= 3", "y\\le3"),
        ("x \\geqslant 1", "x\\ge1"),
        ("x != 2", "x\\ne2"),
        ("40 percent", "40"),
        ("40 pct", "40"),
        ("7 = 11a+c", "7=11a+c"),
        ("32, 349", "32,349"),
        ("a \\ltimes b", "a\\ltimesb"),
        ("x \\lt 3", "x<3"),
    ],
)
def test_normalize_math(raw, normal):
    assert normalize_math(raw) == normal


MATH_EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),  # decided: numbers compare by value (math-verify agrees)
    ("\\dfrac{3}{4}", "\\frac34"),
    ("(1,2)", "(1, 2)"),
    ("x=5", "5"),
    ("10^\\circ", "10"),
    ("[1, 2)", "[1,2)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("-\\frac{1}{2}", "-0.5"),
    ("5.00", "5"),
    ("\\text{east}", "\\text{ east}"),
    ("1,000", "1000"),
    # these need the symbolic check
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("y \\leq 3", "y <= 3"),
    ("x \\neq 2", "x != 2"),
    ("40 percent", "40\\%"),
    ("2, 3", "3, 2"),
]
MATH_DIFFERENT = [
    ("3", "4"),
    ("(1,2]", "[1,2)"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("x^2", "x^3"),
    ("\\sqrt{2}", "2"),
    ("(1,2)", "(2,1)"),
    ("10", "100"),
    ("0.5", "5"),
    ("", "5"),
    ("2\\pi", "\\pi"),
    ("x+1", "x-1"),
    ("32, 349", "32349"),
    ("11a+c", "7 = 11a+c"),
    ("y < 3", "y \\leq 3"),
    ("2, 3", "2, 4"),
]


@pytest.mark.parametrize("pred, gold", MATH_EQUIVALENT)
def test_math_equivalent(pred, gold):
    assert answers_match(pred, gold, "math") is True
    assert is_correct(f"so $\\boxed{{{pred}}}$.", gold, "math") is True


@pytest.mark.parametrize("pred, gold", MATH_DIFFERENT)
def test_math_different(pred, gold):
    assert answers_match(pred, gold, "math") is False
    assert is_correct(f"so $\\boxed{{{pred}}}$.", gold, "math") is False


@pytest.mark.parametrize("gold", ["", "   ", None])
def test_math_unparseable_gold_is_none(gold):
    assert is_correct("\\boxed{5}", gold, "math") is None


def test_no_answer_is_false_and_bad_source_raises():
    assert is_correct("I do not know.", "5", "math") is False
    assert is_correct("", "5", "math") is False
    assert is_correct(None, "5", "gsm8k") is False
    with pytest.raises(ValueError):
        is_correct("#### 5", "5", "aime")


def test_model_output_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for text in (f"\\boxed{{{payload}}}", f"The answer is {payload}", f"so ${payload}$", f"so {payload}"):
        assert is_correct(text, "1", "math") is False
    assert not marker.exists()


# ---------------------------------------------------------------- labelled corpus

CORPUS = Path(__file__).resolve().parent / "assets" / "math_labelled.jsonl"
CORPUS_TIMEOUT_S = 10.0  # what is measured is the rules; on a busy machine a sympy sum takes > 2 s


def test_fallback_reads_the_tail_with_dollars_paired(monkeypatch):
    monkeypatch.setattr(extract, "MV_TAIL_CHARS", 40)
    text = "so $" + "x + " * 30 + "1 = 2$ and the answer is clearly\n$5$"
    assert extract._tail(text) == " and the answer is clearly\n$5$"  # cut inside `$..$`: after it
    assert extract._tail("$$a$$ " + "b" * 60) == "b" * 40


def test_labelled_math_corpus_agreement():
    # Graded cases from Math-Verify's test suite and issue #10 (see tests/assets/make_math_labelled.py).
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    assert len(rows) >= 150 and {r["expected"] for r in rows} == {True, False}
    verdicts = [is_correct(r["text"], r["gold"], "math", timeout=CORPUS_TIMEOUT_S) for r in rows]
    wrong = [
        (r["origin"], r["gold"], extract_answer_with_rule(r["text"], "math"), r["expected"])
        for r, verdict in zip(rows, verdicts)
        if verdict is not r["expected"]
    ]
    assert len(wrong) <= 0.01 * len(rows), wrong


# ---------------------------------------------------------------- time budget


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def test_timeout_returns_false_within_budget():
    result, took = _timed(is_correct, SLOW_PRED, SLOW_GOLD, "math", timeout=1.0)
    assert result is False and took < 1.0 + SLACK_S
    # The runaway worker was killed; its replacement answers the next check.
    assert is_correct("\\boxed{\\sqrt{9}}", "3", "math") is True


def test_extraction_and_check_share_one_budget():
    # math-verify reads the answer (rule mv_latex), then the check overruns: one budget for both.
    text = "so we get\n$$(a+b+c+d+1)^{30}$$"
    assert extract_answer_with_rule(text, "math")[1] == "mv_latex"
    result, took = _timed(is_correct, text, SLOW_GOLD, "math", timeout=1.0)
    assert result is False and took < 1.0 + SLACK_S
    assert sandbox.start_worker() is True  # the replacement worker is up again


def test_timeout_from_a_thread():
    out = {}

    def run():
        out["slow"] = _timed(is_correct, SLOW_PRED.replace("30", "31"), SLOW_GOLD, "math", timeout=0.5)
        out["fast"] = is_correct("\\boxed{\\sqrt{16}}", "4", "math")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    result, took = out["slow"]
    assert result is False and took < 0.5 + SLACK_S
    assert out["fast"] is True


def test_thread_fallback_when_no_process_can_start():
    # What a check does where the worker cannot start; a 2 s problem stands in for a runaway one.
    result, took = _timed(sandbox._check_in_thread, "(x+y+1)^{40}", "(x+y+2)^{40}", 0.3)
    assert result is False and took < 0.3 + SLACK_S
    assert sandbox._check_in_thread("\\sqrt{25}", "5", 30.0) is True


def _check_in_child(_):
    return is_correct("\\boxed{\\sqrt{36}}", "6", "math"), os.getpid()


def test_works_in_a_daemonic_pool_worker():
    # Pool workers are daemonic (multiprocessing would refuse them children) and forked with a
    # copy of this process's worker handle: both must be dealt with.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result, pid = pool.map(_check_in_child, [0])[0]
    assert result is True and pid != os.getpid()


# ---------------------------------------------------------------- never raises, never hangs

BUDGET_S = 1.0
# Per call: the budget, plus restarting the worker if the call before overran.
HYPOTHESIS_LIMIT_S = BUDGET_S + 4.0
LATEX_PIECES = [
    "\\boxed{",
    "\\fbox{",
    "{",
    "}",
    "\\frac",
    "\\sqrt",
    "^",
    "_",
    "1",
    "23",
    "9",
    "0.5",
    "x",
    " ",
    "=",
    "$",
    "\\$",
    "####",
    "The answer is ",
    "A: ",
    "\n",
    "-",
    ".",
    ",",
    "/",
    "%",
    "\\text{ cm}",
    "(",
    ")",
    "[",
    "\\left",
    "\\right",
    "\\infty",
    "\\pi",
    "!",
]
latexish = st.lists(st.sampled_from(LATEX_PIECES), max_size=40).map("".join)


def _assert_safe(text, gold, source):
    result, took = _timed(is_correct, text, gold, source, timeout=BUDGET_S)
    assert result in (True, False, None)
    assert took < HYPOTHESIS_LIMIT_S, (text[:200], gold[:200], took)
    assert extract_answer(text, source) is None or isinstance(extract_answer(text, source), str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300), gold=st.text(max_size=30), source=st.sampled_from(["gsm8k", "math"]))
def test_never_raises_on_text(text, gold, source):
    _assert_safe(text, gold, source)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=latexish, gold=latexish, source=st.sampled_from(["gsm8k", "math"]))
def test_never_raises_on_latexish(text, gold, source):
    _assert_safe(text, gold, source)


PATHOLOGICAL = [
    ("\\boxed{9^{9^{9^{9}}}}", "5"),
    ("\\boxed{5}", "9^{9^{9^{9}}}"),
    ("\\boxed{10^{10^{10}}}", "x"),
    ("\\boxed{10^{10000000}}", "x"),
    ("\\boxed{100000000!}", "x"),
    ("\\boxed{" + "{" * 5000 + "x" + "}" * 5000 + "}", "x"),
    ("\\boxed{" + "{" * 40 + "x" + "}" * 40 + "}", "y"),
    ("\\boxed{" * 30000, "5"),
    ("{" * 100_000, "5"),
    ("1" * 100_000, "5"),
    ("#### " + "9" * 100_000, "9"),
    ("The answer is " * 8000, "5"),
    ("\n" * 100_000 + "A: 5", "5"),
    ("\\frac{" * 20000, "5"),
    ("\\boxed{" + "x^2+" * 25_000 + "1}", "1"),
    ("\\boxed{" + "1," * 50_000 + "1}", "1"),
    ("9^{" * 30000, "1"),
    ("-" * 100_000 + "1", "1"),
    ("\\boxed{5}", "{" * 100_000),
]


@pytest.mark.parametrize("source", ["gsm8k", "math"])
@pytest.mark.parametrize("text, gold", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_inputs_return_within_budget(text, gold, source):
    result, took = _timed(is_correct, text, gold, source, timeout=BUDGET_S)
    assert result in (True, False, None)
    assert took < BUDGET_S + SLACK_S, took
