"""Batched text generation: the teacher's `hf` backend and the student's evaluation both call
`generate` (transformers, in-process); `--eval-backend vllm` calls `generate_vllm`.

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

Either way a row ends at any end token or pad token (counted), or at the token that completes a
stop string (counted; the text is cut before the stop string). Results come back in input order.

Speed (Gemma 3 270M, fp32 CPU, batch 8; profiled for issue 21): a decode step is weight-bandwidth
bound: ~80% of the time is the 127 matmuls of a step, which read all 1.07 GB of weights for 8
tokens (the tied 262k x 640 LM head alone is 671 MB); KV-cache growth by `torch.cat` is ~7%,
attention ~4%, norms/rotary/Python the rest. Prefill keeps only the last position's logits.
`model.generate` adds, per call, a StopStringCriteria built over the whole vocabulary (2-6.5 s
for Gemma's tokenizer); the refill loop checks the decoded tail of each row instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Refill once this share of the slots is free (or all are): each refill is one prefill forward,
# so refilling every single freed slot would add nearly a forward per prompt.
REFILL_AT = 0.25
# Tokens decoded from a row's end to look for a stop string after each step (a stop string
# spanning more tokens than this is still found, by the final check on the whole text).
STOP_TAIL_TOKENS = 12


@dataclass
class Generation:
    text: str
    n_tokens: int  # generated tokens, up to and including the stop token
    stopped: bool  # ended at an end token / stop string (False: hit max_new_tokens)
    token_ids: list[int] = field(default_factory=list, repr=False)  # the n_tokens generated ids


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_stop(text: str, stop_strings) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _end_ids(tokenizer, end_ids) -> tuple[set[int], int]:
    """(ids that end a row, pad id). Pad ends a row too: a model that emits it has nothing left to say."""
    end = set(end_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return end | {pad_id}, pad_id


def _finish(tokenizer, toks: list[int], end: set[int], stop_strings, stopped: bool) -> Generation:
    text = tokenizer.decode([t for t in toks if t not in end], skip_special_tokens=True)
    text, hit = cut_at_stop(text, stop_strings)
    return Generation(text=text, n_tokens=len(toks), stopped=stopped or hit, token_ids=list(toks))


def _has_stop(tokenizer, toks: list[int], end: set[int], stop_strings) -> bool:
    tail = tokenizer.decode([t for t in toks[-STOP_TAIL_TOKENS:] if t not in end], skip_special_tokens=True)
    return any(s in tail for s in stop_strings)


def _stop_prefix(tokenizer, toks: list[int], end: set[int], stop_strings) -> int | None:
    """Length of the shortest prefix of `toks` whose text holds a stop string (None: none does)."""
    full = tokenizer.decode([t for t in toks if t not in end], skip_special_tokens=True)
    if not any(s in full for s in stop_strings):
        return None
    return next(
        n for n in range(1, len(toks) + 1) if _has_stop(tokenizer, toks[:n], end, stop_strings) or n == len(toks)
    )


# ---------------------------------------------------------------- greedy: drop finished rows, refill


class _Batch:
    """The running rows: their cache, 2-D attention mask over the shared timeline, positions."""

    def __init__(self, cache, mask, positions, rows, last):
        self.cache, self.mask, self.positions, self.rows, self.last = cache, mask, positions, rows, last

    def __len__(self):
        return len(self.rows)


def _pad_layer(tensor, to_len: int):
    import torch.nn.functional as F

    return F.pad(tensor, (0, 0, to_len - tensor.shape[-2], 0)) if tensor.shape[-2] < to_len else tensor


def _join_caches(a, b, len_a: int, len_b: int):
    """Cache `b` appended to `a` along the batch, both left-padded to the longer timeline. A
    sliding-window layer keeps only its last `window - 1` positions, so it is padded to that."""
    import torch

    total = max(len_a, len_b)
    for la, lb in zip(a.layers, b.layers):
        keep = min(total, la.sliding_window - 1) if getattr(la, "is_sliding", False) else total
        la.keys = torch.cat([_pad_layer(la.keys, keep), _pad_layer(lb.keys, keep)], dim=0)
        la.values = torch.cat([_pad_layer(la.values, keep), _pad_layer(lb.values, keep)], dim=0)
        if hasattr(la, "cumulative_length"):
            la.cumulative_length = total
    return a


def _prefill(model, prompts: list[list[int]], rows: list[int], pad_id: int, device) -> _Batch:
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    last = out.logits[:, -1].float().argmax(-1)
    return _Batch(_out_cache(out), mask, mask.sum(-1), list(rows), last)


def _merge(run: _Batch | None, new: _Batch) -> _Batch:
    import torch
    import torch.nn.functional as F

    if run is None or not len(run):
        return new
    la, lb = run.mask.shape[1], new.mask.shape[1]
    cache = _join_caches(run.cache, new.cache, la, lb)
    width = max(la, lb)
    mask = torch.cat([F.pad(run.mask, (width - la, 0)), F.pad(new.mask, (width - lb, 0))])
    return _Batch(
        cache, mask, torch.cat([run.positions, new.positions]), run.rows + new.rows, torch.cat([run.last, new.last])
    )


def _keep(run: _Batch, keep: list[int]) -> _Batch:
    import torch

    idx = torch.tensor(keep, dtype=torch.long, device=run.mask.device)
    run.cache.batch_select_indices(idx)
    return _trim_left(_Batch(run.cache, run.mask[idx], run.positions[idx], [run.rows[i] for i in keep], run.last[idx]))


def _trim_left(run: _Batch) -> _Batch:
    """Drop the timeline's leading positions that no remaining row attends to, so the timeline
    stays as long as its longest row (else it would grow by every refill, and each step with it)."""
    if not len(run):
        return run
    first = int(run.mask.any(0).int().argmax())
    if first == 0:
        return run
    run.mask = run.mask[:, first:]
    total = run.mask.shape[1]
    for layer in run.cache.layers:
        if getattr(layer, "is_sliding", False):
            keep = min(total, layer.sliding_window - 1)
            layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        else:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = total
    return run


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x), else `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _step(model, run: _Batch) -> None:
    """Feed every row its last token; afterwards `run.last` holds each row's next token."""
    import torch

    run.mask = torch.cat([run.mask, run.mask.new_ones((len(run), 1))], dim=1)
    out = model(
        input_ids=run.last[:, None],
        attention_mask=run.mask,
        position_ids=run.positions[:, None],
        use_cache=True,
        **{_cache_kwarg(model): run.cache},
    )
    run.cache, run.positions = _out_cache(out), run.positions + 1
    run.last = out.logits[:, -1].float().argmax(-1)


