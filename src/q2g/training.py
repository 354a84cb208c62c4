"""The training half of stage 2: the LoRA model, the Trainer, and the per-epoch evaluation callback.

`finetune.py` prepares a `Run` (config, tokenizer, examples, eval inputs) and calls
`baseline(run)` then `train_all(run, model)`; this module does the rest. After every epoch the
callback saves `epoch-N/`, evaluates the in-memory model (evaluate.evaluate_model), writes the
metrics row and applies the forgetting policy (forgetting.py). Rows already in metrics.jsonl
are kept on resume, so a killed run never evaluates an epoch twice.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from q2g import evaluate as q2g_eval
from q2g import forgetting
from q2g.finetune import kl_anchor, lora_variants, probe

ADAPTER_CONFIG_NAME = "q2g_config.json"


@dataclass
class Run:
    """Everything the stage shares between the baseline, the callback and the retrains."""

    cfg: object  # finetune.FinetuneConfig
    eval_cfg: q2g_eval.EvalConfig
    out: Path
    tokenizer: object
    examples: list
    config: dict  # the resolved settings written to config.json
    precision: object  # models.Precision
    records: list | None = None  # the fixed holdout subset (None: --no-eval)
    wikitext: str | None = None
    rows: list = field(default_factory=list)  # metrics.jsonl, in order

    def baseline_ppl(self) -> float | None:
        base = next((r for r in self.rows if r["epoch"] == 0), None)
        return base and base.get("token_perplexity")

    def find(self, rank, epoch) -> dict | None:
        return next((r for r in self.rows if r["lora_rank"] == rank and r["epoch"] == epoch), None)


# ---------------------------------------------------------------- model and trainer


def lora_targets(target_modules: list[str]):
    """peft's `target_modules`: a list of names, or the string 'all-linear' (every linear layer)."""
    return "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)


def build_lora_model(model, rank: int, alpha: float, cfg):
    """Wrap the base model with a LoRA adapter; only the adapter is trainable (and kept in fp32)."""
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg.target_modules),
        **lora_variants.lora_kwargs(cfg),
    )
    with warnings.catch_warnings():  # peft reads a property transformers 5 renamed; harmless, and noisy
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return lora_variants.keep_initial(get_peft_model(model, config))


def training_arguments(cfg, run_dir: Path, amp, optim: str, steps_per_epoch: int, device: str):
    """TrainingArguments from q2g's options, the user's `trainer:` fields and q2g's fixed ones.
    An unknown field or a value TrainingArguments refuses is a ConfigError naming it."""
    from transformers import TrainingArguments

    from q2g.errors import ConfigError

    defaults = dict(
        save_total_limit=1,  # epoch-N/ keeps every adapter; checkpoint-* is for --resume
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 10),
        logging_first_step=True,
        dataloader_pin_memory=device != "cpu",
    )
    # What q2g's own options decide, and what its machinery needs as it is (resume by epoch, masked
    # labels, token counts, NaN losses seen): these win over a `trainer:` entry of the same name.
    ours = dict(
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # v5: a float in [0, 1) is a ratio of all steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        optim=optim,
        seed=cfg.seed,
        bf16=amp == "bf16",
        fp16=amp == "fp16",
        use_cpu=device == "cpu",
        report_to=[r for r in cfg.report_to if r != "none"] or "none",
        output_dir=str(run_dir),
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        save_strategy="epoch",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_nan_inf_filter=False,
    )  # a NaN loss must be seen, not averaged away
    user = dict(cfg.trainer or {})
    taken = sorted(set(user) & set(ours))
    if taken:
        print(
            f"[finetune] note: trainer field(s) {', '.join(taken)} are set by q2g's own options "
            f"(see `q2g finetune --help`); the trainer: values are ignored",
            flush=True,
        )
    try:
        return TrainingArguments(**{**defaults, **user, **ours})
    except TypeError as e:  # an unknown field
        name = str(e).split("'")[1] if "'" in str(e) else str(e)
        raise ConfigError(f"trainer: {name!r} is not a TrainingArguments field (--trainer-arg / trainer:)") from None
    except ValueError as e:
        raise ConfigError(f"trainer: TrainingArguments refused the settings: {e}") from None


