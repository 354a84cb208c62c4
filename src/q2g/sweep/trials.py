"""One trial of a sweep: one `finetune.run_finetune` into DIR/trial-NNN/, scored against one baseline.

A trial that raises (a CUDA out-of-memory, a non-finite loss, any other error) is told to the study
as FAIL with its reason (the trial's `error` user attribute, and the study's `error-trial-NNN`),
memory is freed and the sweep goes on with the next trial; the next run of the command retries the
failed settings once. Ctrl-C (and SIGTERM, turned into it by cli.py) stops the sweep: the trial is
released and the next run resumes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from q2g.config import result_keys
from q2g.errors import ConfigError, RunFailed
from q2g.finetune import baseline, prepare
from q2g.finetune.config import FinetuneConfig
from q2g.memory import free_accelerator_memory
from q2g.sweep.pareto import write_outputs
from q2g.sweep.settings import Sweep
from q2g.sweep.space import shown_settings, trial_settings
from q2g.sweep.storage import is_url
from q2g.sweep.study import RETRIED
from q2g.sweep.workers import Heartbeat, locked

EPOCH_KEYS = ("epoch", "lora_r", "pass@1", "heldout_loss", "ppl_change", "train_loss", "flagged")


def baseline_path(sweep: Sweep, cfg) -> Path:
    """DIR/baseline.json for the sweep's student; a searched student setting gets its own file."""
    other = {
        k: getattr(cfg, k)
        for k in result_keys(FinetuneConfig, scopes=("baseline",))
        if getattr(cfg, k) != getattr(sweep.finetune, k)
    }
    if not other:
        return sweep.out / "baseline.json"
    return sweep.out / f"baseline-{hashlib.sha256(json.dumps(other).encode()).hexdigest()[:8]}.json"


def evaluate_baseline(cfg, eval_cfg, path: Path) -> dict:
    """Score the base model once and save its row at `path` (its generations in the folder beside)."""
    run = prepare.prepare(cfg.replace(out=str(path.with_suffix("")), resume=False, baseline_from=None), eval_cfg)
    return baseline.save_baseline(run, path)


def ensure_baseline(sweep: Sweep, cfg, baseline) -> Path:
    path = baseline_path(sweep, cfg)
    with locked(sweep.lock):  # one worker scores it, the others wait and reuse it
        if not path.exists():
            print(f"[sweep] baseline of {cfg.base_model} -> {path}", flush=True)
            baseline(cfg, sweep.eval_cfg, path)
    row = json.loads(path.read_text(encoding="utf-8"))["row"]
    if "heldout_loss" in sweep.cfg.objectives and "heldout_loss" not in row:
        raise ConfigError(
            f"{sweep.config}: sweep.objectives: the metrics rows have no heldout_loss (not measured by "
            "this q2g's evaluation yet); use objectives [pass@1, ppl_change]"
        )
    return path


def final_row(rows: list[dict], selection: dict) -> dict:
    """The metrics row of the adapter in final/, else (none qualified) the last trained epoch."""
    trained = [r for r in rows if r.get("epoch", 0) >= 1]
    if not trained:
        raise RunFailed("the trial wrote no trained epoch to metrics.jsonl")
    kept = [r for r in trained if selection.get("adapter") and r.get("adapter") == selection["adapter"]]
    return (kept or trained)[-1]


def trial_row(number: int, folder: Path, settings: dict, result: dict, objectives: list[str]) -> dict:
    """trials.jsonl's row from run_finetune's result; RunFailed if an objective was not measured."""
    rows = [r for r in result["rows"] if r.get("epoch", 0) >= 1]
    final = final_row(rows, result["selection"])
    for name in objectives:
        if final.get(name) is None:
            raise RunFailed(f"trial {number}: the final metrics row ({final.get('adapter')}) has no {name!r}")
    return {
        "trial": number,
        "dir": str(folder),
        "settings": settings,
        "values": {name: final[name] for name in objectives},
        "pass@1": final.get("pass@1"),
        "pass@1_by_source": final.get("pass@1_by_source"),
        "heldout_loss": final.get("heldout_loss"),
        "ppl_change": final.get("ppl_change"),
        "token_perplexity": final.get("token_perplexity"),
        "over_budget": bool(final.get("flagged")),
        "final_epoch": final["epoch"],
        "adapter": str(folder / "final") if result["selection"].get("adapter") else None,
        "train_s": sum(r.get("train_s") or 0.0 for r in rows),
        "wall_s": result.get("wall_s"),
        "epochs": [{k: r.get(k) for k in EPOCH_KEYS} for r in rows],
    }


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def progress(study, sweep: Sweep, number: int, settings: dict) -> str:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    left = sweep.target - len(done)
    walls = [t.user_attrs["row"]["wall_s"] for t in done if (t.user_attrs.get("row") or {}).get("wall_s")]
    mean = sum(walls) / len(walls) if walls else None
    eta = (
        f"ETA ~{_duration(left * mean / max(1, running))} ({_duration(mean)} per trial, {running} running)"
        if mean
        else "ETA after the first trial"
    )
    shown = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in settings.items())
    return f"[sweep] trial {number}: {shown} | {len(done)} of {sweep.target} finished, {left} left | {eta}"


def fail(study, trial, number: int, error: BaseException) -> str:
    """Tell the study the trial failed, with its reason where the study and pareto.md keep it."""
    from optuna.trial import TrialState

    reason = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    trial.set_user_attr("error", reason)
    study.set_user_attr(f"error-trial-{number:03d}", reason)
    study.tell(trial, state=TrialState.FAIL)
    RETRIED.add(trial.number)  # the same settings would fail the same way now: the next run retries them
    return reason


def run_trial(study, sweep: Sweep, trial, train, baseline) -> bool:
    """One finetune into DIR/trial-NNN (resumed there when taken over or re-queued after its
    worker died); tells the study its values, or FAIL with the reason. True when it completed."""
    number = trial.user_attrs["trial"]
    settings = trial_settings(sweep.dims, trial.params, sweep.finetune)
    shown = shown_settings(sweep.dims, trial.params, sweep.finetune)  # + lora_alpha_ratio
    folder = sweep.out / f"trial-{number:03d}"
    resume = trial.user_attrs["attempts"] > 1
    print(progress(study, sweep, number, shown) + (" (resumed)" if resume else ""), flush=True)
    beat = sweep.cfg.heartbeat_interval if is_url(sweep.cfg.storage) else None  # an RDB: Optuna watches beats
    try:
        with Heartbeat(study._storage, trial._trial_id, beat):
            cfg = sweep.finetune.replace(**settings, out=str(folder), resume=resume)
            cfg = cfg.replace(baseline_from=str(ensure_baseline(sweep, cfg, baseline)))
            row = trial_row(number, folder, shown, train(cfg, sweep.eval_cfg), sweep.cfg.objectives)
    except KeyboardInterrupt:
        trial.set_user_attr("worker", {"released": True})  # the next run takes it over and resumes it
        raise
    except ConfigError:  # settings every trial shares (the baseline's objective): stop the sweep
        raise
    except Exception as e:  # out of memory, a non-finite loss, a bug: this trial fails, the sweep goes on
        reason = fail(study, trial, number, e)
        free_accelerator_memory()
        print(f"[sweep] trial {number} failed: {reason}; going on with the next trial", flush=True)
        return False
    trial.set_user_attr("row", row)
    study.tell(trial, [row["values"][name] for name in sweep.cfg.objectives])
    with locked(sweep.lock):
        write_outputs(study, sweep)
    return True
