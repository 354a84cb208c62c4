"""A KL anchor to the base model: BETA x KL(student || base) on the trace tokens (`--kl-to-base`).

    total = ce_sum + beta * kl_to_base_sum(peft_model, decoder, batch, hidden, labels, head, config)

The base is the same peft model with its adapter disabled (`with model.disable_adapter():`, under
no_grad), run in the same step: no second model is kept in memory. Only the positions whose
shifted label is a trace token are compared (as q2g.loss's label-only cross-entropy selects them),
and the [N, vocab] log-probabilities of student and base are built one chunk of positions at a
time under activation checkpointing, so no [B, T, V] tensor exists, in the forward or the backward.

KL(p_s || p_b) = sum_v p_s(v) (log p_s(v) - log p_b(v)) per position, summed over positions; the
caller divides by the same token count as the cross-entropy, so BETA weighs two per-token means.
An init that rewrites the base weights (PiSSA, OLoRA: W -> W - BA) makes "adapter disabled" a
different model, so `check_init` refuses that combination.
"""

from __future__ import annotations

from q2g.errors import ConfigError
from q2g.finetune.sft_data import IGNORE_INDEX

# LoRA inits that replace the base weight by a residual: with the adapter disabled that is not the base.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def check_init(kl_to_base: float, init_lora_weights: str) -> str | None:
    """An error message when --kl-to-base cannot be computed with this init, else None."""
    if kl_to_base and str(init_lora_weights).startswith(RESIDUAL_INITS):
        return (
            f"--kl-to-base {kl_to_base:g} needs the base weights unchanged, but --init-lora-weights "
            f"{init_lora_weights} replaces them by a residual (the adapter disabled is not the base model); "
            "use another init or --kl-to-base 0"
        )
    return None


def check_processes(kl_to_base: float, n_processes: int) -> None:
    """The anchor lives in the one-process label-only loss; several processes use the Trainer's own."""
    if kl_to_base and n_processes > 1:
        raise ConfigError(
            f"--kl-to-base runs in one process (the label-only loss); this run has {n_processes}: "
            "launch it without accelerate/torchrun or use --kl-to-base 0"
        )


def _chunk_kl(hs, hb, weight, bias, softcap, scale):
    """Summed KL(student || base) of one chunk of hidden rows (student hs with grad, base hb without)."""
    import torch

    def logprobs(h):
        z = h @ weight.t()
        if bias is not None:
            z = z + bias
        z = z.float() * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        return torch.log_softmax(z, dim=-1)

    ls = logprobs(hs)
    with torch.no_grad():
        lb = logprobs(hb)
    return (ls.exp() * (ls - lb)).sum()


def chunked_kl_sum(hs, hb, weight, bias=None, chunk_size: int = 1024, softcap=None, scale: float = 1.0):
    """sum_i KL(softmax(f(hs_i W^T)) || softmax(f(hb_i W^T))), one [chunk, V] block alive at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.float32, device=hs.device)
    for start in range(0, hs.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hs[sl], hb[sl], weight, bias, softcap, scale)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if hs.requires_grad else _chunk_kl(*args))
    return total


def base_hidden(peft_model, decoder, batch):
    """The decoder's last hidden states with the adapter disabled (no grad): the base model's."""
    import torch

    with torch.no_grad(), peft_model.disable_adapter():
        return decoder(**batch, use_cache=False).last_hidden_state


def kl_to_base_sum(peft_model, decoder, batch, hidden, labels, head, transform=(None, 1.0), chunk_size: int = 1024):
    """Summed KL(student || base) over the label positions of `labels` (position t predicts t+1).

    `hidden`: the student's last hidden states [B, T, H] of `batch` (with grad); `head`: the lm_head
    whose weight both share (the frozen base head, as in the label-only cross-entropy); `transform`:
    (softcap, scale) of the final logits, q2g.loss.logit_transform(config)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        return hidden.sum() * 0.0
    hs = hidden[:, :-1][keep]
    hb = base_hidden(peft_model, decoder, batch)[:, :-1][keep].to(hs.dtype)
    return chunked_kl_sum(hs, hb, head.weight, head.bias, chunk_size, *transform)
