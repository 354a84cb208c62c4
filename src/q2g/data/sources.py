"""The benchmarks q2g knows, their MATH subjects and levels, and the key results are grouped by.

One place for these names: data loading, the answer checker, generation's options and the
reports all import them from here.
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
