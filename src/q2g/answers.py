"""Extract the final answer a solution states and decide whether it is correct.

Every stage grades with this module: the data layer takes MATH gold answers with `last_boxed`,
generation keeps teacher traces that `is_correct`, evaluation scores the student with it.

    from q2g.answers import extract_answer_with_rule, is_correct
    extract_answer_with_rule("... so she pays $1,234.00.", "gsm8k")  # ('1234.00', 'last_number')
    is_correct(model_output, "\\frac{1}{2}", "math")                   # True / False / None

Extraction rules, tried in this order; the one that matched is returned with the answer, so a
report can show how lenient the extraction had to be (as lm-evaluation-harness does):
  gsm8k: gsm8k_hash (`#### 72`), boxed, final_answer_is / answer_is, A_colon, last_number
  math:  final_answer_is when stated after the last box, boxed_multi (`\\boxed{2} and
         \\boxed{3}` -> `2, 3`), boxed (last `\\boxed{}` / `\\fbox{}`), final_answer_is /
         answer_is, A_colon, then math-verify's own extraction: mv_latex (`Answer \\[ 7 \\]`, the
         last `$..$`), mv_expr (`answer: 40 percent`, else the last number).
The math-verify rules read the last MV_TAIL_CHARS characters in the worker process described
below, within the same time budget as the check that follows (one budget per `is_correct`).
tests/test_answers_fuzz.py and tests/assets/math_labelled.jsonl (graded cases from Math-Verify's
own tests) hold the rules to that budget and to >= 99% agreement.

GSM8K answers are compared as exact rationals (`normalize_number`); a 1e-6 relative tolerance
applies only when one side is not an integer. MATH answers go through the Hendrycks string
normalisation (`normalize_math`, after https://github.com/hendrycks/math/blob/main/modeling/
math_equivalence.py, plus one spelling per relation, `\\leq` = `<=`, and `40 percent` = `40\\%`),
then an exact numeric comparison, and only then math-verify's symbolic check. That last step
runs in a separate worker process with a hard time budget per check (`CHECK_TIMEOUT_S`, or
`timeout=`) and is judged wrong when it overruns: math-verify's own timeout uses signal.alarm,
which fails off the main thread, and only killing a process stops a runaway sympy computation.
Starting the worker (once, and again after a check overran) imports sympy in about 1-2 s that
no check's budget pays for; checks from several threads take turns.

Decisions: numbers are compared by value in MATH too, so `0.5` == `\\frac{1}{2}` (math-verify
agrees); answers longer than 2000 characters, nested deeper than 8 brackets, or holding exponent
towers (`9^{9^{9}}`) are judged wrong unless they match as strings. A MATH output with no stated
answer is read as math-verify reads it (its last number, rule mv_expr), as lm-eval's flexible
extractor does. Model output is never evaluated: math-verify's LaTeX parser reads it, and its
expression parser sees only digits and `+-*/^()`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0  # per symbolic check; worker start-up is not counted
START_TIMEOUT_S = 60.0  # to spawn the worker and import sympy in it
MAX_SYMBOLIC_CHARS = 2000
MAX_NORMALIZED_CHARS = 20_000  # longer answers are compared as they are, not normalised
MV_TAIL_CHARS = 3000  # math-verify's fallback extraction reads only the end of a solution
MAX_SYMBOLIC_DEPTH = 8  # MATH golds nest 3 deep at most; latex2sympy is exponential in it
REL_TOL = 1e-6
_MAX_NUMBER_CHARS = 60  # longer digit runs are not amounts (and Fraction may refuse them)
SOURCES = ("gsm8k", "math")
_SRC = str(Path(__file__).resolve().parents[1])  # puts q2g on the worker's path

# ---------------------------------------------------------------- boxes

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_BRACE_RE = re.compile(r"[{}]")
_BRACKET_RE = re.compile(r"[{}()\[\]]")
_BARE_BOX_RE = re.compile(r"[ \t]+([^\s$]+)")  # `\boxed 5`: TeX takes one token


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), else None."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    # An unclosed last box (a generation cut off mid-answer) falls back to the one before; at most
    # three tries keep a text made of unclosed boxes linear.
    for start in reversed(starts[-3:]):
        if text.startswith("{", start):
            content = _braced(text, start)
        else:
            bare = _BARE_BOX_RE.match(text, start)
            content = bare.group(1) if bare else None
        if content is not None:
            return content
    return None


# What may stand between boxes that together are one answer: `\boxed{2}, \boxed{3}`,
# `$\boxed{1}$ and $\boxed{2}$`, `\boxed{a} \quad \text{or} \quad \boxed{b}`.
_JOINER_RE = re.compile(
    r"(?:\s|[,;$]|\\[()\[\]]|\\q?quad|\\[,;: ]|\band\b|\bor\b"
    r"|\\text\{[^{}]{0,20}\b(?:and|or)\s*\})*"
)
_MAX_BOXES = 8


def boxed_together(text: str) -> str | None:
    """The last boxes joined by `, ` when only `,`/`and`/`or`/spacing separates them, else None.

    `The roots are $\boxed{2}$ and $\boxed{3}$.` -> `2, 3`; a lone last box gives None.
    """
    if not isinstance(text, str):
        return None
    spans = []
    for m in list(_BOX_RE.finditer(text))[-_MAX_BOXES:]:
        if text.startswith("{", m.end()):
            content = _braced(text, m.end())
            if content is not None:
                spans.append((m.start(), m.end() + len(content) + 2, content))
    joined = spans[-1:]
    for prev in reversed(spans[:-1]):
        if not _JOINER_RE.fullmatch(text, prev[1], joined[0][0]):
            break
        joined.insert(0, prev)
    return ", ".join(c.strip() for _, _, c in joined) if len(joined) > 1 else None


def _braced(text: str, open_at: int) -> str | None:
    """The text inside the brace group opening at `open_at`, found by counting braces."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_at):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : m.start()]
    return None


