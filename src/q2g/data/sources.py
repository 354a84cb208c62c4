"""The benchmarks q2g knows, their MATH subjects and levels, and the key results are grouped by.

One place for these names: data loading, the answer checker, generation's options and the
reports all import them from here. Also how MATH states its gold answer (`last_boxed`: the last
`\\boxed{...}` of a solution), which the loader reads and the answer checker uses again.
"""

from __future__ import annotations

import re

from q2g.errors import DataError

SOURCES = ("gsm8k", "math")
MATH_SUBJECTS = {
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
}
DEFAULT_MATH_SUBJECTS = ("algebra", "counting_and_probability")


def subject_slug(name: str) -> str:
    """'Counting & Probability' / 'counting_and_probability' -> 'counting_and_probability'."""
    slug = re.sub(r"[^a-z]+", "_", name.lower().replace("&", "and")).strip("_")
    if slug not in MATH_SUBJECTS:
        raise DataError(f"unknown MATH subject {name!r}; choose from {', '.join(MATH_SUBJECTS)}")
    return slug


def parse_level(value) -> int | None:
    """'Level 3' -> 3; 'Level ?' (two MATH train problems) -> None."""
    match = re.search(r"\d+", str(value))
    return int(match.group()) if match else None


def source_key(record: dict) -> str:
    """The stratification and reporting key: 'gsm8k' or 'math/<subject>'."""
    return record["source"] if record["source"] == "gsm8k" else f"math/{record['subject']}"


# How MATH marks its answer (the gold of a MATH record, and a model's boxed answer)

BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_BRACE_RE = re.compile(r"[{}]")
_BARE_BOX_RE = re.compile(r"[ \t]+([^\s$]+)")  # `\boxed 5`: TeX takes one token


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), else None."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in BOX_RE.finditer(text)]
    # An unclosed last box (a generation cut off mid-answer) falls back to the one before; at most
    # three tries keep a text made of unclosed boxes linear.
    for start in reversed(starts[-3:]):
        if text.startswith("{", start):
            content = braced(text, start)
        else:
            bare = _BARE_BOX_RE.match(text, start)
            content = bare.group(1) if bare else None
        if content is not None:
            return content
    return None


def braced(text: str, open_at: int) -> str | None:
    """The text inside the brace group opening at `open_at`, found by counting braces."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_at):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : m.start()]
    return None
