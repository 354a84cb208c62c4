"""`q2g sweep`: Optuna sweeps of stage 2, which LoRA settings buy accuracy for the least forgetting.

    q2g sweep --config configs/sweep_demo_gemma3-270m.yaml
    q2g sweep --config my_run.yaml --out runs/sweep --n-trials 16 --storage sqlite:///runs/sweep.db
    q2g sweep --config my_run.yaml --out runs/sweep &  q2g sweep --config my_run.yaml --out runs/sweep
    q2g sweep --config my_run.yaml --storage postgresql://user:pw@db-host/q2g   # on every machine

The file is a `q2g run` config plus a `sweep:` section (see SweepConfig): the search `space`
(finetune options as a list of values or `{low, high, log}`; `lora_alpha_ratio` sets alpha = ratio * r),
the `sampler` (grid | tpe | nsga2) and two `objectives` (pass@1 or heldout_loss, then ppl_change).
Every stage's settings, the models and the storage are checked before anything is written. Stage 1
runs once; the base model is evaluated once (DIR/baseline.json) and every trial reuses that row;
each trial is one `finetune.run_finetune` into DIR/trial-NNN/. The study (default: an Optuna journal
file, DIR/study.journal, for workers on this machine; an RDB URL for workers on several) is the one
record of what ran: rerunning the command goes on, a trial whose process died is taken over and its
finetune resumed in the same folder.

A trial that fails (CUDA out of memory, a non-finite loss, any error) is recorded as FAIL with its
reason and the sweep goes on; the next run retries it once. Exit codes: 0 every trial finished,
1 the sweep ended with failed trials whose settings never finished (listed in pareto.md), 2 bad
input or settings (nothing written), 130 Ctrl-C or SIGTERM (the running trial resumes on the next run).

Writes DIR/trials.jsonl (one row per finished trial), DIR/pareto.md and DIR/pareto.png (the front).
Per-epoch values are kept in each trial's row (`epochs`): Optuna's `trial.report` and pruning exist
for single-objective studies only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from q2g import run
from q2g.config import result_keys
from q2g.errors import EXIT_FAILED, ConfigError
from q2g.finetune import stage as finetune
from q2g.finetune.config import FinetuneConfig
from q2g.generate import stage as generate
from q2g.io import atomic_write_json, write_failed
from q2g.memory import allocator_defaults
from q2g.sweep.pareto import write_outputs
from q2g.sweep.settings import load_sweep, resolved
from q2g.sweep.storage import check_storage, describe, is_url, open_storage
from q2g.sweep.study import load_optuna, next_trial, open_study, others_running, refuse_changed_settings
from q2g.sweep.trials import ensure_baseline, evaluate_baseline, run_trial
from q2g.sweep.workers import locked


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the sweep folder ({e.strerror or e})") from None


def run_sweep(config: Path, out: Path | None = None, *, train=None, baseline=None, **overrides) -> dict:
    """Generate once, then run trials until the study has its n_trials; returns write_outputs(...).
    `train(cfg, eval_cfg)` (default finetune.run_finetune) and `baseline(cfg, eval_cfg, path)`
    (default evaluate_baseline) are replaceable for tests; with both replaced, the student model
    is not looked up (the fakes never load it)."""
    optuna = load_optuna()
    sweep = load_sweep(Path(config), out, **overrides)
    check_storage(sweep.cfg.storage)
    refuse_changed_settings(sweep)  # before the folder, the lock or the journal is touched
    if train is None or baseline is None:
        run.preflight(
            sweep.generate, sweep.finetune, sweep.eval_cfg
        )  # the models and data folders, before anything is written
    storage_args = (sweep.cfg.storage, sweep.out, sweep.cfg.heartbeat_interval, sweep.cfg.grace_period)
    storage = open_storage(optuna, *storage_args) if is_url(sweep.cfg.storage) else None  # reachable?
    make_out(sweep.out)
    with locked(sweep.lock):
        study = open_study(optuna, sweep, storage or open_storage(optuna, *storage_args))  # refuses other settings
    print(
        f"[sweep] {sweep.cfg.sampler} over {', '.join(sweep.dims)} -> {sweep.out} ({sweep.target} trials)", flush=True
    )
    with locked(sweep.lock):
        try:
            shutil.copy(sweep.config, sweep.out / "sweep_config.yaml")
        except OSError as e:
            raise write_failed(sweep.out / "sweep_config.yaml", e) from None
        atomic_write_json(sweep.out / "sweep.json", resolved(sweep, describe(sweep.cfg.storage, sweep.out)))
        generate.main(sweep.gen_argv)
    if not set(result_keys(FinetuneConfig, scopes=("baseline",))) & set(sweep.dims):
        ensure_baseline(sweep, sweep.finetune, baseline or evaluate_baseline)  # one for all, before the first trial
    while True:
        with locked(sweep.lock):
            trial = next_trial(optuna, study, sweep)
        if trial is None:
            if not others_running(study, sweep):
                break
            time.sleep(sweep.cfg.heartbeat_interval)  # a trial of another worker may be re-queued
            continue
        run_trial(study, sweep, trial, train or finetune.run_finetune, baseline or evaluate_baseline)
    with locked(sweep.lock):
        result = write_outputs(study, sweep)
    print(
        f"[sweep] {len(result['rows'])} trials finished; front: {sorted(result['front'])}; {sweep.out / 'pareto.md'}",
        flush=True,
    )
    return result


def unresolved(result: dict) -> list[dict]:
    """Failed trials whose settings no finished trial has (a rerun retries them)."""
    done = [json.dumps(r["settings"], sort_keys=True, default=str) for r in result["rows"]]
    return [f for f in result["failed"] if json.dumps(f["settings"], sort_keys=True, default=str) not in done]


def stop_on_sigterm():
    """SIGTERM (a scheduler's stop) ends the sweep like Ctrl-C: the running trial is released.
    Returns the handler it replaced."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="q2g sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a run YAML with a sweep: section (path or shipped name)")
    parser.add_argument("--out", help="sweep folder (default: the config's `out:`)")
    parser.add_argument("--n-trials", type=int, help="finished trials in all (overrides sweep.n_trials)")
    parser.add_argument(
        "--storage",
        help="postgresql://... | mysql://... | sqlite:///x.db (RDB with heartbeats: several machines), "
        "or a journal file (default: DIR/study.journal, one machine)",
    )
    parser.add_argument("--study-name", help="study name in the storage (default: q2g-sweep)")
    parser.add_argument("--heartbeat-interval", type=int, help="RDB storage: seconds between heartbeats (60)")
    parser.add_argument("--grace-period", type=int, help="RDB storage: seconds without one before a retry (180)")
    args = parser.parse_args(argv)
    allocator_defaults()  # expandable segments for the trials' training, unless set
    previous = stop_on_sigterm()
    try:
        result = run_sweep(
            run.resolve_config(args.config),
            args.out,  # --out "" is refused (run.run_out), not ignored
            n_trials=args.n_trials,
            storage=args.storage,
            study_name=args.study_name,
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed := unresolved(result):
        print(
            f"error: {len(failed)} trial(s) failed: "
            + "; ".join(f"{f['trial']} ({f['failed']})" for f in failed)
            + "; rerun the same command to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0
