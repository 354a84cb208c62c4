"""The baseline (epoch 0): the unchanged base model, scored once.

    model = baseline(run)   # the metrics row of epoch 0; returns the loaded base model or None

Where the row comes from, first match wins: metrics.jsonl already has it (a resumed run);
`--baseline-from FILE` (a sweep's shared baseline, checked against this run's settings); the
baseline cache in $Q2G_CACHE (below; off with --no-baseline-cache); else the base
model is evaluated, and the row cached. A reused row says so (`reused_from`).

The base model's scores, kept in $Q2G_CACHE so the same base model is evaluated once.

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

from q2g import distributed
from q2g.errors import BadInput, DataError
from q2g.evaluation.core import select_eval_subset
from q2g.finetune.config import run_keys
from q2g.finetune.epochs import describe, evaluate, record
from q2g.io import atomic_write_json, cache_dir, write_jsonl
from q2g.models import load_model, model_revision

GENERATIONS = Path("evals") / "epoch-0.generations.jsonl"


def load_base(run):
    return load_model(run.settings.asked.base_model, run.precision.dtype, run.settings.device)


def baseline_row(run, model) -> dict:
    return {
        "epoch": 0,
        "step": 0,
        "lora_r": None,
        "lora_alpha": None,
        "adapter": None,
        "train_loss": None,
        "train_tokens": 0,
        "train_tokens_per_s": None,
        "train_s": 0.0,
        **evaluate(run, model, run.out / GENERATIONS),
    }


def read_baseline(path: Path) -> tuple[dict, dict]:
    """(settings, row) of a baseline saved by `save_baseline`; DataError if it is not one."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["settings"], saved["row"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--baseline-from {path}: not a saved baseline ({type(e).__name__}: {e})") from None


def refuse_other_baseline(path: Path, saved: dict, settings) -> None:
    """A --baseline-from made with other settings: refused (prepare calls this before any write)."""
    diff = [k for k in run_keys(("baseline",)) if saved.get(k) != settings.get(k)]
    if diff:
        raise BadInput(f"--baseline-from {path} was made with other settings ({', '.join(diff)})")


def reuse_baseline(run, path: Path) -> dict:
    """The baseline row saved at `path` (by `save_baseline`) if it was made with these settings."""
    settings, row = read_baseline(path)
    refuse_other_baseline(path, settings, run.settings)
    print(f"[finetune] baseline: reused from {path}", flush=True)
    return {**row, "reused_from": str(path)}


def cached_or_evaluated(run) -> tuple[dict, object]:
    """(row, the loaded base model or None): the cached row if there is one, else a fresh one (cached)."""
    use_cache = not run.settings.asked.no_baseline_cache and enabled()
    key = cache_key(run) if use_cache else None
    hit = load(key) if use_cache else None
    if hit is not None:
        row, generations, path = hit
        write_jsonl(run.out / GENERATIONS, generations)
        print(f"[finetune] baseline: reused from the cache ({path}); --no-baseline-cache evaluates afresh", flush=True)
        return {**row, "generations": str(GENERATIONS), "reused_from": str(path)}, None
    model = load_base(run)
    n = len(select_eval_subset(run.records, run.settings.eval.eval_limit))
    print(
        f"[finetune] baseline eval of {run.settings.asked.base_model}: {n} holdout problems + WikiText...", flush=True
    )
    row = baseline_row(run, model)
    if use_cache and row_ok(row):
        generations = [json.loads(line) for line in (run.out / GENERATIONS).read_text(encoding="utf-8").splitlines()]
        store(key, row, generations)
    return row, model


def baseline(run):
    """Record the epoch-0 row (on the main process); returns the loaded base model, or None if it
    was not loaded (each training run then loads its own)."""
    if run.find(None, 0) is not None:
        print("[finetune] baseline: already in metrics.jsonl", flush=True)
        return None
    if run.records is None:
        return None
    model = row = None
    if distributed.is_main():
        if run.settings.asked.baseline_from:
            row = reuse_baseline(run, Path(run.settings.asked.baseline_from))
        else:
            row, model = cached_or_evaluated(run)
    record(run, distributed.share(row))
    print(f"[finetune] baseline: {describe(run.rows[-1], run.settings.asked.forgetting_budget)}", flush=True)
    return model


def save_baseline(run, path: Path) -> dict:
    """The base model's row (from the cache or evaluated) saved with its settings (for --baseline-from)."""
    row, _ = cached_or_evaluated(run) if run.records is not None else (baseline_row(run, load_base(run)), None)
    atomic_write_json(path, {"settings": {k: run.settings.get(k) for k in run_keys(("baseline",))}, "row": row})
    return row


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