# ---------------------------------------------------------------- extraction

# "final answer is" and "answer is" share one pattern so that the last statement wins.
_ANSWER_IS_RE = re.compile(r"(final\s+)?answer\s+is\b\s*:?", re.IGNORECASE)
# `[ \t*#>]` and not `\s`: a class that spans newlines makes this quadratic on blank lines.
_A_COLON_RE = re.compile(r"^[ \t*#>]*(?:[Ff]inal [Aa]nswer|[Aa]nswer|ANSWER|A)[ \t*]*:\**", re.M)
_HASH_RE = re.compile(r"####")
_MATHY_RE = re.compile(r"[ \t]*(?:[-\d$]|\\[(\[])")  # `is $5$`, `is 5`; not `is positive, because`
# `the smallest $k$ is 12`; not `x = 5, since the sum is 7`
_PROSE_IS_RE = re.compile(r"[A-Za-z][^\n=]{0,80}?\s(?:is|are|equals)\s+(?=[-\d$(\[\\])")
_MATH_DELIMITERS = (  # opening string, closing pattern; `\$` is a dollar sign, not a delimiter
    ("$$", re.compile(r"(?<!\\)\$\$")),
    ("$", re.compile(r"(?<!\\)\$")),
    ("\\(", re.compile(r"\\\)")),
    ("\\[", re.compile(r"\\\]")),
)


def extract_answer(text: str, source: str, *, timeout: float | None = None) -> str | None:
    """The final answer `text` states (a number for gsm8k, a LaTeX string for math), or None."""
    return extract_answer_with_rule(text, source, timeout=timeout)[0]


