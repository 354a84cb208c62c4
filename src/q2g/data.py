"""Benchmarks -> problem records, the holdout split and the leakage check.

Every stage reads problems through this module, so they all see the same record shape:

    {"id", "source", "subject", "level", "problem", "answer", "reference_solution"}

`id` is stable across runs and machines: GSM8K is ``gsm8k/<split>/<index>``, MATH is
``math/<unique_id without .json>`` when the file has one (``math/test/algebra/1``) and
``math/<split>/<subject>/<index>`` otherwise (the hub copy has no unique_id).

Where the data comes from, in order: an explicit ``data_dir`` argument, the ``Q2G_DATA_DIR``
environment variable, else the Hugging Face hub. A data dir has the layout of
``../shared/data`` and of the subsets shipped in the package (``packaged_data_dir()``)::

    gsm8k/{train,test}.jsonl   math/{train,test}.jsonl   wikitext/wiki.test.raw
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from q2g.errors import DataError  # noqa: F401  (bad or missing input data: names file, line and field)

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
DATA_DIR_ENV = "Q2G_DATA_DIR"
SPLIT_VERSION = 1


def packaged_data_dir() -> Path:
    """The small real subsets shipped inside the package (see assets/data/SOURCE.md)."""
    return Path(__file__).resolve().parent / "assets" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """`data_dir`, else $Q2G_DATA_DIR, else None (meaning: the hub). 'packaged' names the shipped subsets."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    if str(value) == "packaged":
        return packaged_data_dir()
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data dir {path} does not exist (from --data-dir or ${DATA_DIR_ENV})")
    return path


def read_jsonl(path: Path, required: Iterable[str] = (), types: dict | None = None) -> list[dict]:
    """Read a JSONL file; a bad line, a missing field or a field of the wrong type (`types`:
    field -> type or tuple of types) raises DataError naming file:line; undecodable bytes name the
    byte offset."""
    return [row for _, row in read_jsonl_lines(path, required, types)]


def read_jsonl_lines(path: Path, required: Iterable[str] = (), types: dict | None = None) -> list[tuple[int, dict]]:
    """`read_jsonl` with each row's line number, for errors found later (`file:line: ...`)."""
    required, types = tuple(required), types or {}
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission...
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte offset {e.start}: {raw[e.start : e.start + 4]!r})") from None
    return [
        (lineno, _jsonl_row(path, lineno, line, required, types))
        for lineno, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]


def _jsonl_row(path, lineno: int, line: str, required: tuple, types: dict) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
    for key, kind in types.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = row.get(key)
        if key in row and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise DataError(
                f"{path}:{lineno}: field {key!r} must be {names}, got {type(row[key]).__name__} "
                f"{json.dumps(row[key])[:40]}"
            )
    return row


def _local_file(data_dir: Path, *parts: str) -> Path:
    path = data_dir.joinpath(*parts)
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


def _math_id(row: dict, split: str, subject: str, index: int) -> str:
    uid = row.get("unique_id")
    if uid:
        return "math/" + re.sub(r"\.json$", "", uid)
    return f"math/{split}/{subject}/{index}"


def _math_record(row: dict, split: str, index: int) -> dict:
    from q2g.answers import last_boxed

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
    """The records of the chosen benchmarks, in a fixed order (source, then file order)."""
    records = []
    for name in datasets:
        if name == "gsm8k":
            records += load_gsm8k(split, data_dir)
        elif name == "math":
            records += load_math(split, math_subjects, math_levels, data_dir)
        else:
            raise DataError(f"unknown dataset {name!r}; choose from {', '.join(SOURCES)}")
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
        rows = path.read_text(encoding="utf-8").replace("\r\n", "\n").splitlines(keepends=True)
    else:
        rows = [r["text"] for r in _load_hub("Salesforce/wikitext", "wikitext-103-raw-v1", "test")]
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows if r.strip())


# ---------------------------------------------------------------- holdout split


