"""A sweep trial that runs out of GPU memory, then one that fits, in the same process (issue 27).

    python benchmarks/oom_recovery.py --device cuda --random-shape gemma-7b --tokenizer .dev/gemma-tok \
        --oom-batch 16 --batch-size 8 --seq-len 1024 --json out.json
    python benchmarks/oom_recovery.py --random-shape tiny --simulate-oom --json out.json   # CPU rehearsal

Trial 1 trains q2g's LoRA (benchmarks/train_vs_trl.py's q2g path) at --oom-batch without gradient
checkpointing, a shape q2g's plan says does not fit; trial 2 at --batch-size with checkpointing.
Each trial builds its own model, as a sweep's trials do. A failed trial is handled the way
q2g.sweep.trials.run_trial handles it: the exception is caught (Exception, not only OOM), its
frames let go, then q2g.memory.free_accelerator_memory() (gc + torch.cuda.empty_cache). The JSON
says what trial 1 raised, the reserved memory after the free, and trial 2's steps, loss and peak.
--simulate-oom (CPU rehearsal only: a CPU never runs out this way) raises torch.OutOfMemoryError
from trial 1's first step instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def trial(args, batch: int, ckpt: bool, simulate_oom: bool = False) -> dict:
    import torch
    from train_vs_trl import q2g_trainer, random_model
    from transformers import TrainerCallback

    targs = argparse.Namespace(
        **{**vars(args), "batch_size": batch, "gradient_checkpointing": "on" if ckpt else "off"}
    )
    targs.n_examples = batch * targs.grad_accum * (targs.warmup + targs.steps)
    model, tok, bf16, _ = random_model(targs)
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = q2g_trainer(targs, model, tok, bf16, out)

        class Oom(TrainerCallback):
            def on_step_begin(self, *a, **kw):
                raise torch.OutOfMemoryError("simulated (CPU rehearsal): CUDA out of memory")

        if simulate_oom:
            trainer.add_callback(Oom())
        start = time.perf_counter()
        trainer.train()
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    return {
        "batch": batch,
        "gradient_checkpointing": ckpt,
        "steps": trainer.state.global_step,
        "seconds": time.perf_counter() - start,
        "train_loss": losses[-1] if losses else None,
    }


def memory(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {
        "reserved_mib": torch.cuda.memory_reserved() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-shape", default="tiny", choices=["gemma-7b", "gemma-2b", "tiny"])
    p.add_argument("--tokenizer", help="tokenizer folder (default: the tiny test one)")
    p.add_argument("--oom-batch", type=int, default=16, help="trial 1's batch (no checkpointing)")
    p.add_argument("--batch-size", type=int, default=8, help="trial 2's batch (checkpointing on)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--simulate-oom", action="store_true", help="CPU rehearsal: trial 1 raises OutOfMemoryError")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    args.warmup, args.packing, args.fused, args.model = 0, False, "auto", None
    import torch

    from q2g.memory import free_accelerator_memory

    res: dict = {"device": args.device}
    try:
        res["trial_1"] = {**trial(args, args.oom_batch, False, args.simulate_oom), "failed": None}
    except Exception as e:  # as q2g.sweep.trials.run_trial: this trial fails, the sweep goes on
        res["trial_1"] = {
            "batch": args.oom_batch,
            "failed": f"{type(e).__name__}: {str(e)[:200]}",
            "out_of_memory": isinstance(e, torch.OutOfMemoryError),
            **memory(args.device),
        }
    free_accelerator_memory()  # after the except block: the exception's frames (the model) are gone
    res["after_free"] = memory(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t2 = trial(args, args.batch_size, True)
    res["trial_2"] = {
        **t2,
        **memory(args.device),
        "finite": t2["train_loss"] is not None and math.isfinite(t2["train_loss"]),
    }
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