def extract_answer_with_rule(text: str, source: str, *, timeout: float | None = None) -> tuple[str | None, str | None]:
    """(answer, name of the rule that found it); (None, None) when no rule matches.

    MATH text no strict rule reads goes to math-verify's extraction (rules `mv_latex`, `mv_expr`)
    in the worker process, within `timeout` seconds (default CHECK_TIMEOUT_S).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    if not isinstance(text, str) or not text:
        return None, None
    spans = _gsm8k_spans(text) if source == "gsm8k" else _math_spans(text)
    for rule, span in spans:
        answer = _number_in(span, last=rule == "last_number") if source == "gsm8k" else span
        if answer:
            return answer, rule
    if source == "math":
        return _fallback_extract(text, CHECK_TIMEOUT_S if timeout is None else timeout)
    return None, None


def _gsm8k_spans(text: str):
    """(rule, text holding the answer) in priority order; lazy, so later rules cost nothing."""
    hashed = _last_match(_HASH_RE, text)
    yield "gsm8k_hash", hashed and _rest_of_line(text, hashed.end())
    box = last_boxed(text)
    yield "boxed", box and box.rsplit("=", 1)[-1]  # `\boxed{3 \times 4 = 12}` means 12
    yield from _stated_spans(text, _rest_of_line)
    yield "last_number", text


def _math_spans(text: str):
    stated = _last_match(_ANSWER_IS_RE, text)
    last_box = _last_match(_BOX_RE, text)
    if (
        stated
        and stated.group(1)
        and (last_box is None or stated.start() > last_box.start())
        and _MATHY_RE.match(text, stated.end())
    ):
        # `$.. = \boxed{255}$ .. The final answer is $10,455$.`: the model's last word counts
        yield "final_answer_is", _math_after(text, stated.end())
    yield "boxed_multi", boxed_together(text)
    yield "boxed", last_boxed(text)
    yield from _stated_spans(text, _math_after)


def _stated_spans(text: str, take):
    """The `... answer is X` and `Answer: X` forms, with `take(text, end)` reading the X."""
    stated = _last_match(_ANSWER_IS_RE, text)
    rule = "final_answer_is" if stated and stated.group(1) else "answer_is"
    yield rule, stated and take(text, stated.end())
    colon = _last_match(_A_COLON_RE, text)
    yield "A_colon", colon and take(text, colon.end())


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007  (the loop variable is the result)
        pass
    return last


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)]


def _fallback_extract(text: str, timeout: float) -> tuple[str | None, str | None]:
    """math-verify's reading of the end of `text`, unless that end would be costly to parse."""
    tail = _tail(text)
    if _too_deep_or_huge(tail):
        return None, None
    found = _worker_call(("extract", tail), round(timeout, 1))
    return tuple(found) if found else (None, None)


_DOLLAR_RE = re.compile(r"(?<!\\)\$\$?")  # one token per `$` or `$$`


def _tail(text: str) -> str:
    """The last MV_TAIL_CHARS of `text`, begun outside `$..$` / `$$..$$` so dollars still pair up."""
    cut = max(len(text) - MV_TAIL_CHARS, 0)
    if cut and len(_DOLLAR_RE.findall(text, 0, cut)) % 2:
        inside = _DOLLAR_RE.search(text, cut)
        cut = inside.end() if inside else cut
    return text[cut:]


def _math_after(text: str, start: int) -> str | None:
    """The LaTeX answer after `answer is`: a `$..$` / `\\(..\\)` group, else up to the sentence end."""
    line = _rest_of_line(text, start).strip()
    prose = _PROSE_IS_RE.match(line)  # `Final Answer: the smallest $k$ is 12.` -> `12`
    line = line[prose.end() :] if prose else line
    for left, right in _MATH_DELIMITERS:
        if line.startswith(left):
            end = right.search(line, len(left))
            line = line[len(left) : end.start() if end else len(line)]
            break
    else:
        line = line.split(". ", 1)[0]  # "The answer is 5. I hope it is correct."
    line = line.strip().rstrip(".").strip()
    return line or None


# ---------------------------------------------------------------- GSM8K numbers

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
# A leading `-` is a minus sign unless it follows a word or a bracket (`5-3`, `x-3`: a hyphen).
_NUMBER_RE = re.compile(rf"(?:(?<![\w)\]}}])-)?(?<![\w.])(?:{_INT}(?:\.\d+)?|\.\d+)(?:/{_INT}(?![\d.]))?")
_TEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")


