"""Builders shared by the tests (fixtures stay in conftest.py): tiny random models from configs,
a reference stage-1 folder, and a seconds-long finetune command line.

The tokenizers are committed under tests/assets (see make_tokenizers.py); the models are built
from small configs, saved next to a copy of their tokenizer, so every code path that loads
"a model folder" is exercised exactly as with a real checkpoint.
"""

import json
import os
from pathlib import Path

from q2g.data.splits import select_split, write_split

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """../shared/data beside the repo (or $Q2G_SHARED_DATA); None when absent."""
    path = Path(os.environ.get("Q2G_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if (path / "gsm8k" / "test.jsonl").exists() else None


def build_tiny(kind: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model + tokenizer folder: kind is 'qwen2' or 'gemma3'."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ASSETS / f"tiny-{kind}")
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(**common, head_dim=8, sliding_window=64, bos_token_id=tok.bos_token_id)
        )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reference_dataset(out: Path, limit: int, **extra) -> Path:
    """A stage-1 folder as the `reference` teacher writes it: split.json + holdout.jsonl +
    traces.jsonl (the packaged problems' own solutions, all validated; `extra` fields added)."""
    out.mkdir(parents=True, exist_ok=True)
    train, holdout, settings = select_split(data_dir="packaged", limit=limit, seed=0)
    write_split(out, train, holdout, settings)
    rows = [{**r, "qwen_trace": r["reference_solution"], "validated": True, **extra} for r in train]
    (out / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# A seconds-long finetune of a tiny model on a reference dataset (tests override what they need).
TINY_FINETUNE = dict(
    epochs=2,
    batch_size=4,
    grad_accum=1,
    max_seq_len=128,
    warmup_ratio=0,
    lr="1e-3",
    eval_limit=2,
    eval_max_new_tokens=8,
    ppl_max_tokens=128,
    data_dir="packaged",
)


def finetune_argv(model, ds, out, *extra, **settings) -> list[str]:
    """`q2g finetune` flags: the model, the traces folder, --out, TINY_FINETUNE updated by
    `settings` (underscored names), then `extra` as given."""
    flags = {"base_model": model, "traces": ds, "out": out, **TINY_FINETUNE, **settings}
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))] + list(extra)


def tiny_training_args(out, steps: int):
    """TrainingArguments for a few CPU steps of a hand-built Trainer (guard and callback tests)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        optim="adamw_torch",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        label_names=["labels"],
    )
