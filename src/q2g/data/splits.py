"""The holdout split, its manifest (split.json + holdout.jsonl) and the leakage check.

    train, holdout, settings = select_split(data_dir="packaged", limit=10)
    write_split(out_dir, train, holdout, settings)      # split.json, holdout.jsonl
    find_leaks(training_records, read_split(out_dir))   # [] when no holdout problem is trained on

HOLDOUT_FRACTION is the one default share of the problems held out (generate's
--holdout-fraction, finetune's description of the split). A duplicate problem (same normalised
text) never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from q2g.data.jsonl import read_jsonl_lines
from q2g.data.loaders import load_problems, resolve_data_dir
from q2g.data.schema import check_rows
from q2g.data.sources import DEFAULT_MATH_SUBJECTS, SOURCES, source_key, subject_slug
from q2g.errors import DataError
from q2g.io import atomic_write_text, read_input_bytes

HOLDOUT_FRACTION = 0.2
SPLIT_VERSION = 1


def normalize_problem(text: str) -> str:
    """Problem text reduced for duplicate detection: NFKC, lower case, no whitespace or `$`."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\s$]+", "", text)


def problem_hash(text: str) -> str:
    return hashlib.sha256(normalize_problem(text).encode("utf-8")).hexdigest()[:16]


def split_holdout(
    records: list[dict], fraction: float = HOLDOUT_FRACTION, seed: int = 0
) -> tuple[list[dict], list[dict]]:
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(train, holdout, settings)
    atomic_write_text(out_dir / "holdout.jsonl", "".join(json.dumps(r) + "\n" for r in holdout))
    atomic_write_text(out_dir / "split.json", json.dumps(manifest, indent=1) + "\n")
    return out_dir / "split.json"


def read_split(path) -> dict:
    """The split manifest at `path` (a split.json or its folder), checked: DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    if not path.exists():
        raise DataError(f"{path}: split manifest not found (run `q2g generate` first)")
    raw = read_input_bytes(path)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte offset {e.start}); not a split manifest") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object (a split manifest), got {type(manifest).__name__}")
    for key in ("version", "settings", "holdout"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    if manifest["version"] != SPLIT_VERSION:
        raise DataError(
            f"{path}: split manifest version {manifest['version']!r}, this q2g reads version {SPLIT_VERSION} "
            "(rerun `q2g generate` to write it again)"
        )
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
    if not manifest["holdout"]:
        raise DataError(f"{split_path}: the holdout has no problems (nothing to evaluate on; a larger --limit?)")
    holdout = split_path.parent / "holdout.jsonl"
    records = check_rows(holdout, read_jsonl_lines(holdout), "holdout")
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
    fraction=HOLDOUT_FRACTION,
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
    if not held and holdout == "official-test":
        raise DataError(f"--holdout official-test: the test split of {', '.join(datasets)} selected no problem")
    if not train:
        raise DataError(
            f"no training problem left: all {len(pool)} selected problem(s) are in the holdout "
            f"(--holdout {holdout}, --holdout-fraction {fraction}, --limit {limit}); select more problems"
        )
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