def normalize_number(s) -> Fraction | None:
    """The first number in `s` as an exact Fraction: `$1,234.00` -> 1234, `50%` -> 50, `1/2`."""
    if s is None:
        return None
    token = _number_in(str(s))
    return _to_fraction(token) if token else None


def _number_in(span: str | None, last: bool = False) -> str | None:
    """The first (or last) number written in `span`, commas dropped: `\\$1,234.` -> `1234`."""
    if not span:
        return None
    span = span.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "")
    span = _TEX_FRAC_RE.sub(r"\1/\2", span)
    found = _last_match(_NUMBER_RE, span) if last else _NUMBER_RE.search(span)
    return found.group().replace(",", "") if found else None


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "")
    if len(token) > _MAX_NUMBER_CHARS:
        return None
    try:
        num, _, den = token.partition("/")
        return Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Exact for integers; within REL_TOL when either side has a fractional part."""
    if a == b or (a.denominator == 1 and b.denominator == 1):
        return a == b
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


# ---------------------------------------------------------------- MATH strings

_REPLACEMENTS = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("\\displaystyle", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\circ", ""),
    ("\u00b0", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", " "),
    ("~", " "),
)
_RELATIONS = tuple(
    (re.compile(pattern), new)
    for pattern, new in (  # one spelling per relation
        (r"\\leq(?:slant)?(?![a-zA-Z])|<=", r"\\le"),
        (r"\\geq(?:slant)?(?![a-zA-Z])|>=", r"\\ge"),
        (r"\\neq(?![a-zA-Z])|!=", r"\\ne"),
        (r"\\lt(?![a-zA-Z])", "<"),
        (r"\\gt(?![a-zA-Z])", ">"),
    )
)
_TEXT_CMDS = r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)"
# Units are a trailing `\text{ cm}` (note the space, as in Hendrycks), maybe squared.
_UNITS_RE = re.compile(_TEXT_CMDS + r"\{\s[^{}]*\}(?:\^\{?\d\}?)?$")
_TEXT_RE = re.compile(_TEXT_CMDS + r"\{([^{}]*)\}")
_VARIABLE_RE = re.compile(r"[A-Za-z][A-Za-z0-9]?")  # Hendrycks: a left side of at most 2 characters
_PERCENT_RE = re.compile(r"(?<=\d)(?:percent(?:age)?|pct)$")  # `40 percent` is `40\%`
_SQRT_RE = re.compile(r"\\sqrt([0-9a-zA-Z])")
_FRAC_NUM_RE = re.compile(r"\\frac([0-9a-zA-Z])")
_FRAC_DEN_RE = re.compile(r"\\frac\{([^{}]*)\}([0-9a-zA-Z])")
_SLASH_RE = re.compile(r"(-?\d+)/(\d+)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_FRAC_NUMBER_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def normalize_math(s: str) -> str:
    """Hendrycks `strip_string`: `\\dfrac34` -> `\\frac{3}{4}`, `x = 5` -> `5`, `10^\\circ` -> `10`."""
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    for pattern, new in _RELATIONS:  # `\\leq`, `\\leqslant`, `<=` -> `\\le`; `\\ltimes` stays
        s = pattern.sub(new, s)
    s = s.strip()
    listed = ", " in s  # `32, 349` is two numbers, `32,349` one
    if _UNITS_RE.search(s) and _UNITS_RE.sub("", s).strip():  # `5\text{ cm}`, not `\text{ east}`
        s = _UNITS_RE.sub("", s)
    s = re.sub(r"\s+", "", _TEXT_RE.sub(r"\1", s))
    s = s[:-1] if s.endswith(".") else s
    s = _PERCENT_RE.sub("", s)
    lhs, eq, rhs = s.partition("=")
    if eq and _VARIABLE_RE.fullmatch(lhs) and "=" not in rhs:  # `x=5` -> `5`, not `7=11a+c`
        s = rhs
    s = re.sub(r"(^|[-{(,])\.(\d)", r"\g<1>0.\2", s)  # `.5` -> `0.5`
    s = _FRAC_DEN_RE.sub(r"\\frac{\1}{\2}", _FRAC_NUM_RE.sub(r"\\frac{\1}", _SQRT_RE.sub(r"\\sqrt{\1}", s)))
    if _SLASH_RE.fullmatch(s):
        s = _SLASH_RE.sub(r"\\frac{\1}{\2}", s)
    return s.replace(",", "") if not listed and _THOUSANDS_RE.fullmatch(s) else s


def _math_number(s: str) -> Fraction | None:
    """The value of a normalised answer that is a plain decimal or integer fraction, else None."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _DECIMAL_RE.fullmatch(s):
        return _to_fraction(s)
    frac = _FRAC_NUMBER_RE.fullmatch(s)
    if frac is None:
        return None
    value = _to_fraction(f"{frac.group(2)}/{frac.group(3)}")
    return -value if value is not None and frac.group(1) else value


