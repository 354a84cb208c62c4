"""The training runs of stage 2: the first at --lora-r, then (reduce-rank) retrains at half the rank.

    train_all(run, base_model_or_None)

Each run trains into its folder (the run's --out, or rank-<r>/ for a retrain), resumes from its
checkpoint under --resume, and is marked done by train_done.json. The per-epoch work is the
callback's (epochs.py); the model and the Trainer are built by trainer.py.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

from q2g import distributed, forgetting
from q2g.finetune import kl_anchor, probe
from q2g.finetune.baseline import load_base
from q2g.finetune.epochs import last_adapter, make_callback
from q2g.finetune.init_adapter import load_init_adapter
from q2g.finetune.trainer import build_lora_model, latest_checkpoint, make_trainer, training_arguments
from q2g.guards import NonFiniteGuard
from q2g.io import atomic_write_json


def train_run(run, model, lora_r: int, lora_alpha: float, run_dir: Path) -> dict:
    """One LoRA training run at rank `lora_r` into `run_dir` (resumed from its checkpoint with --resume)."""
    from transformers import set_seed

    s, cfg = run.settings, run.settings.asked
    done_file = run_dir / "train_done.json"
    if done_file.exists():
        print(f"[finetune] rank {lora_r}: trained already ({done_file})", flush=True)
        return json.loads(done_file.read_text())
    stopped = cfg.on_forgetting != "flag" and any(r["flagged"] for r in run.rows if r.get("lora_r") == lora_r)
    if not stopped:  # (a stopped run killed before writing train_done.json must not train on)
        kl_anchor.check_processes(cfg.kl_to_base, distributed.num_processes())
        kl_anchor.check_processes(cfg.distill != "none", distributed.num_processes(), "--distill")
        set_seed(cfg.seed)  # the same LoRA init for a resumed or repeated run
        base = model if model is not None else load_base(run)
        peft_model = build_lora_model(base, cfg, lora_r, lora_alpha, s.gradient_checkpointing_used)
        if cfg.init_adapter:  # e.g. an SFT run's final/, before on-policy distillation
            load_init_adapter(peft_model, cfg.init_adapter)
        n_batches = math.ceil(len(run.examples) / cfg.batch_size)
        steps = math.ceil(n_batches / cfg.grad_accum)
        targs = training_arguments(cfg, run_dir, run.precision.autocast, s.optim_used, steps, s.device)
        guard = NonFiniteGuard(
            skip=cfg.skip_nonfinite,
            max_consecutive=cfg.max_nonfinite_skips,
            last_good_adapter=last_adapter(run, lora_r),
        )
        callback = make_callback(run, lora_r, lora_alpha, run_dir, guard)
        trainer = make_trainer(run, peft_model, targs, callback, guard, probe.callbacks(run, lora_r))
        callback.trainer = trainer
        resume = latest_checkpoint(run_dir) if cfg.resume else None
        if resume:
            print(f"[finetune] resuming rank {lora_r} from {resume}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        del trainer, peft_model
    rows = [r for r in run.rows if r.get("lora_r") == lora_r]
    result = {
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "epochs": [r["epoch"] for r in rows],
        "over_budget": any(r["flagged"] for r in rows),
    }
    if distributed.is_main():
        atomic_write_json(done_file, result)
    distributed.wait()
    return result


def train_all(run, model) -> None:
    """The first run, then (reduce-rank) retrains at half the rank while over budget. `model` is
    the base model if the baseline loaded it, else None (each run loads its own)."""
    cfg = run.settings.asked
    lora_r, alpha = cfg.lora_r, cfg.lora_alpha
    while True:
        run_dir = run.out if lora_r == cfg.lora_r else run.out / f"rank-{lora_r}"
        print(f"[finetune] training rank {lora_r} (alpha {alpha:g}) -> {run_dir}", flush=True)
        result = train_run(run, model, lora_r, alpha, run_dir)
        model = None
        gc.collect()
        if cfg.on_forgetting != "reduce-rank" or not result["over_budget"]:
            return
        new_r = forgetting.next_rank(lora_r, cfg.min_rank)
        if new_r is None:
            print(
                f"[finetune] rank {lora_r} is over budget and {lora_r // 2} < --min-rank {cfg.min_rank}: "
                "no retrain left",
                flush=True,
            )
            return
        print(f"[finetune] rank {lora_r} forgot too much: retraining from scratch at rank {new_r}", flush=True)
        alpha, lora_r = forgetting.scaled_alpha(alpha, lora_r, new_r), new_r