def tracker_scalars(row: dict) -> dict:
    """The evaluation fields of a metrics row, as scalars for TensorBoard / W&B / MLflow / Trackio
    (the `eval_` prefix is what the Trainer integrations file under eval/)."""
    keys = (
        "pass@1",
        "token_perplexity",
        "word_perplexity",
        "bits_per_byte",
        "ppl_change",
        "heldout_loss",
        "answer_format_rate",
    )
    out = {f"eval_{k}": float(row[k]) for k in keys if isinstance(row.get(k), (int, float))}
    out.update({f"eval_pass@1/{k}": float(v) for k, v in (row.get("pass@1_by_source") or {}).items()})
    if row.get("pass@1") is not None:
        out["eval_over_budget"] = float(bool(row.get("flagged")))
    return out


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete `checkpoint-<step>`: trainer_state.json is written last, and must parse
    (the Trainer writes it in place, so a kill or a full disk can leave it empty or cut)."""

    def complete(p: Path) -> bool:
        try:
            return p.name[11:].isdigit() and isinstance(json.loads((p / "trainer_state.json").read_text()), dict)
        except (OSError, ValueError):
            return False

    done = [p for p in run_dir.glob("checkpoint-*") if complete(p)]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def save_adapter(model, tokenizer, folder: Path, config: dict) -> None:
    """Adapter + tokenizer + q2g_config.json, written beside and renamed: never a half folder."""
    from q2g.io import atomic_write_json

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **lora_variants.save_kwargs(model))
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / ADAPTER_CONFIG_NAME, config)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# ---------------------------------------------------------------- evaluation rows


def evaluate(run: Run, model, gen_path: Path, adapter_dir: Path | None = None) -> dict:
    """pass@1 + perplexity of the in-memory model -> the evaluation fields of a metrics row."""
    from q2g.io import write_jsonl

    if run.records is None:
        return {"pass@1": None, "token_perplexity": None, "ppl_change": None, "flagged": False}
    result = q2g_eval.evaluate_model(
        model, run.tokenizer, run.records, run.wikitext, run.eval_cfg, precision=run.precision, adapter_dir=adapter_dir
    )
    write_jsonl(gen_path, result["math"]["generations"])
    row = result["row"]
    change = forgetting.relative_change(run.baseline_ppl() or row["token_perplexity"], row["token_perplexity"])
    return {
        **row,
        "ppl_change": change,
        "flagged": forgetting.over_budget(change, run.cfg.forgetting_budget),
        "generations": str(gen_path.relative_to(run.out)),
    }


def describe(row: dict, budget: float) -> str:
    if row.get("pass@1") is None:
        return "not evaluated (--no-eval)"
    by = ", ".join(f"{k} {v:.1%}" for k, v in row["pass@1_by_source"].items())
    extra = "".join(
        f" | {label} {row[k]:{fmt}}"
        for k, label, fmt in (("heldout_loss", "held-out loss", ".4f"), ("answer_format_rate", "answer format", ".0%"))
        if row.get(k) is not None
    )
    return (
        f"pass@1 {row['pass@1']:.1%} ({by}){extra} | WikiText ppl {row['token_perplexity']:.3f}: "
        f"{forgetting.verdict(row['ppl_change'], budget)} | eval {row['eval_s']:.0f} s "
        f"({row['eval_problems_per_s']:.2f} problems/s, {row['eval_ppl_tokens_per_s']:.0f} ppl tok/s)"
    )


def record(run: Run, row: dict) -> None:
    """Append a metrics row (the file is written by the main process only)."""
    from q2g import distributed
    from q2g.io import append_jsonl

    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    if distributed.is_main():
        append_jsonl(run.out / "metrics.jsonl", [row])
    run.rows.append(row)


def epoch_row(run: Run, state, model, rank: int, alpha: float, run_dir: Path, since: tuple) -> dict:
    """Save epoch-N/, evaluate it and return its metrics row (`since`: (t0, tokens0, step0) of the epoch)."""
    t0, tokens0, step0 = since
    train_s, epoch = time.time() - t0, math.ceil(state.epoch - 1e-6)
    name = f"epoch-{epoch}"
    save_adapter(
        model,
        run.tokenizer,
        run_dir / name,
        {**run.config, "lora_r": rank, "lora_alpha": alpha, "epoch": epoch, "step": state.global_step},
    )
    if run.records is not None:
        print(f"[finetune] epoch {epoch} (rank {rank}): evaluating...", flush=True)
    losses = [h["loss"] for h in state.log_history if "loss" in h and h["step"] > step0]
    tokens = state.num_input_tokens_seen - tokens0
    return {
        "epoch": epoch,
        "step": state.global_step,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "adapter": str((run_dir / name).relative_to(run.out)),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / max(train_s, 1e-9),
        "train_s": train_s,
        **evaluate(run, model, run_dir / "evals" / f"{name}.generations.jsonl", run_dir / name),
    }


def last_adapter(run: Run, rank: int) -> str | None:
    """The newest saved epoch-N/ of this rank (what a NaN stop points the user to)."""
    rows = [r for r in run.rows if r["lora_rank"] == rank and r.get("adapter")]
    return str(run.out / rows[-1]["adapter"]) if rows else None


def make_callback(run: Run, rank: int, alpha: float, run_dir: Path, guard=None):
    from transformers import TrainerCallback

    from q2g import distributed

    class EpochEval(TrainerCallback):
        """After every epoch: save epoch-N/, evaluate, write the metrics row, apply the policy.
        With several processes the main one does this and broadcasts the row."""

        trainer = None  # set by train_run: rows are logged to the trackers through it

        def log(self, row: dict) -> None:
            if self.trainer is not None and (scalars := tracker_scalars(row)):
                self.trainer.log(scalars)

        def on_train_begin(self, args, state, control, **kw):
            base = run.find(None, 0)
            if base is not None and state.global_step == 0 and rank == run.cfg.lora_r:
                self.log(base)  # the baseline, at step 0

        def on_epoch_begin(self, args, state, control, **kw):
            self.since = (time.time(), state.num_input_tokens_seen, state.global_step)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = math.ceil(state.epoch - 1e-6)
            row = run.find(rank, epoch)
            if row is not None:  # evaluated before a kill that came before this epoch's checkpoint
                print(f"[finetune] epoch {epoch} (rank {rank}): kept the row already in metrics.jsonl", flush=True)
            else:
                row = epoch_row(run, state, model, rank, alpha, run_dir, self.since) if distributed.is_main() else None
                row = distributed.share(row)
                if guard is not None:
                    row = {**row, **guard.metrics()}
                    guard.last_good_adapter = str(run.out / row["adapter"])
                record(run, row)
                self.log(row)
            loss = f"loss {row['train_loss']:.4f}, " if row.get("train_loss") is not None else ""
            print(
                f"[finetune] epoch {epoch} (rank {rank}): {loss}{row['train_tokens_per_s']:.0f} train tok/s | "
                f"{describe(row, run.cfg.forgetting_budget)}",
                flush=True,
            )
            if row["flagged"] and run.cfg.on_forgetting != "flag":
                print(
                    f"[finetune] forgetting budget exceeded: --on-forgetting {run.cfg.on_forgetting} ends this run",
                    flush=True,
                )
                control.should_training_stop = True
            return control

    return EpochEval()


# ---------------------------------------------------------------- runs


def load_base(run: Run):
    from q2g.models import load_model

    return load_model(run.cfg.base_model, run.precision.dtype, run.config["device"])


def baseline_row(run: Run, model) -> dict:
    return {
        "epoch": 0,
        "step": 0,
        "lora_rank": None,
        "lora_alpha": None,
        "adapter": None,
        "train_loss": None,
        "train_tokens": 0,
        "train_tokens_per_s": None,
        "train_s": 0.0,
        **evaluate(run, model, run.out / "evals" / "epoch-0.generations.jsonl"),
    }


def baseline(run: Run):
    """Evaluate the base model once (epoch 0, on the main process); returns the loaded model, or
    None if not needed (each training run then loads its own)."""
    from q2g import distributed

    if run.find(None, 0) is not None:
        print("[finetune] baseline: already in metrics.jsonl", flush=True)
        return None
    if run.records is None:
        return None
    model = row = None
    if distributed.is_main():
        model = load_base(run)
        n = len(q2g_eval.select_eval_subset(run.records, run.eval_cfg.eval_limit))
        print(f"[finetune] baseline eval of {run.cfg.base_model}: {n} holdout problems + WikiText...", flush=True)
        row = baseline_row(run, model)
    record(run, distributed.share(row))
    print(f"[finetune] baseline: {describe(run.rows[-1], run.cfg.forgetting_budget)}", flush=True)
    return model


def train_run(run: Run, model, rank: int, alpha: float, run_dir: Path) -> dict:
    """One LoRA training run at `rank` into `run_dir` (resumed from its checkpoint with --resume)."""
    from transformers import Trainer, set_seed

    from q2g import distributed
    from q2g.guards import NonFiniteGuard
    from q2g.io import atomic_write_json
    from q2g.loss import LabelOnlyLossTrainer
    from q2g.sft_data import Collator

    cfg = run.cfg
    done_file = run_dir / "train_done.json"
    if done_file.exists():
        print(f"[finetune] rank {rank}: trained already ({done_file})", flush=True)
        return json.loads(done_file.read_text())
    stopped = cfg.on_forgetting != "flag" and any(r["flagged"] for r in run.rows if r["lora_rank"] == rank)
    if not stopped:  # (a stopped run killed before writing train_done.json must not train on)
        kl_anchor.check_processes(cfg.kl_to_base, distributed.num_processes())
        set_seed(cfg.seed)  # the same LoRA init for a resumed or repeated run
        peft_model = build_lora_model(model if model is not None else load_base(run), rank, alpha, cfg)
        n_batches = math.ceil(len(run.examples) / cfg.batch_size)
        targs = training_arguments(
            cfg,
            run_dir,
            run.precision.autocast,
            run.config["optim_used"],
            math.ceil(n_batches / cfg.grad_accum),
            run.config["device"],
        )
        guard = NonFiniteGuard(
            skip=cfg.skip_nonfinite, max_consecutive=cfg.max_nonfinite_skips, last_good_adapter=last_adapter(run, rank)
        )
        callback = make_callback(run, rank, alpha, run_dir, guard)
        kw = dict(
            model=peft_model,
            args=targs,
            train_dataset=run.examples,
            callbacks=[callback, guard, *probe.callbacks(run, rank)],
            data_collator=Collator(run.tokenizer.pad_token_id),
            processing_class=run.tokenizer,
        )
        # The label-only chunked loss calls the decoder past the DDP wrapper, so several processes
        # use the Trainer's own loss (and its full logits).
        trainer = (
            LabelOnlyLossTrainer(
                **kw, loss_chunk_size=cfg.loss_chunk_size, nonfinite_guard=guard, kl_to_base=cfg.kl_to_base
            )
            if distributed.num_processes() == 1
            else Trainer(**kw)
        )
        callback.trainer = trainer
        resume = latest_checkpoint(run_dir) if cfg.resume else None
        if resume:
            print(f"[finetune] resuming rank {rank} from {resume}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        del trainer, peft_model
    rows = [r for r in run.rows if r["lora_rank"] == rank]
    result = {
        "rank": rank,
        "alpha": alpha,
        "epochs": [r["epoch"] for r in rows],
        "over_budget": any(r["flagged"] for r in rows),
    }
    if distributed.is_main():
        atomic_write_json(done_file, result)
    distributed.wait()
    return result


def train_all(run: Run, model) -> None:
    """The first run, then (reduce-rank) retrains at half the rank while over budget. `model` is
    the base model if the baseline loaded it, else None (each run loads its own)."""
    cfg, rank, alpha = run.cfg, run.cfg.lora_r, run.cfg.lora_alpha
    while True:
        run_dir = run.out if rank == cfg.lora_r else run.out / f"rank-{rank}"
        print(f"[finetune] training rank {rank} (alpha {alpha:g}) -> {run_dir}", flush=True)
        result = train_run(run, model, rank, alpha, run_dir)
        model = None
        gc.collect()
        if cfg.on_forgetting != "reduce-rank" or not result["over_budget"]:
            return
        new_rank = forgetting.next_rank(rank, cfg.min_rank)
        if new_rank is None:
            print(
                f"[finetune] rank {rank} is over budget and {rank // 2} < --min-rank {cfg.min_rank}: no retrain left",
                flush=True,
            )
            return
        print(f"[finetune] rank {rank} forgot too much: retraining from scratch at rank {new_rank}", flush=True)
        alpha, rank = forgetting.scaled_alpha(alpha, rank, new_rank), new_rank
