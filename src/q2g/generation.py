"""Batched text generation with a transformers model: the teacher's `hf` backend and the
student's evaluation both call `generate`.

How: prompts (token ids) are sorted by length and cut into batches so each batch pads little;
batches are left-padded (a decoder continues from the last real token), use the KV cache, and stop
per row at any end token or stop string. Results come back in the input order.
Greedy when temperature == 0; otherwise sampling, seeded per batch so a rerun of the same batch
gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    text: str
    n_tokens: int  # generated tokens, up to and including the stop token
    stopped: bool  # ended at an end token / stop string (False: hit max_new_tokens)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def cut_at_stop(text: str, stop_strings) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _trim(row: list[int], end_ids: set[int]) -> tuple[list[int], bool]:
    for i, tok in enumerate(row):
        if tok in end_ids:
            return row[: i + 1], True
    return row, False


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, end_ids=(), stop_strings=(),
             batch_size: int = 8, seed: int = 0, progress=None) -> list[Generation]:
    """Generate a continuation for each prompt. `progress(n_done_prompts, n_new_tokens)` is
    called after every batch (for a progress bar)."""
    import torch

    end = set(end_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if temperature > 0:
            torch.manual_seed(hash((seed, tuple(batch))) % 2**31)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                eos_token_id=sorted(end), pad_token_id=pad_id,
                stop_strings=list(stop_strings) or None, tokenizer=tokenizer if stop_strings else None,
                **sampling, top_k=None)
        new = out[:, ids.shape[1]:].tolist()
        n_batch_tokens = 0
        for row, i in zip(new, batch):
            toks, stopped = _trim(row, end | {pad_id})  # pad fills a row after it ended
            text = tokenizer.decode([t for t in toks if t not in end and t != pad_id], skip_special_tokens=True)
            text, hit = cut_at_stop(text, stop_strings)
            results[i] = Generation(text=text, n_tokens=len(toks), stopped=stopped or hit)
            n_batch_tokens += len(toks)
        if progress:
            progress(len(batch), n_batch_tokens)
    return results  # type: ignore[return-value]
