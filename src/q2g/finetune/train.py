"""The LoRA model and the Trainer, each built in one function (the hooks for other losses go here).

    peft_model = build_lora_model(model, cfg, gradient_checkpointing=False)   # at cfg.lora_r, cfg.lora_alpha
    trainer = make_trainer(run, peft_model, targs, callback, guard)

`lora_config` is the one place peft's `r` appears: everywhere else the rank is `lora_r`.
`make_trainer` builds the loss path the settings name (settings.loss_path): the label-only
chunked or fused loss (q2g.finetune.loss.LabelOnlyLossTrainer) with one process, the Trainer's own with
several. `training_arguments` merges q2g's options with the user's `trainer:` fields.

The training runs of stage 2: the first at --lora-r, then (reduce-rank) retrains at half the rank.

    train_all(run, base_model_or_None)

Each run trains into its folder (the run's --out, or rank-<r>/ for a retrain), resumes from its
checkpoint under --resume, and is marked done by train_done.json. The per-epoch work is the
callback's (epochs.py); the model and the Trainer are built above.
"""

from __future__ import annotations

import gc
import json
import math
import warnings
from pathlib import Path

from q2g import distributed, forgetting, models
from q2g.distributed import DEFAULT_TIMEOUT_S
from q2g.errors import ConfigError
from q2g.examples import Collator
from q2g.finetune import kl_anchor
from q2g.finetune.baseline import load_base
from q2g.finetune.distill.data import DistillCollator
from q2g.finetune.epochs import last_adapter, make_callback, probe_callbacks
from q2g.finetune.lora import keep_initial, load_init_adapter, lora_kwargs
from q2g.finetune.loss import LabelOnlyLossTrainer
from q2g.guards import NonFiniteGuard
from q2g.io import atomic_write_json


def lora_targets(target_modules: list[str]):
    """peft's `target_modules`: a list of names, or the string 'all-linear' (every linear layer)."""
    return "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)


def lora_config(cfg, exclude: str | None = None):
    """The peft LoraConfig of a run at rank `cfg.lora_r` (a retrain under reduce-rank passes a cfg
    whose lora_r and lora_alpha are the retrain's: the rank comes in one place); `exclude`: modules
    left without an adapter (models.lora_exclude: a multimodal model's vision tower)."""
    from peft import LoraConfig

    return LoraConfig(
        **({"exclude_modules": exclude} if exclude else {}),
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg.target_modules),
        **lora_kwargs(cfg),  # rsLoRA, DoRA, the init (PiSSA, OLoRA, ...)
    )


