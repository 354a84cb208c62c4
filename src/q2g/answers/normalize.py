"""Answers as values: GSM8K numbers as exact rationals, MATH strings in Hendrycks' normal form.

GSM8K answers are compared as exact rationals (`normalize_number`); a 1e-6 relative tolerance
applies only when one side is not an integer. MATH answers go through the Hendrycks string
normalisation (`normalize_math`, after https://github.com/hendrycks/math/blob/main/modeling/
math_equivalence.py, plus one spelling per relation, `\\leq` = `<=`, and `40 percent` = `40\\%`);
numbers are compared by value in MATH too, so `0.5` == `\\frac{1}{2}` (`math_number`).
"""

from __future__ import annotations

import re
from fractions import Fraction

REL_TOL = 1e-6
MAX_NUMBER_CHARS = 60  # longer digit runs are not amounts (and Fraction may refuse them)

# ---------------------------------------------------------------- GSM8K numbers


def last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last match of `pattern` in `text`, else None."""
    last = None
    for last in pattern.finditer(text):  # noqa: B007  (the loop variable is the result)
        pass
    return last


_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
# A leading `-` is a minus sign unless it follows a word or a bracket (`5-3`, `x-3`: a hyphen).
_NUMBER_RE = re.compile(rf"(?:(?<![\w)\]}}])-)?(?<![\w.])(?:{_INT}(?:\.\d+)?|\.\d+)(?:/{_INT}(?![\d.]))?")
_TEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")


def normalize_number(s) -> Fraction | None:
    """The first number in `s` as an exact Fraction: `$1,234.00` -> 1234, `50%` -> 50, `1/2`."""
    if s is None:
        return None
    token = number_in(str(s))
    return _to_fraction(token) if token else None


def number_in(span: str | None, last: bool = False) -> str | None:
    """The first (or last) number written in `span`, commas dropped: `\\$1,234.` -> `1234`."""
    if not span:
        return None
    span = span.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "")
    span = _TEX_FRAC_RE.sub(r"\1/\2", span)
    found = last_match(_NUMBER_RE, span) if last else _NUMBER_RE.search(span)
    return found.group().replace(",", "") if found else None


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "")
    if len(token) > MAX_NUMBER_CHARS:
        return None
    try:
        num, _, den = token.partition("/")
        return Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: Fraction, b: Fraction) -> bool:
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


def math_number(s: str) -> Fraction | None:
    """The value of a normalised answer that is a plain decimal or integer fraction, else None."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if _DECIMAL_RE.fullmatch(s):
        return _to_fraction(s)
    frac = _FRAC_NUMBER_RE.fullmatch(s)
    if frac is None:
        return None
    value = _to_fraction(f"{frac.group(2)}/{frac.group(3)}")
    return -value if value is not None and frac.group(1) else value
