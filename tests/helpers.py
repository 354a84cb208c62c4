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
from q2g.examples import IGNORE_INDEX

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


# Test-only batching tools (moved out of q2g.batching, issue 25; the benchmark train_vs_trl.py uses
# PackedCollator too). Padding-free packing (`PackedCollator`): a batch's examples are concatenated into one row with
# per-example position_ids; with no attention mask, transformers 5 reads the position resets as
# sequence boundaries and masks attention across examples (sdpa/eager: a block-diagonal mask;
# flash-attention: cu_seqlens), so no example sees another and no token is padding.


def sliding_windows(config) -> list[int]:
    """The window of every sliding-attention layer of a model config (Gemma 2/3, Qwen2 with SWA...)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if not window or (getattr(config, "use_sliding_window", True) is False):
        return []
    return [window for t in types if t == "sliding_attention"]


def fully_masked_rows(attention_mask, window: int) -> int:
    """Query rows of a right-padded batch that see no key in a sliding layer of this window:
    per row, the positions q >= L + window - 1 (L = real tokens)."""
    width = attention_mask.shape[1]
    return sum(max(0, width - (int(n) + window - 1)) for n in attention_mask.sum(1).tolist())


class PackedCollator:
    """The batch's examples as one row: input_ids, labels and position_ids of shape [1, total].

    The first label of every example is -100: the token before it belongs to another example,
    so nothing is trained across a boundary (the shifted loss drops position 0 of a padded row
    the same way; the count of trained tokens is the same as with padding).
    """

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        ids, labels, positions = [], [], []
        for b in batch:
            ids += b["input_ids"]
            labels += [IGNORE_INDEX] + list(b["labels"][1:])
            positions += range(len(b["input_ids"]))
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }


def prefix_sums(spans, lps) -> dict:
    """{byte end of each token: the sum of the log-probs up to it} (a scored text's running total)."""
    out, total = {}, 0.0
    for (_, end), lp in zip(spans, lps):
        total += lp
        out[end] = total
    return out
