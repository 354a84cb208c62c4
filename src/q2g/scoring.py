"""Forward-only NLL without the [batch, seq, vocab] logits, for held-out loss and perplexity.

    total, count = aligned_nll(model, input_ids, attention_mask, targets)  # under torch.inference_mode()

`model(...).logits` projects every position through the LM head and the callers then upcast it to
fp32: for Gemma 3 270M (262k vocabulary, 640 hidden) the head is ~63% of a token's forward FLOPs,
and 8 rows x 300 positions of fp32 logits are 2.5 GB written and read back. Here the decoder
returns hidden states, only the positions that predict a target go through the head, a
`chunk` of them at a time (at most one [chunk, vocab] fp32 block alive), and the sum stays on the
device until the end (one host sync per call). The held-out loss skips the prompt's positions this
way; perplexity needs every scored position, so there it saves the logits' memory traffic only.

Same numbers as the logits path up to float rounding (tests/test_forward_nll.py): the head and the
final-logit transform (softcap, scale) are the model's own, taken as loss.py takes them.

How evaluation holds a model that training may still own: eval mode for the duration (each
submodule's own flag restored after), the guarded attention for padded batches (the training
attention restored after, also on an exception), the run's autocast, the logits budget.

Padded evaluation batches have query rows that see no key: left-padded decoding (pass@1) in every
layer, right-padded solutions (held-out loss) in sliding-window layers. Fused GPU kernels return
NaN there in bf16, and the next layer spreads it over the row (batching.py's docstring). Training
avoids it by dropping the mask (batching.causal_inputs); evaluation cannot, so it runs under
`batching.use_guarded_sdpa`, which unmasks those (padding, never read) rows, and switches back.

The precision is the run's decision (`models.resolve_precision`'s `Precision`, passed in), never
read back off the parameters: a model with fp32 weights under bf16 autocast makes bf16 logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

from q2g.batching import GUARDED_SDPA, use_guarded_sdpa
from q2g.examples import IGNORE_INDEX

CHUNK = 256  # positions per head projection: a [256, 262144] fp32 block is 268 MB


def shift_labels(labels):
    """Causal-LM labels [B, T] (labels[t] is the token at t) -> targets aligned with the logits:
    targets[t] = labels[t + 1], the last position predicts nothing (-100)."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def logit_transform(config) -> tuple[float | None, float]:
    """(softcap, scale) of the model's final logits: logits = cap * tanh(scale * z / cap).

    Gemma 2 (and Gemma 3 configs that set it) cap with `final_logit_softcapping`; Cohere multiplies
    by `logit_scale`, Granite divides by `logits_scaling`. Unknown models: (None, 1.0).
    """
    cap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    return (float(cap) if cap else None), scale


def split_causal_lm(model):
    """(decoder that returns last_hidden_state, lm_head, config) of a CausalLM, peft-wrapped or not."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
    head = lm.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(
            f"{type(lm).__name__}: cannot find the decoder and lm_head of this model for the label-only loss"
        )
    return decoder, head, lm.config


def hidden_nll(head, hidden, targets, softcap: float | None = None, scale: float = 1.0, chunk: int = CHUNK):
    """Summed NLL (a 0-dim fp32 tensor) of `targets` [N] under `head(hidden)` [N, H] -> [N, V],
    projected `chunk` rows at a time."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for a in range(0, len(targets), chunk):
        z = head(hidden[a : a + chunk]).float()
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        total += F.cross_entropy(z, targets[a : a + chunk], reduction="sum")
    return total


def aligned_nll(model, input_ids, attention_mask, targets, chunk: int = CHUNK) -> tuple[float, int]:
    """(summed NLL, count) of `targets` [B, T]: targets[b, t] is the token that position t of row b
    predicts (-100: not scored). Call it under `torch.inference_mode()` (and the eval's autocast)."""

    decoder, head, config = split_causal_lm(model)
    softcap, scale = logit_transform(config.get_text_config())
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = targets != IGNORE_INDEX
    total = hidden_nll(head, hidden[keep], targets[keep], softcap, scale, chunk)
    return float(total), int(keep.sum())


def labels_nll(model, input_ids, attention_mask, labels, chunk: int = CHUNK) -> tuple[float, int]:
    """`aligned_nll` for causal-LM `labels` (examples.Collator's: -100 on prompt and padding)."""
    return aligned_nll(model, input_ids, attention_mask, shift_labels(labels), chunk)


def windows_targets(batch, width: int, device):
    """Targets [B, width] of perplexity windows (input ids, target ids, tail): the len(targets)
    positions that end `tail` positions before the input's end predict the targets."""
    import torch

    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (_, target, tail) in enumerate(batch):
        end = width - tail
        targets[row, end - len(target) : end] = torch.tensor(target, dtype=torch.long)
    return targets.to(device)


