"""How evaluation holds a model that training may still own: eval mode for the duration (each
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

from contextlib import contextmanager, nullcontext

from q2g.batching import GUARDED_SDPA, use_guarded_sdpa

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


def logits_bytes(precision) -> int:
    """Bytes per logit under `precision`: 2 under bf16/fp16 autocast or weights, else 4 (also for
    None: an unknown precision is planned as fp32, the larger)."""
    if precision is None:
        return 4
    if precision.autocast in ("bf16", "fp16"):
        return 2
    return precision.dtype.itemsize


def bytes_per_position(model, precision) -> int:
    """Logits bytes of one position: vocabulary x bytes per logit."""
    return model.config.get_text_config().vocab_size * logits_bytes(precision)


def progress_bar(progress, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)  # shown in logs too (TQDM_MININTERVAL thins it)
