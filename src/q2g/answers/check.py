"""Decide whether a solution is correct: True, False, or None when the gold itself cannot be parsed.

    from q2g.answers.check import is_correct
    is_correct(model_output, "\\frac{1}{2}", "math")                   # True / False / None

Every stage grades with this module: generation keeps teacher traces that `is_correct`,
evaluation scores the student with it. GSM8K: exact rationals (answers.normalize). MATH: the
Hendrycks string normalisation, then an exact numeric comparison, and only then math-verify's
symbolic check in the sandbox worker (answers.sandbox) with a hard time budget per check
(`CHECK_TIMEOUT_S`, or `timeout=`), judged wrong when it overruns. Answers longer than 2000
characters, nested deeper than 8 brackets, or holding exponent towers (`9^{9^{9}}`) are judged
wrong unless they match as strings. Model output is never evaluated: math-verify's LaTeX parser
reads it, and its expression parser sees only digits and `+-*/^()`.
tests/assets/math_labelled.jsonl (graded cases from Math-Verify's own tests) holds the decisions
to >= 99% agreement.
"""

from __future__ import annotations

import time

from q2g.answers.extract import extract_answer
from q2g.answers.normalize import math_number, normalize_math, normalize_number, numbers_equal
from q2g.answers.sandbox import CHECK_TIMEOUT_S, MAX_SYMBOLIC_CHARS, symbolic_equal, too_deep_or_huge
from q2g.data.sources import SOURCES

MAX_NORMALIZED_CHARS = 20_000  # longer answers are compared as they are, not normalised


def _math_equal(pred: str, gold: str, timeout: float) -> bool:
    """Strings first, then numbers, then (rarely) math-verify under a hard time budget."""
    p, g = normalize_math(pred), normalize_math(gold)
    if p == g:
        return True
    p_num, g_num = math_number(p), math_number(g)
    if p_num is not None and g_num is not None:
        return numbers_equal(p_num, g_num)
    if not p or _too_hard(pred) or _too_hard(gold):
        return False
    return symbolic_equal(pred, gold, timeout)


def _too_hard(s: str) -> bool:
    """A cheap screen for inputs that would make sympy build astronomically large numbers."""
    return len(s) > MAX_SYMBOLIC_CHARS or too_deep_or_huge(s)


# ---------------------------------------------------------------- grading


def answers_match(pred: str | None, gold, source: str, *, timeout: float | None = None) -> bool | None:
    """Compare an extracted answer with the gold one; None when the gold itself cannot be parsed."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    if source == "gsm8k":
        gold_value = normalize_number(gold)
        if gold_value is None:
            return None
        pred_value = normalize_number(pred)
        return pred_value is not None and numbers_equal(pred_value, gold_value)
    if not isinstance(gold, str) or not gold.strip():
        return None
    if max(len(gold), len(pred) if isinstance(pred, str) else 0) > MAX_NORMALIZED_CHARS:
        return isinstance(pred, str) and pred.strip() == gold.strip()
    if not normalize_math(gold):
        return None
    budget = CHECK_TIMEOUT_S if timeout is None else timeout
    return isinstance(pred, str) and _math_equal(pred, gold, budget)


def is_correct(text: str, gold, source: str, *, timeout: float | None = None) -> bool | None:
    """Whether the answer `text` states equals `gold`: True, False, or None for an unparseable gold.

    `timeout` (seconds, default CHECK_TIMEOUT_S) bounds the symbolic MATH check; past it: False.
    """
    budget = CHECK_TIMEOUT_S if timeout is None else timeout
    start = time.monotonic()
    answer = extract_answer(text, source, timeout=budget)
    left = round(budget - (time.monotonic() - start), 1)  # one budget for extraction and check
    return answers_match(answer, gold, source, timeout=left)