def normalize_problem(text: str) -> str:
    """Problem text reduced for duplicate detection: NFKC, lower case, no whitespace or `$`."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\s$]+", "", text)


def problem_hash(text: str) -> str:
    return hashlib.sha256(normalize_problem(text).encode("utf-8")).hexdigest()[:16]


def source_key(record: dict) -> str:
    """The stratification and reporting key: 'gsm8k' or 'math/<subject>'."""
    return record["source"] if record["source"] == "gsm8k" else f"math/{record['subject']}"


def split_holdout(records: list[dict], fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Seeded split stratified by source and MATH subject -> (train, holdout).

    The unit drawn is a group of problems with the same normalised text, so a duplicate can
    never sit on both sides. Each stratum sends round(fraction * groups) groups to the holdout.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    strata: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        strata[source_key(record)][problem_hash(record["problem"])].append(record)
    held: set[str] = set()
    for name in sorted(strata):
        groups = sorted(strata[name])  # hashes: independent of input order
        random.Random(f"{seed}/{name}").shuffle(groups)
        for h in groups[: round(fraction * len(groups))]:
            held.update(r["id"] for r in strata[name][h])
    return [r for r in records if r["id"] not in held], [r for r in records if r["id"] in held]


def make_manifest(train: list[dict], holdout: list[dict], settings: dict) -> dict:
    """The split manifest: settings, and id + problem hash of each side."""

    def side(rows):
        return [
            {"id": r["id"], "hash": problem_hash(r["problem"]), "source": r["source"], "subject": r["subject"]}
            for r in rows
        ]

    return {"version": SPLIT_VERSION, "settings": settings, "holdout": side(holdout), "train": side(train)}


def write_split(out_dir: Path, train: list[dict], holdout: list[dict], settings: dict) -> Path:
    """Write `split.json` (manifest) and `holdout.jsonl` (the holdout records, for evaluation)."""
    from q2g.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(train, holdout, settings)
    atomic_write_text(out_dir / "holdout.jsonl", "".join(json.dumps(r) + "\n" for r in holdout))
    atomic_write_text(out_dir / "split.json", json.dumps(manifest, indent=1) + "\n")
    return out_dir / "split.json"


def read_split(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: split manifest not found (run `q2g generate` first)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object (a split manifest), got {type(manifest).__name__}")
    for key in ("version", "settings", "holdout"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    entries = manifest["holdout"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"id", "hash"} <= set(e) for e in entries):
        raise DataError(f"{path}: 'holdout' must be a list of {{id, hash}} entries (a damaged manifest?)")
    return manifest


def load_holdout(split_path) -> list[dict]:
    """The holdout records beside a manifest, checked against its ids and hashes."""
    split_path = Path(split_path)
    if split_path.is_dir():
        split_path = split_path / "split.json"
    manifest = read_split(split_path)
    records = read_jsonl(split_path.parent / "holdout.jsonl", required=("id", "problem", "answer", "source"))
    expected = {e["id"]: e["hash"] for e in manifest["holdout"]}
    got = {r["id"]: problem_hash(r["problem"]) for r in records}
    if got != expected:
        raise DataError(
            f"{split_path.parent / 'holdout.jsonl'} does not match {split_path} (ids or problem hashes differ)"
        )
    return records


def find_leaks(records: Iterable[dict], manifest: dict) -> list[dict]:
    """Every training record whose id or normalised-problem hash is in the holdout."""
    by_hash = {e["hash"]: e["id"] for e in manifest["holdout"]}
    ids = {e["id"] for e in manifest["holdout"]}
    leaks = []
    for record in records:
        h = problem_hash(record["problem"])
        if record.get("id") in ids or h in by_hash:
            leaks.append(
                {
                    "id": record.get("id"),
                    "holdout_id": by_hash.get(h, record.get("id")),
                    "hash": h,
                    "by": "id" if record.get("id") in ids else "problem_hash",
                }
            )
    return leaks


def select_split(
    datasets=SOURCES,
    math_subjects=DEFAULT_MATH_SUBJECTS,
    math_levels=None,
    holdout="random",
    fraction=0.2,
    seed=0,
    data_dir=None,
    limit=None,
) -> tuple[list[dict], list[dict], dict]:
    """Load problems and split them -> (train, holdout, settings).

    holdout='random': a seeded `fraction` of the train split. holdout='official-test': the
    benchmarks' test splits; train problems that duplicate a test problem are dropped.
    `limit` caps the problems per stratum *before* splitting (for quick runs), deterministically.
    """
    kw = dict(datasets=datasets, math_subjects=math_subjects, math_levels=math_levels, data_dir=data_dir)
    pool = _limit_per_stratum(load_problems(split="train", **kw), limit, seed)
    if holdout == "random":
        train, held = split_holdout(pool, fraction, seed)
    elif holdout == "official-test":
        held = _limit_per_stratum(load_problems(split="test", **kw), limit and max(1, round(limit * fraction)), seed)
        leaked = {x["id"] for x in find_leaks(pool, make_manifest([], held, {}))}
        train = [r for r in pool if r["id"] not in leaked]
    else:
        raise ValueError(f"holdout must be 'random' or 'official-test', got {holdout!r}")
    settings = {
        "datasets": list(datasets),
        "math_subjects": [subject_slug(s) for s in math_subjects],
        "math_levels": sorted(math_levels) if math_levels else None,
        "holdout": holdout,
        "holdout_fraction": fraction,
        "seed": seed,
        "limit": limit,
        "data_dir": str(resolve_data_dir(data_dir) or "hub"),
    }
    return train, held, settings


def _limit_per_stratum(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    if not limit:
        return records
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        strata[source_key(r)].append(r)
    keep = set()
    for name, rows in strata.items():
        ids = sorted(r["id"] for r in rows)
        random.Random(f"limit/{seed}/{name}").shuffle(ids)
        keep.update(ids[:limit])
    return [r for r in records if r["id"] in keep]
