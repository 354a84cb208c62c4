"""Stage 2's resolved settings: what was asked and what the run decided from it, in one typed object.

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

from q2g.config import result_keys
from q2g.evaluation.config import EvalConfig
from q2g.finetune.config import FinetuneConfig


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