def _math_equal(pred: str, gold: str, timeout: float) -> bool:
    """Strings first, then numbers, then (rarely) math-verify under a hard time budget."""
    p, g = normalize_math(pred), normalize_math(gold)
    if p == g:
        return True
    p_num, g_num = _math_number(p), _math_number(g)
    if p_num is not None and g_num is not None:
        return _numbers_equal(p_num, g_num)
    if not p or _too_hard(pred) or _too_hard(gold):
        return False
    return _symbolic_equal(pred, gold, timeout)


_TOWER_RE = re.compile(r"\^\s*(?:\{[^{}]*|[\w(]+)\^")  # `9^{9^9}`, `2^2^2`: exponents of exponents
_HUGE_RE = re.compile(r"\^\s*\{?\s*-?\d{6}|\d{6}\s*!")  # `10^{1000000}`, `100000!`


def _too_hard(s: str) -> bool:
    """A cheap screen for inputs that would make sympy build astronomically large numbers."""
    return len(s) > MAX_SYMBOLIC_CHARS or _too_deep_or_huge(s)


def _too_deep_or_huge(s: str) -> bool:
    if _TOWER_RE.search(s) or _HUGE_RE.search(s):
        return True
    depth = 0
    for m in _BRACKET_RE.finditer(s):
        depth += 1 if m.group() in "{([" else -1
        if depth > MAX_SYMBOLIC_DEPTH:
            return True
    return False


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
        return pred_value is not None and _numbers_equal(pred_value, gold_value)
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


# ---------------------------------------------------------------- symbolic check worker


def _symbolic_check(pred: str, gold: str) -> bool:
    """math-verify's verdict, with its signal-based timeouts off (the caller enforces one).

    Only its LaTeX parser: the plain-expression one goes through sympy's parse_expr, an eval.
    """
    try:
        from math_verify import LatexExtractionConfig, parse, verify

        config = [LatexExtractionConfig()]
        gold_parsed = parse("\\boxed{" + gold + "}", config, parsing_timeout=None)
        pred_parsed = parse("\\boxed{" + pred + "}", config, parsing_timeout=None)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # a parser or sympy failure on odd input is a wrong answer, not a crash
        return False


def _mv_extract(text: str) -> tuple[str, str] | None:
    """(answer, `mv_latex` or `mv_expr`) as math-verify's own extraction reads `text`, else None.

    Its expression extractor hands parse_expr (an eval) only what its regex admits: digits,
    spaces, `.` and `+-*/^()`, so no name in the model output can reach eval.
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

        both = parse(text, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if len(both) < 2 or not both[1].strip():  # [value, the string first tried]: nothing read
            return None
        latex = parse(text, [LatexExtractionConfig()], parsing_timeout=None)
        if len(latex) > 1 and latex[1] == both[1]:
            return _joined(latex[1]), "mv_latex"
        expr = parse(text, [ExprExtractionConfig()], parsing_timeout=None)
        return (expr[1], "mv_expr") if len(expr) > 1 else (_joined(both[1]), "mv_latex")
    except Exception:
        return None


def _joined(latex: str) -> str:
    """Several `$..$` groups read as one set come back joined by " and "."""
    parts = latex.split(" and ")
    return ", ".join(parts) if len(parts) > 1 else latex


_OPS = {"verify": _symbolic_check, "extract": _mv_extract}


def _serve(fd: int) -> None:
    """Worker process loop: answer (op, *args) requests on socket `fd` until the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we enforce one
    conn = Connection(fd)
    _symbolic_check("1", "1")  # import sympy now, not inside the first check's budget
    _mv_extract("$1$")
    conn.send("ready")
    while True:
        try:
            op, *args = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_OPS[op](*args))


