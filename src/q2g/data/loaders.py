"""Benchmarks -> problem records, one loader per benchmark, and the WikiText text.

Every stage reads problems through this module, so they all see the same record shape:

    {"id", "source", "subject", "level", "problem", "answer", "reference_solution"}

`id` is stable across runs and machines: GSM8K is ``gsm8k/<split>/<index>``, MATH is
``math/<unique_id without .json>`` when the file has one (``math/test/algebra/1``) and
``math/<split>/<subject>/<index>`` otherwise (the hub copy has no unique_id).

Where the data comes from, in order: an explicit ``data_dir`` argument, the ``Q2G_DATA_DIR``
environment variable, else the Hugging Face hub. A data dir has the layout of
``../shared/data`` and of the subsets shipped in the package (``packaged_data_dir()``)::

    gsm8k/{train,test}.jsonl   math/{train,test}.jsonl   wikitext/wiki.test.raw

A benchmark that yields no problem (an empty file, a subject/level choice nothing matches) is
refused (DataError naming the file and the choice): a run never goes on with nothing.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from q2g.data.jsonl import read_jsonl_lines
from q2g.data.sources import DEFAULT_MATH_SUBJECTS, SOURCES, last_boxed, parse_level, subject_slug
from q2g.errors import DataError
from q2g.io import read_input_bytes

DATA_DIR_ENV = "Q2G_DATA_DIR"


def packaged_data_dir() -> Path:
    """The small real subsets shipped inside the package (see assets/data/SOURCE.md)."""
    return Path(__file__).resolve().parents[1] / "assets" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """`data_dir`, else $Q2G_DATA_DIR, else None (meaning: the hub). 'packaged' names the shipped subsets."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    if str(value) == "packaged":
        return packaged_data_dir()
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"data dir {path} is a file, not a folder (from --data-dir or ${DATA_DIR_ENV})")
    if not path.is_dir():
        raise DataError(f"data dir {path} does not exist (from --data-dir or ${DATA_DIR_ENV})")
    return path


def _local_file(data_dir: Path, *parts: str) -> Path:
    path = data_dir.joinpath(*parts)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a file (data dir {data_dir} must hold {'/'.join(parts)})")
    if not path.is_file():
        raise DataError(f"{path} not found (data dir {data_dir} must hold {'/'.join(parts)})")
    return path


