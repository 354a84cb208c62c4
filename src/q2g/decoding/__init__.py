"""Batched text generation: the teacher's `hf` backend and the student's evaluation both call
`generate` (transformers, in-process); `--eval-backend vllm` calls `evaluation.pass_at_1.generate_vllm`.

Greedy (temperature == 0) runs `generate_refill`: a decode loop over a KV cache in which a row
that ends (end token, stop string, or its token cap) leaves the batch at once, and once a quarter
of the slots is free the next prompts take them, so finished rows cost no compute and the batch
stays full. New prompts are prefilled on their own and their cache is joined to the running one,
left-padded to the same timeline (masked positions; every row keeps its own position ids), so
each row sees exactly the context it would see alone; timeline columns no running row attends to
any more are cut off. Prompts enter longest first (an OOM shows up at once).

Sampling (temperature > 0) runs `generate_static`, the former path: prompts sorted by length and
cut into batches, each one `model.generate` call, seeded per batch so a rerun of the same batch
gives the same text. A batch there runs until its longest row ends; for greedy decoding it gives
the same tokens as the refill loop (tests/test_decoding.py) and is kept as the reference and
for benchmarks/eval_speed.py.

Either way a row ends as q2g.decoding.rows says; results come back in input order.
The refill loop is in decoding/refill.py, the shared row logic in decoding/rows.py.

Speed (Gemma 3 270M, fp32 CPU; profiled for issues 21 and 30): most of a decode step is its 127
matmuls, which read all 1.07 GB of weights for a few rows (the tied 262k x 640 LM head alone is
671 MB); on a CPU they run through oneDNN with packed weights where that is timed faster here
(cpu_linears.py: on the 2-core AMD EPYC, 24 rows, the head 2.8x and the body 1.75x faster
than MKL; decoding 1.77x); KV-cache growth by `torch.cat` is ~15% of a step after that, attention
a few %, norms/rotary/Python the rest. Prompts are prefilled in groups of similar length (padding
at most 25%), and only the last position's logits are kept.
`model.generate` adds, per call, a StopStringCriteria built over the whole vocabulary (2-6.5 s
for Gemma's tokenizer); the refill loop checks the decoded tail of each row instead.
"""

from __future__ import annotations

from q2g.cpu_linears import onednn_linears
from q2g.decoding.refill import generate_refill
from q2g.decoding.rows import (
    Generation,
    cut_at_stop,
    end_and_pad,
    finish_row,
    left_pad,
    length_batches,
    stop_prefix,
)

__all__ = ["Generation", "cut_at_stop", "generate", "generate_refill", "generate_static", "left_pad", "plain_greedy"]


# ---------------------------------------------------------------- static batches (sampling; reference)


def generate_static(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    end_ids=(),
    stop_strings=(),
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> list[Generation]:
    """One `model.generate` per length-sorted batch; a batch runs until its longest row ends."""
    import torch

    end, pad_id = end_and_pad(tokenizer, end_ids)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        )
        if temperature > 0:
            torch.manual_seed(hash((seed, tuple(batch))) % 2**31)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(end),
                pad_token_id=pad_id,
                stop_strings=list(stop_strings) or None,
                tokenizer=tokenizer if stop_strings else None,
                **sampling,
                top_k=None,
            )
        n_batch_tokens = 0
        for row, i in zip(out[:, ids.shape[1] :].tolist(), batch):
            results[i] = _static_row(tokenizer, row, end, stop_strings)
            n_batch_tokens += results[i].n_tokens
        if progress:
            progress(len(batch), n_batch_tokens)
    return results  # type: ignore[return-value]


def _static_row(tokenizer, row: list[int], end: set[int], stop_strings) -> Generation:
    """A row of `model.generate` output: cut after its end token, or after the token that
    completed a stop string (what follows is pad filler of a row that ended before the batch)."""
    n = next((k + 1 for k, t in enumerate(row) if t in end), len(row))
    if stop_strings:
        n = min(n, stop_prefix(tokenizer, row[:n], end, stop_strings) or n)
    toks = row[:n]
    return finish_row(tokenizer, toks, end, stop_strings, bool(toks) and toks[-1] in end)


# generation_config fields that change greedy decoding in `model.generate` (Qwen2.5-Instruct ships
# repetition_penalty 1.05): the refill loop is plain argmax, so such a model keeps model.generate.
_LOGITS_PROCESSING = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def plain_greedy(model) -> bool:
    """True when the model's generation config leaves greedy decoding as plain argmax."""
    config = getattr(model, "generation_config", None)
    return all(getattr(config, k, neutral) in (neutral, None) for k, neutral in _LOGITS_PROCESSING.items())


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    **options,
) -> list[Generation]:
    """Generate a continuation for each prompt: greedy by `generate_refill`, sampling (or a
    generation config that processes logits, see `plain_greedy`) by `generate_static`.
    `options`: max_new_tokens, end_ids, stop_strings, batch_size, and `progress(n_done_prompts,
    n_new_tokens)`, called as prompts finish."""
    with onednn_linears(model, options.get("batch_size", 8)):  # CPU fp32: oneDNN where it is faster here
        if temperature > 0 or not plain_greedy(model):
            return generate_static(
                model, tokenizer, prompts, temperature=temperature, top_p=top_p, seed=seed, **options
            )
        return generate_refill(model, tokenizer, prompts, **options)