def batch_nll(model, batch, chunk: int = CHUNK) -> float:
    """Summed NLL of a batch of equal-length perplexity windows (`windows_nll` below calls it per batch)."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([inp for inp, _, _ in batch], device=device)
    targets = windows_targets(batch, inputs.shape[1], device)
    return aligned_nll(model, inputs, None, targets, chunk)[0]


# The model's logits for one forward are [rows, positions, vocab]; Gemma's vocab is 262k, so
# this caps how many rows share a forward (one row always goes, whatever its size).
LOGITS_BUDGET_BYTES = 2 * 1024**3
# Positions per fp32 log-softmax slice when scoring one row (bounds the fp32 copy).
CE_CHUNK = 256


@contextmanager
def eval_mode(model):
    """model.eval() inside; afterwards every submodule gets back its own train/eval flag
    (a plain model.train(previous) would also flip modules the trainer left in eval mode)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


# Attention implementations that need no guard: flash/paged kernels drop padding instead of
# masking it, flex builds its own block mask, eager's additive mask keeps a fully masked row finite.
UNGUARDED = ("eager", "flash", "flex", "paged", GUARDED_SDPA)


def _guard_target(name: str):
    """(True, attention function or None for torch sdpa) when `name` should be guarded."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not isinstance(name, str) or name.startswith(UNGUARDED) or name not in ALL_ATTENTION_FUNCTIONS:
        return False, None
    return True, None if name == "sdpa" else ALL_ATTENTION_FUNCTIONS[name]


@contextmanager
def guarded_attention(model):
    """`model` (plain or peft) under the guarded sdpa inside, its own attention afterwards."""
    before = model.config._attn_implementation
    guard, attention = _guard_target(before)
    if not guard:
        yield model
        return
    use_guarded_sdpa(model, attention)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def device_of(model) -> str:
    return str(next(model.parameters()).device)


def autocast(model, precision):
    """The autocast of `precision` (models.Precision) on the model's device; None: none."""
    return precision.context(device_of(model)) if precision is not None else nullcontext()


def bytes_per_logit(precision) -> int:
    """Bytes per logit under `precision`: 2 under bf16/fp16 autocast or weights, else 4 (also for
    None: an unknown precision is planned as fp32, the larger)."""
    if precision is None:
        return 4
    if precision.autocast in ("bf16", "fp16"):
        return 2
    return precision.dtype.itemsize


def bytes_per_position(model, precision) -> int:
    """Logits bytes of one position: vocabulary x bytes per logit."""
    return model.config.get_text_config().vocab_size * bytes_per_logit(precision)


def progress_bar(progress, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)  # shown in logs too (TQDM_MININTERVAL thins it)


# A window is (input ids, target ids, tail): the logits of the len(targets) positions that
# end `tail` positions before the input's end predict the targets.


def plan_windows(n_tokens: int, max_length: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) text-token indices of each window: the model sees
    [bos] + ids[begin:end] (or ids[begin:end]) and is scored on ids[first_scored:end]."""
    if max_length < 2 or not 1 <= stride <= max_length - 1:
        raise ValueError(f"need max_length >= 2 and 1 <= stride < max_length, got {max_length}, {stride}")
    budget = max_length - 1 if bos else max_length
    windows, begin, prev_end = [], 0, 0
    while n_tokens:
        end = min(begin + budget, n_tokens)
        # Without bos a window's first token has no context, so it cannot be scored.
        windows.append((begin, end, max(prev_end, begin + (0 if bos else 1))))
        if end == n_tokens:
            break
        begin, prev_end = begin + stride, end
    return windows


def q2g_windows(ids: list[int], max_length: int, stride: int, bos_id) -> list[tuple[list[int], list[int], int]]:
    prefix = [bos_id] if bos_id is not None else []
    return [
        (prefix + ids[b:e], ids[f:e], 1) for b, e, f in plan_windows(len(ids), max_length, stride, bos_id is not None)
    ]


def _window_batches(windows, max_windows: int, per_position: int):
    """Consecutive windows of equal input length, grouped so their kept logits fit the budget."""
    batch: list = []
    for w in windows:
        kept = max(len(t) + tail for _, t, tail in batch + [w])
        too_big = (len(batch) + 1) * kept * per_position > LOGITS_BUDGET_BYTES
        if batch and (len(w[0]) != len(batch[0][0]) or len(batch) >= max_windows or too_big):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def windows_nll(model, windows, batch_size: int, progress=True, precision=None) -> float:
    """Summed NLL of every window's targets, `batch_size` windows (at most) per forward."""
    import torch

    per_position = bytes_per_position(model, precision)
    nll = 0.0
    n_targets = sum(len(t) for _, t, _ in windows)
    with (
        eval_mode(model),
        autocast(model, precision),
        torch.inference_mode(),
        progress_bar(progress, total=n_targets, desc="perplexity", unit="tok", unit_scale=True) as bar,
    ):
        for batch in _window_batches(windows, batch_size, per_position):
            nll += batch_nll(model, batch)
            bar.update(sum(len(t) for _, t, _ in batch))
    return nll


def token_perplexity(model, tokenizer, text: str, max_length: int, stride: int, max_tokens: int) -> float:
    """exp(mean NLL) of the first `max_tokens` tokens of `text` in q2g's windows (the demo model's
    conversion check; `q2g evaluate`'s full numbers are evaluation.perplexity's)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = q2g_windows(ids, max_length, stride, tokenizer.bos_token_id)
    nll = windows_nll(model, windows, batch_size=8, progress=False)
    return math.exp(nll / sum(len(t) for _, t, _ in windows))