# ---------------------------------------------------------------- GSM8K


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: the number after the last '####', commas removed."""
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '####' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k_record(row: dict, split: str, index: int) -> dict:
    return {
        "id": f"gsm8k/{split}/{index}",
        "source": "gsm8k",
        "subject": None,
        "level": None,
        "problem": row["question"],
        "answer": gsm8k_gold(row["answer"]),
        "reference_solution": row["answer"],
    }


def load_gsm8k(split: str = "train", data_dir=None) -> list[dict]:
    """GSM8K records; hub `openai/gsm8k` (config `main`) or `<data_dir>/gsm8k/<split>.jsonl`."""
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = _local_file(local, "gsm8k", f"{split}.jsonl")
        lines = read_jsonl_lines(path, required=("question", "answer"), types={"question": str, "answer": str})
    else:
        path, lines = "openai/gsm8k", list(enumerate(_load_hub("openai/gsm8k", "main", split), 1))
    return [_at_line(path, lineno, _gsm8k_record, row, split, i) for i, (lineno, row) in enumerate(lines)]


def _at_line(path, lineno: int, make, row: dict, *args) -> dict:
    """make(row, *args), with a row it cannot use reported as `path:line: why`."""
    try:
        return make(row, *args)
    except (DataError, ValueError) as e:
        raise DataError(f"{path}:{lineno}: {e}") from None


# ---------------------------------------------------------------- MATH


def _math_id(row: dict, split: str, subject: str, index: int) -> str:
    uid = row.get("unique_id")
    if uid:
        return "math/" + re.sub(r"\.json$", "", uid)
    return f"math/{split}/{subject}/{index}"


def _math_record(row: dict, split: str, index: int) -> dict:
    subject = subject_slug(row["type"])
    return {
        "id": _math_id(row, split, subject, index),
        "source": "math",
        "subject": subject,
        "level": parse_level(row.get("level")),
        "problem": row["problem"],
        "answer": last_boxed(row["solution"]),
        "reference_solution": row["solution"],
    }


def load_math(split="train", subjects=DEFAULT_MATH_SUBJECTS, levels=None, data_dir=None) -> list[dict]:
    """MATH records of the chosen subjects (and levels); hub `EleutherAI/hendrycks_math` or local jsonl."""
    wanted = [subject_slug(s) for s in subjects]
    local = resolve_data_dir(data_dir)
    records = []
    if local is not None:
        path = _local_file(local, "math", f"{split}.jsonl")
        lines = read_jsonl_lines(
            path,
            required=("problem", "level", "type", "solution"),
            types={"problem": str, "type": str, "solution": str},
        )
        counters: dict[str, int] = defaultdict(int)
        for lineno, row in lines:
            slug = _at_line(path, lineno, lambda r: subject_slug(r["type"]), row)
            index = counters[slug]
            counters[slug] += 1
            if slug in wanted:
                records.append(_at_line(path, lineno, _math_record, row, split, index))
    else:
        for slug in wanted:
            rows = _load_hub("EleutherAI/hendrycks_math", slug, split)
            records += [_math_record(row, split, i) for i, row in enumerate(rows)]
    if levels:
        levels = {int(x) for x in levels}
        records = [r for r in records if r["level"] in levels]
    # A solution without \boxed{} has no gold answer to check against: never train or score on it.
    return [r for r in records if r["answer"] is not None]


# ---------------------------------------------------------------- all problems


def load_problems(
    datasets=SOURCES, split="train", math_subjects=DEFAULT_MATH_SUBJECTS, math_levels=None, data_dir=None
) -> list[dict]:
    """The records of the chosen benchmarks, in a fixed order (source, then file order).

    A benchmark that yields no problem is refused (DataError saying what selected nothing)."""
    records = []
    for name in datasets:
        if name == "gsm8k":
            found = load_gsm8k(split, data_dir)
            what = "--datasets gsm8k"
        elif name == "math":
            found = load_math(split, math_subjects, math_levels, data_dir)
            levels = f", --math-levels {' '.join(map(str, math_levels))}" if math_levels else ""
            what = f"--datasets math with --math-subjects {' '.join(math_subjects)}{levels}"
        else:
            raise DataError(f"unknown dataset {name!r}; choose from {', '.join(SOURCES)}")
        if not found:
            local = resolve_data_dir(data_dir)
            where = local / name / f"{split}.jsonl" if local is not None else f"the hub's {name} {split} split"
            raise DataError(f"{what} selected no problem in {where}")
        records += found
    return records


def _load_hub(repo: str, config: str, split: str) -> list[dict]:
    try:
        from datasets import load_dataset

        return list(load_dataset(repo, config, split=split))
    except Exception as e:  # offline, no such config, ... : say what to do instead
        raise DataError(
            f"could not load {repo} ({config}, {split}) from the Hugging Face hub: {e}\n"
            f"Offline? Point --data-dir (or ${DATA_DIR_ENV}) at local files, or use "
            f"--data-dir packaged for the subsets shipped with q2g."
        ) from e


# ---------------------------------------------------------------- WikiText


def load_wikitext(data_dir=None) -> str:
    """WikiText-103 raw test text: the non-empty rows, in order, LF line ends.

    Blank rows are dropped so the hub rows and the local `wiki.test.raw` (which has no blank
    rows) give the identical string, hence identical perplexities.
    """
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = _local_file(local, "wikitext", "wiki.test.raw")
        raw = read_input_bytes(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 (byte offset {e.start}: {raw[e.start : e.start + 4]!r})") from None
        rows = text.replace("\r\n", "\n").splitlines(keepends=True)
    else:
        rows = [r["text"] for r in _load_hub("Salesforce/wikitext", "wikitext-103-raw-v1", "test")]
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows if r.strip())