def generate_refill(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 512,
    end_ids=(),
    stop_strings=(),
    batch_size: int = 8,
    progress=None,
) -> list[Generation]:
    """Greedy continuations; a finished row's slot is refilled with the next prompt at once.
    `progress(n_done_prompts, n_new_tokens)` is called as rows finish."""
    import torch

    end, pad_id = _end_ids(tokenizer, end_ids)
    device = next(model.parameters()).device
    queue = [i for batch in length_batches([len(p) for p in prompts], batch_size) for i in batch]
    toks: dict[int, list[int]] = {}
    results: list[Generation | None] = [None] * len(prompts)
    run = None
    with torch.inference_mode():
        while queue or (run is not None and len(run)):
            free = batch_size - (len(run) if run is not None else 0)
            if queue and (free >= REFILL_AT * batch_size or free == batch_size):
                new, queue = queue[:free], queue[free:]
                run = _merge(run, _prefill(model, [prompts[i] for i in new], new, pad_id, device))
                toks.update({i: [] for i in new})
            keep, done = [], []
            for j, (i, tok) in enumerate(zip(run.rows, run.last.tolist())):
                toks[i].append(tok)
                row_end = tok in end or (stop_strings and _has_stop(tokenizer, toks[i], end, stop_strings))
                if row_end or len(toks[i]) >= max_new_tokens:
                    results[i] = _finish(tokenizer, toks[i], end, stop_strings, bool(row_end))
                    done.append(i)
                else:
                    keep.append(j)
            if done and progress:
                progress(len(done), sum(len(toks[i]) for i in done))
            run = _keep(run, keep) if done else run
            if len(run):
                _step(model, run)
    return results  # type: ignore[return-value]


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

    end, pad_id = _end_ids(tokenizer, end_ids)
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
        n = min(n, _stop_prefix(tokenizer, row[:n], end, stop_strings) or n)
    toks = row[:n]
    return _finish(tokenizer, toks, end, stop_strings, bool(toks) and toks[-1] in end)


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
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    end_ids=(),
    stop_strings=(),
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> list[Generation]:
    """Generate a continuation for each prompt: greedy by `generate_refill`, sampling (or a
    generation config that processes logits, see `plain_greedy`) by `generate_static`.
    `progress(n_done_prompts, n_new_tokens)` is called as prompts finish."""
    if temperature > 0 or not plain_greedy(model):
        return generate_static(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            end_ids=end_ids,
            stop_strings=stop_strings,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    return generate_refill(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        end_ids=end_ids,
        stop_strings=stop_strings,
        batch_size=batch_size,
        progress=progress,
    )
