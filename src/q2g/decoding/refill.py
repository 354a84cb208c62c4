"""Greedy decoding that refills finished slots (`generate_refill`; see q2g.decoding)."""

from __future__ import annotations

from q2g.decoding.rows import (
    Generation,
    end_and_pad,
    finish_row,
    has_stop,
    left_pad,
    length_batches,
    low_padding_groups,
)

# Refill once this share of the slots is free (or all are): each refill is one prefill forward,
# so refilling every single freed slot would add nearly a forward per prompt.
REFILL_AT = 0.25


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

    end, pad_id = end_and_pad(tokenizer, end_ids)
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
                for group in low_padding_groups([len(prompts[i]) for i in new]):  # prefill without much padding
                    rows = [new[g] for g in group]
                    run = _merge(run, _prefill(model, [prompts[i] for i in rows], rows, pad_id, device))
                toks.update({i: [] for i in new})
            keep, done = [], []
            for j, (i, tok) in enumerate(zip(run.rows, run.last.tolist())):
                toks[i].append(tok)
                row_end = tok in end or (stop_strings and has_stop(tokenizer, toks[i], end, stop_strings))
                if row_end or len(toks[i]) >= max_new_tokens:
                    results[i] = finish_row(tokenizer, toks[i], end, stop_strings, bool(row_end))
                    done.append(i)
                else:
                    keep.append(j)
            if done and progress:
                progress(len(done), sum(len(toks[i]) for i in done))
            run = _keep(run, keep) if done else run
            if len(run):
                _step(model, run)
    return results  # type: ignore[return-value]
