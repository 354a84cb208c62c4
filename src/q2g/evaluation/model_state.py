"""How evaluation holds a model that training may still own: eval mode for the duration (each
submodule's own flag restored after), the run's autocast, the logits budget, a progress bar.

The precision is the run's decision (`models.resolve_precision`'s `Precision`, passed in), never
read back off the parameters: a model with fp32 weights under bf16 autocast makes bf16 logits.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

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
