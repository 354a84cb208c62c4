"""The baseline (epoch 0): the unchanged base model, scored once.

    model = baseline(run)   # the metrics row of epoch 0; returns the loaded base model or None

Where the row comes from, first match wins: metrics.jsonl already has it (a resumed run);
`--baseline-from FILE` (a sweep's shared baseline, checked against this run's settings); the
baseline cache in $Q2G_CACHE (baseline_cache.py; off with --no-baseline-cache); else the base
model is evaluated, and the row cached. A reused row says so (`reused_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

from q2g import distributed
from q2g.errors import BadInput, DataError
from q2g.evaluation.subset import select_eval_subset
from q2g.finetune import baseline_cache
from q2g.finetune.epochs import describe, evaluate, record
from q2g.finetune.settings import run_keys
from q2g.io import atomic_write_json, write_jsonl
from q2g.models import load_model

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
    use_cache = not run.settings.asked.no_baseline_cache and baseline_cache.enabled()
    key = baseline_cache.cache_key(run) if use_cache else None
    hit = baseline_cache.load(key) if use_cache else None
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
    if use_cache and baseline_cache.row_ok(row):
        generations = [json.loads(line) for line in (run.out / GENERATIONS).read_text(encoding="utf-8").splitlines()]
        baseline_cache.store(key, row, generations)
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
