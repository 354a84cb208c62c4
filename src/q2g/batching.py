"""Batches: how much of them is padding, length grouping, and the right-padding mask that NaNs Gemma 3.

    from q2g.batching import padding_report
    padding_report([len(e["input_ids"]) for e in examples], batch_size=8, grad_accum=4)
    # {'random': 0.48, 'group_by_length': 0.13}: share of the batch tokens that are padding, for the
    # 383 packaged demo traces (tokenized with the tests' tiny Gemma tokenizer), batch 8 x accum 4

Length grouping is a Trainer flag in transformers 5: `TrainingArguments(train_sampling_strategy=
"group_by_length")` (the v4 `group_by_length=True` is gone). Its LengthGroupedSampler shuffles,
cuts the order into mega-batches of 50 x (batch x accumulation) examples (fewer for small sets),
sorts each by length and puts the longest batch first, so an out-of-memory shows at step 1.
`trainer_order` replays that sampler so the padding share can be reported before training.

Right padding and sliding-window attention: a padded query at position q of a row with L real
tokens sees keys (q - w, q] in a sliding layer of window w, and all of them are padding once
q >= L + w - 1. transformers 5 no longer repairs such fully masked rows (`sdpa_mask`'s
`allow_torch_fix` is a no-op); torch's CPU kernel returns 0 for them, but fused GPU kernels can
return NaN, and the next layer spreads it to every token of the row (0 x NaN where padded values
are mixed in). Causal attention never lets a real token of a right-padded row see a later
(padded) key, so the padding mask changes nothing that is trained: `causal_inputs` drops it.

Where a mask must stay (left-padded generation has the same fully masked rows, in every layer),
`use_guarded_sdpa(model)` switches the model to sdpa with a mask that lets a row that sees
nothing see everything instead (what transformers 4's `allow_torch_fix` did): those rows are
padding, their output is never used, and it is finite.
"""

from __future__ import annotations


def padding_share(batches: list[list[int]]) -> float:
    """Padding tokens / all tokens when each batch (a list of row lengths) is padded to its longest row."""
    total = sum(len(b) * max(b) for b in batches if b)
    real = sum(sum(b) for b in batches)
    return 1 - real / total if total else 0.0


def trainer_order(
    lengths: list[int], batch_size: int, grad_accum: int = 1, strategy: str = "random", seed: int = 0
) -> list[list[int]]:
    """Row lengths per batch in the order the Trainer's sampler would give them (one epoch)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if strategy == "group_by_length":
        order = list(LengthGroupedSampler(batch_size * grad_accum, lengths=list(lengths), generator=g))
    elif strategy == "random":
        order = torch.randperm(len(lengths), generator=g).tolist()
    elif strategy == "sequential":
        order = list(range(len(lengths)))
    else:
        raise ValueError(f"strategy must be random, sequential or group_by_length, got {strategy!r}")
    return [[lengths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def padding_report(lengths: list[int], batch_size: int, grad_accum: int = 1, seed: int = 0) -> dict:
    """Padding share of one epoch under the random and the length-grouped sampler."""
    return {
        s: padding_share(trainer_order(lengths, batch_size, grad_accum, s, seed))
        for s in ("random", "group_by_length")
    }


def is_right_padded(attention_mask) -> bool:
    """Every row is ones then zeros (no left padding, no holes)."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def causal_inputs(batch: dict) -> dict:
    """The model inputs of a right-padded causal-LM batch without its attention mask (see above):
    the same outputs at every real token, no fully masked attention rows. Other batches as given."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or not is_right_padded(mask):
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


GUARDED_SDPA = "sdpa_guarded"


def guarded_sdpa_mask(*args, **kwargs):
    """transformers' sdpa mask, with every fully masked query row unmasked (finite, unused output)."""
    import torch
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


def register_guarded_sdpa(attention=None) -> str:
    """Register sdpa (or `attention`, an attention function) + the guarded mask under one name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    name = GUARDED_SDPA if attention is None else f"{GUARDED_SDPA}_{attention.__name__}"
    AttentionInterface.register(name, attention or sdpa_attention_forward)
    AttentionMaskInterface.register(name, guarded_sdpa_mask)
    return name


def use_guarded_sdpa(model, attention=None):
    """Switch a loaded model to the guarded sdpa (see the module docstring); returns the model."""
    model.set_attn_implementation(register_guarded_sdpa(attention))
    return model
