"""The LoRA model and the Trainer, each built in one function (the hooks for other losses go here).

    peft_model = build_lora_model(model, cfg, lora_r=16, lora_alpha=32, gradient_checkpointing=False)
    trainer = make_trainer(run, peft_model, targs, callback, guard)

`lora_config` is the one place peft's `r` appears: everywhere else the rank is `lora_r`.
`make_trainer` builds the loss path the settings name (settings.loss_path): the label-only
chunked or fused loss (q2g.loss.LabelOnlyLossTrainer) with one process, the Trainer's own with
several. `training_arguments` merges q2g's options with the user's `trainer:` fields.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from q2g.distributed import DEFAULT_TIMEOUT_S
from q2g.errors import ConfigError
from q2g.finetune import lora_variants
from q2g.finetune.distill_data import DistillCollator
from q2g.finetune.sft_data import Collator
from q2g.loss import LabelOnlyLossTrainer


def lora_targets(target_modules: list[str]):
    """peft's `target_modules`: a list of names, or the string 'all-linear' (every linear layer)."""
    return "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)


def lora_config(cfg, lora_r: int, lora_alpha: float):
    """The peft LoraConfig of a run at rank `lora_r` (a retrain under reduce-rank passes a smaller one)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg.target_modules),
        **lora_variants.lora_kwargs(cfg),  # rsLoRA, DoRA, the init (PiSSA, OLoRA, ...)
    )


def build_lora_model(model, cfg, lora_r: int, lora_alpha: float, gradient_checkpointing: bool = False):
    """Wrap the base model with a LoRA adapter; only the adapter is trainable (and kept in fp32).
    `gradient_checkpointing` is the decided value (settings.gradient_checkpointing_used)."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft reads a property transformers 5 renamed; harmless, and noisy
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return lora_variants.keep_initial(get_peft_model(model, lora_config(cfg, lora_r, lora_alpha)))


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
    the mid-epoch forgetting probe, q2g.finetune.probe)."""
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
    if path == "plain":  # a model whose forward cannot keep only the last logits (q2g.loss)
        return Trainer(**kw)
    if cfg.distill == "on-policy":  # the student samples, the teacher scores (q2g.finetune.onpolicy)
        from q2g.finetune import onpolicy

        return onpolicy.make_trainer(run, kw, guard)
    fused = "liger" if path == "liger" else "never"
    return LabelOnlyLossTrainer(
        **kw,
        loss_chunk_size=run.settings.asked.loss_chunk_size,
        fused=fused,
        nonfinite_guard=guard,
        kl_to_base=cfg.kl_to_base,
        distill_weight=cfg.distill_weight if cfg.distill == "chunk-likelihood" else 0.0,
    )


def collator(run):
    """sft_data.Collator, with the chunks of --distill when it is on (q2g.finetune.distill_data)."""
    base, mode = Collator(run.tokenizer.pad_token_id), run.settings.asked.distill
    if mode == "on-policy":
        from q2g.finetune.onpolicy_data import OnPolicyCollator

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