class _Worker:
    """One worker process running math-verify; killed and replaced when a request overruns.

    A plain subprocess, not multiprocessing: that would re-import the caller's __main__ (fails
    for stdin scripts, re-runs unguarded ones) and is refused inside daemonic Pool workers.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = self.conn = None
        self.ready = False
        self.can_spawn = True

    def call(self, request: tuple, timeout: float):
        """The worker's answer to `request`, or None when it overran `timeout` or died."""
        with self.lock:
            if not self._wait_ready():
                return _call_in_thread(request, timeout)
            try:
                self.conn.send(request)
                if self.conn.poll(timeout):
                    return self.conn.recv()
            except (EOFError, OSError):  # the worker died, e.g. out of memory
                pass
            self._stop()
            self._start()  # warm up the replacement while the caller gets on with its work
            return None

    def check(self, pred: str, gold: str, timeout: float) -> bool:
        return bool(self.call(("verify", pred, gold), timeout))

    def _start(self) -> None:
        parent, child = socket.socketpair()
        code = f"import sys; sys.path.insert(0, {_SRC!r}); from q2g.answers import _serve; _serve({child.fileno()})"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
            )
            self.conn = Connection(parent.detach())
        except (OSError, ValueError) as err:
            logger.warning("answer-check worker not started (%s); checking in a thread", err)
            parent.close()
            self.can_spawn, self.proc = False, None
        finally:
            child.close()

    def _wait_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:  # died while idle
            self._stop()
        if self.proc is None and self.can_spawn:
            self._start()
        if self.proc is None:
            return False
        try:
            self.ready = self.ready or (self.conn.poll(START_TIMEOUT_S) and self.conn.recv() == "ready")
        except (EOFError, OSError):
            self.ready = False
        if not self.ready:
            logger.warning("answer-check worker did not start; checking in a thread")
            self._stop()
            self.can_spawn = False
        return self.ready

    def close(self) -> None:
        if self.proc is not None:
            self._stop()

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()
        self.proc = self.conn = None
        self.ready = False


def _call_in_thread(request: tuple, timeout: float):
    """Fallback where no process can be spawned: give up waiting after `timeout` (it runs on)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    op, *args = request
    result = []
    thread = threading.Thread(target=lambda: result.append(_OPS[op](*args)), daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def _check_in_thread(pred: str, gold: str, timeout: float) -> bool:
    return bool(_call_in_thread(("verify", pred, gold), timeout))


_WORKER = _Worker()


def start_worker() -> bool:
    """Start the math-verify worker now (up to START_TIMEOUT_S), so no later check waits for it.

    Benchmarks and timing tests call it; graders need not: the first check starts it. False
    where no process can be started (checks then run in a thread).
    """
    with _WORKER.lock:
        return _WORKER._wait_ready()


def _reset_worker() -> None:
    global _WORKER
    _WORKER = _Worker()  # a forked child must not share its parent's socket


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_worker)
atexit.register(lambda: _WORKER.close())


@lru_cache(maxsize=8192)
def _worker_call(request: tuple, timeout: float):
    """The worker's answer to `request` (None past `timeout`); no time left means no request."""
    return _WORKER.call(request, timeout) if timeout > 0 else None


def _symbolic_equal(pred: str, gold: str, timeout: float) -> bool:
    return bool(_worker_call(("verify", pred, gold), timeout))