def build_lora_model(model, cfg, gradient_checkpointing: bool = False):
    """Wrap the base model with a LoRA adapter at cfg.lora_r; only the adapter is trainable (and kept in fp32).
    `gradient_checkpointing` is the decided value (settings.gradient_checkpointing_used)."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft reads a property transformers 5 renamed; harmless, and noisy
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return keep_initial(get_peft_model(model, lora_config(cfg, models.lora_exclude(model))))


def training_arguments(cfg, run_dir: Path, amp, optim: str, steps_per_epoch: int, device: str):
    """TrainingArguments from q2g's options, the user's `trainer:` fields and q2g's fixed ones.
    An unknown field or a value TrainingArguments refuses is a ConfigError naming it."""
    from transformers import TrainingArguments

    defaults = dict(
        save_total_limit=1,  # epoch-N/ keeps every adapter; checkpoint-* is for --resume
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 10),
        logging_first_step=True,
        dataloader_pin_memory=device != "cpu",
        ddp_timeout=DEFAULT_TIMEOUT_S,  # the process group is made with it (q2g.distributed.init)
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
    check_trainer_types(user)
    taken = sorted(set(user) & set(ours))
    if taken:
        print(
            f"[finetune] note: trainer field(s) {', '.join(taken)} are set by q2g's own options "
            f"(see `q2g finetune --help`); the trainer: values are ignored",
            flush=True,
        )
    try:
        return TrainingArguments(**{**defaults, **user, **ours})
    except TypeError as e:  # an unknown field, or a value of the wrong type deep inside
        name = str(e).split("'")[1] if "'" in str(e) else str(e)
        if not any(name == k for k in user):
            raise ConfigError(f"trainer: TrainingArguments refused the settings: {e}") from None
        raise ConfigError(f"trainer: {name!r} is not a TrainingArguments field (--trainer-arg / trainer:)") from None
    except (ValueError, AttributeError, KeyError) as e:
        raise ConfigError(f"trainer: TrainingArguments refused the settings: {type(e).__name__}: {e}") from None


def value_fits(value, hint: str) -> bool:
    """Whether `value` (read from YAML) fits a TrainingArguments annotation such as 'float | None'."""
    kinds = set(hint.replace("<class '", "").replace("'>", "").replace(" ", "").split("|"))
    if not kinds & {"float", "int", "bool", "str"} or value is None:
        return True  # a type this check does not know: TrainingArguments itself decides
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds or any("." in k for k in kinds)  # an enum such as OptimizerNames takes its name
    return any(k.startswith(("list", "dict")) for k in kinds)


def check_trainer_types(user: dict) -> None:
    """Refuse a `trainer:` value whose type is not its TrainingArguments field's (a string where a
    number goes would otherwise pass here and crash at the first optimizer step)."""
    import dataclasses

    from transformers import TrainingArguments

    hints = {f.name: str(f.type) for f in dataclasses.fields(TrainingArguments)}
    for key, value in user.items():
        if key in hints and not value_fits(value, hints[key]):
            want = hints[key].replace("<class '", "").replace("'>", "")
            raise ConfigError(f"trainer: {key}: must be {want}, got {value!r} (--trainer-arg / trainer:)")


def make_trainer(run, peft_model, targs, callback, guard, extra_callbacks=()):
    """The Trainer of `run.settings.loss_path`, holding each q2g callback once (`extra_callbacks`:
    the mid-epoch forgetting probe, q2g.finetune.epochs)."""
    from transformers import Trainer

    kw = dict(
        model=peft_model,
        args=targs,
        train_dataset=run.examples,
        callbacks=[callback, guard, *extra_callbacks],
        data_collator=collator(run),
        processing_class=run.tokenizer,
    )
    path, cfg = run.settings.loss_path, run.settings.asked
    if path == "plain" and cfg.distill != "none":
        raise ConfigError(
            f"--distill {cfg.distill} needs the label-only loss; this model's forward has no logits_to_keep"
        )
    if path == "plain":  # a model whose forward cannot keep only the last logits (q2g.finetune.loss)
        return Trainer(**kw)
    if cfg.distill == "on-policy":  # the student samples, the teacher scores (q2g.finetune.distill.onpolicy)
        from q2g.finetune.distill import onpolicy

        return onpolicy.make_trainer(run, kw, guard)
    # "auto", not "liger": a Liger that fails at its first call (a Triton that cannot compile) then
    # falls back to the chunked loss with a warning (finetune.loss) instead of ending the run
    fused = "auto" if path == "liger" else "never"
    return LabelOnlyLossTrainer(
        **kw,
        loss_chunk_size=run.settings.asked.loss_chunk_size,
        fused=fused,
        nonfinite_guard=guard,
        kl_to_base=cfg.kl_to_base,
        distill_weight=cfg.distill_weight if cfg.distill == "chunk-likelihood" else 0.0,
    )


def collator(run):
    """examples.Collator, with the chunks of --distill chunk-likelihood or the problems of on-policy."""
    base, mode = Collator(run.tokenizer.pad_token_id), run.settings.asked.distill
    if mode == "on-policy":
        from q2g.finetune.distill.onpolicy_data import OnPolicyCollator

        return OnPolicyCollator(base)
    return DistillCollator(base) if mode == "chunk-likelihood" else base


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
        peft_model = build_lora_model(
            base, cfg.replace(lora_r=lora_r, lora_alpha=lora_alpha), s.gradient_checkpointing_used
        )
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
        trainer = make_trainer(run, peft_model, targs, callback, guard, probe_callbacks(run, lora_r))
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
