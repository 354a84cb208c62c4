"""The base model's scores, kept in $Q2G_CACHE so the same base model is evaluated once.

    key = cache_key(run)            # what the baseline depends on, and nothing else
    entry = load(key)               # (row, generations) or None: a damaged or foreign entry is ignored
    store(key, row, generations)

The key is every option declared `results="baseline"` (as resolved: precision "auto" -> "fp32"),
except the two paths among them, which are replaced by what they point at: the split manifest by
the ids of the holdout problems, the data folder by a hash of the WikiText text; plus the base
model's revision (models.model_revision: the hub commit, or a hash of a local folder's config and
weight files). An entry is one JSON file named by the key's hash and holding the key itself, so a
file that does not parse, lacks a field, or was made for another key is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from q2g.finetune.settings import run_keys
from q2g.io import atomic_write_json, cache_dir
from q2g.models import model_revision

FORMAT = "q2g-baseline/1"
FOLDER_ENV = "Q2G_BASELINE_CACHE"  # the folder (default: $Q2G_CACHE/baselines), or "off" (the test suite's default)
PATH_KEYS = ("split_file", "data_dir")  # replaced by the content they point at


def enabled() -> bool:
    return os.environ.get(FOLDER_ENV, "").lower() != "off"


def folder() -> Path:
    return Path(os.environ[FOLDER_ENV]).expanduser() if os.environ.get(FOLDER_ENV) else cache_dir() / "baselines"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(run) -> dict:
    """What the base model's row depends on (see the module docstring)."""
    values = run.settings.to_dict()
    key = {k: values.get(k) for k in run_keys(("baseline",)) if k not in PATH_KEYS}
    key["model_revision"] = model_revision(run.settings.asked.base_model)
    key["holdout_ids"] = sha256_text("\n".join(str(r.get("id")) for r in run.records or []))
    key["wikitext_sha256"] = sha256_text(run.wikitext or "")
    return key


def entry_path(key: dict) -> Path:
    return folder() / f"{sha256_text(json.dumps(key, sort_keys=True, default=str))[:32]}.json"


def warn(path: Path, why: str) -> None:
    print(f"[finetune] warning: baseline cache entry {path} ignored ({why}); evaluating afresh", flush=True)


def load(key: dict) -> tuple[dict, list, Path] | None:
    """(row, generations, path) of the cached baseline for `key`; None when absent or not trusted."""
    path = entry_path(key)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        fmt, saved_key, row, gens = entry["format"], entry["key"], entry["row"], entry["generations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        warn(path, f"damaged: {type(e).__name__}")
        return None
    if fmt != FORMAT or json.dumps(saved_key, sort_keys=True, default=str) != json.dumps(
        key, sort_keys=True, default=str
    ):
        warn(path, "made for other settings")
        return None
    if not row_ok(row) or not isinstance(gens, list):
        warn(path, "not a finite baseline row")
        return None
    return row, gens, path


def row_ok(row) -> bool:
    if not isinstance(row, dict) or row.get("epoch") != 0:
        return False
    values = [row.get("pass@1"), row.get("token_perplexity")]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) and values[1] > 0


def store(key: dict, row: dict, generations: list) -> Path | None:
    """Save the entry (a cache: a failure to write it is said, never fatal)."""
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": FORMAT, "key": key, "row": row, "generations": generations})
    except Exception as e:  # noqa: BLE001 - a read-only or full cache must not fail the run
        print(f"[finetune] note: the baseline was not cached at {path} ({type(e).__name__}: {e})", flush=True)
        return None
    return path
