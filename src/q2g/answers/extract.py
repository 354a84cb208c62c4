"""Extract the final answer a solution states, with the name of the rule that found it.

    from q2g.answers.extract import extract_answer_with_rule, last_boxed
    extract_answer_with_rule("... so she pays $1,234.00.", "gsm8k")  # ('1234.00', 'last_number')

Extraction rules, tried in this order; the one that matched is returned with the answer, so a
report can show how lenient the extraction had to be (as lm-evaluation-harness does):
  gsm8k: gsm8k_hash (`#### 72`), boxed, final_answer_is / answer_is, A_colon, last_number
  math:  final_answer_is when stated after the last box, boxed_multi (`\\boxed{2} and
         \\boxed{3}` -> `2, 3`), boxed (last `\\boxed{}` / `\\fbox{}`), final_answer_is /
         answer_is, A_colon, then math-verify's own extraction: mv_latex (`Answer \\[ 7 \\]`, the
         last `$..$`), mv_expr (`answer: 40 percent`, else the last number).
The strict rules come first; FLEXIBLE_RULES (mv_latex, mv_expr) are the flexible fallback,
which reads the last MV_TAIL_CHARS characters in the sandbox worker (answers.sandbox), within the
same time budget as the check that follows (one budget per `check.is_correct`). A MATH output with
no stated answer is read as math-verify reads it (its last number, rule mv_expr), as lm-eval's
flexible extractor does. tests/test_answers_fuzz.py holds the rules to that budget.
"""

from __future__ import annotations

import re

from q2g.answers.normalize import last_match, number_in
from q2g.answers.sandbox import CHECK_TIMEOUT_S, too_deep_or_huge, worker_call
from q2g.data.sources import BOX_RE, SOURCES, braced, last_boxed  # noqa: F401  (last_boxed: re-exported)

MV_TAIL_CHARS = 3000  # math-verify's fallback extraction reads only the end of a solution
FLEXIBLE_RULES = ("mv_latex", "mv_expr")  # math-verify's reading: not a stated final answer

# ---------------------------------------------------------------- boxes (last_boxed: q2g.data.sources)

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
    for m in list(BOX_RE.finditer(text))[-_MAX_BOXES:]:
        if text.startswith("{", m.end()):
            content = braced(text, m.end())
            if content is not None:
                spans.append((m.start(), m.end() + len(content) + 2, content))
    joined = spans[-1:]
    for prev in reversed(spans[:-1]):
        if not _JOINER_RE.fullmatch(text, prev[1], joined[0][0]):
            break
        joined.insert(0, prev)
    return ", ".join(c.strip() for _, _, c in joined) if len(joined) > 1 else None


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
        answer = number_in(span, last=rule == "last_number") if source == "gsm8k" else span
        if answer:
            return answer, rule
    if source == "math":
        return _fallback_extract(text, CHECK_TIMEOUT_S if timeout is None else timeout)
    return None, None


def _gsm8k_spans(text: str):
    """(rule, text holding the answer) in priority order; lazy, so later rules cost nothing."""
    hashed = last_match(_HASH_RE, text)
    yield "gsm8k_hash", hashed and _rest_of_line(text, hashed.end())
    box = last_boxed(text)
    yield "boxed", box and box.rsplit("=", 1)[-1]  # `\boxed{3 \times 4 = 12}` means 12
    yield from _stated_spans(text, _rest_of_line)
    yield "last_number", text


def _math_spans(text: str):
    stated = last_match(_ANSWER_IS_RE, text)
    last_box = last_match(BOX_RE, text)
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
    stated = last_match(_ANSWER_IS_RE, text)
    rule = "final_answer_is" if stated and stated.group(1) else "answer_is"
    yield rule, stated and take(text, stated.end())
    colon = last_match(_A_COLON_RE, text)
    yield "A_colon", colon and take(text, colon.end())


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)]


def _fallback_extract(text: str, timeout: float) -> tuple[str | None, str | None]:
    """math-verify's reading of the end of `text`, unless that end would be costly to parse."""
    tail = _tail(text)
    if too_deep_or_huge(tail):
        return None, None
    found = worker_call(("extract", tail), round(timeout, 1))
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
