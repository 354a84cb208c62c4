"""Self-rehearsal (`--rehearsal-fraction F`): the base model's own general text, mixed into training.

    q2g finetune ... --rehearsal-fraction 0.1 --rehearsal-max-tokens 128

Before training, the base model writes short continuations from `<bos>` alone (no WikiText
opening, so nothing of the perplexity text is trained on), by seeded sampling (temperature 1,
no top-k/top-p: its own distribution, not its mode). They are stored in q2g's cache ($Q2G_CACHE/
rehearsal/, never in the input dataset's folder) as `rehearsal-<key>.jsonl` + `rehearsal-<key>.json`
(the settings; the key is their hash), so a rerun or a sweep's trials with the same settings reuse
them instead of generating again. This is its own step, after every check has passed. A
fraction F of the training examples are these, trained with the plain LM loss (every token is
labelled), which keeps the student near its own distribution with no outside data.
F = 0 leaves the dataset exactly as it was.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

from q2g.cpu_linears import onednn_linears
from q2g.io import atomic_write_json, atomic_write_text, cache_dir

VERSION = 1  # bump when the way texts are written changes
BATCH = 16


def rehearsal_count(n_traces: int, fraction: float) -> int:
    """Rehearsal examples so that they are `fraction` of all examples (n / (n_traces + n))."""
    return round(fraction * n_traces / (1 - fraction)) if fraction > 0 else 0


def rehearsal_settings(base_model: str, n: int, max_new_tokens: int, seed: int) -> dict:
    return {
        "version": VERSION,
        "base_model": base_model,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompt": "<bos>",
        "sampling": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    }


def store_paths(folder: Path, settings: dict) -> tuple[Path, Path]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"rehearsal-{key}.jsonl", folder / f"rehearsal-{key}.json"


def generate_texts(model, tokenizer, settings: dict) -> list[dict]:
    """`n` sampled continuations of the start token: rows {"input_ids" (start token included), "text"}."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    end = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    device, rows = next(model.parameters()).device, []
    with onednn_linears(model, BATCH):  # CPU fp32: the linear layers through oneDNN where that is faster here
        _sample_batches(model, tokenizer, settings, start, end, device, rows)
    return rows


def _sample_batches(model, tokenizer, settings: dict, start: int, end: set, device, rows: list) -> None:
    import torch

    for i in range(0, settings["n"], BATCH):
        torch.manual_seed(settings["seed"] + i)  # each batch seeded: the texts do not depend on BATCH order
        ids = torch.full((min(BATCH, settings["n"] - i), 1), start, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=settings["max_new_tokens"],
                pad_token_id=tokenizer.pad_token_id,
                **settings["sampling"],
            )
        for seq in out[:, 1:].tolist():
            cut = next((j + 1 for j, t in enumerate(seq) if t in end), len(seq))  # keep the end token
            rows.append(
                {"input_ids": [start, *seq[:cut]], "text": tokenizer.decode(seq[:cut], skip_special_tokens=True)}
            )


def load_or_generate(cfg, tokenizer, folder: Path, n: int, device: str, precision) -> tuple[list[dict], Path]:
    """The stored texts for these settings, or new ones written by the base model (then stored)."""
    from q2g.models import load_model

    settings = rehearsal_settings(cfg.base_model, n, cfg.rehearsal_max_tokens, cfg.seed)
    texts, meta = store_paths(folder, settings)
    if texts.exists() and meta.exists() and json.loads(meta.read_text(encoding="utf-8")) == settings:
        rows = [json.loads(line) for line in texts.read_text(encoding="utf-8").splitlines()]
        if len(rows) == n:
            print(f"[finetune] rehearsal: reusing {n} texts from {texts}", flush=True)
            return rows, texts
    print(
        f"[finetune] rehearsal: the base model writes {n} texts of <= {settings['max_new_tokens']} tokens", flush=True
    )
    model = load_model(cfg.base_model, precision.dtype, device)
    rows = generate_texts(model, tokenizer, settings)
    del model
    gc.collect()
    atomic_write_text(texts, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(meta, settings)  # written last: a text file without it is never reused
    return rows, texts


def rehearsal_examples(rows: list[dict], max_seq_len: int) -> list[dict]:
    """Plain LM examples: every token labelled (position t still predicts t+1, so the start token is not)."""
    return [{"input_ids": r["input_ids"][:max_seq_len], "labels": r["input_ids"][:max_seq_len]} for r in rows]


def add_rehearsal(cfg, tokenizer, examples: list, stats: dict, device: str, precision, folder: Path | None = None):
    """(examples + the rehearsal ones, stats with their counts); unchanged when the fraction is 0.
    The texts are kept in `folder` (default: $Q2G_CACHE/rehearsal), never beside the traces."""
    n = rehearsal_count(len(examples), cfg.rehearsal_fraction)
    if n == 0:
        return examples, stats
    folder = folder or cache_dir() / "rehearsal"
    rows, path = load_or_generate(cfg, tokenizer, folder, n, device, precision)
    extra = rehearsal_examples(rows, cfg.max_seq_len)
    n_tokens = sum(len(e["input_ids"]) for e in extra)
    return examples + extra, {
        **stats,
        "n_train_examples": stats["n_train_examples"] + len(extra),
        "n_train_tokens": stats["n_train_tokens"] + n_tokens,
        "n_rehearsal_examples": len(extra),
        "n_rehearsal_tokens": n_tokens,
        "rehearsal_file": str(path),
    }
