"""A KL anchor to the base model: BETA x KL(student || base) on the trace tokens (`--kl-to-base`).

    total = ce_sum + beta * kl_to_base_sum(peft_model, decoder, batch, hidden, labels, head, config)

The base is the same peft model with its adapter disabled (`with model.disable_adapter():`, under
no_grad), run in the same step: no second model is kept in memory. Only the positions whose
shifted label is a trace token are compared (as q2g.finetune.loss's label-only cross-entropy selects them),
and the [N, vocab] log-probabilities of student and base are built one chunk of positions at a
time, the chunk's gradient taken in the forward (as q2g.finetune.loss's cross-entropy does), so no
[B, T, V] tensor exists and each block is built once (not again for the backward).

KL(p_s || p_b) = sum_v p_s(v) (log p_s(v) - log p_b(v)) per position, summed over positions; the
caller divides by the same token count as the cross-entropy, so BETA weighs two per-token means.
An init that rewrites the base weights (PiSSA, OLoRA: W -> W - BA) makes "adapter disabled" a
different model, so `check_init` refuses that combination.
"""

from __future__ import annotations

from q2g.errors import ConfigError
from q2g.examples import IGNORE_INDEX
from q2g.finetune import fused_grads

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


def _kl_function():
    """The autograd Function, built on first use (torch is imported lazily in this module)."""
    import torch

    class ChunkedKL(torch.autograd.Function):
        """sum_i KL(softmax(f(hs_i W^T)) || softmax(f(hb_i W^T))) with d/dhs (and d/dW, d/db when they
        need it) computed chunk by chunk in the forward, as q2g.finetune.loss's chunked cross-entropy does:
        each [chunk, V] block is built once, and the backward only scales the saved gradients.

        With l = log_softmax(z_s), q = log_softmax(z_b), p = exp(l) and k_i = sum_v p (l - q):
        d k_i / d z_s = p * ((l - q) - k_i), then through the cap (1 - tanh^2) and the scale."""

        @staticmethod
        def forward(ctx, hs, hb, weight, bias, chunk_size, softcap, scale):
            grads = fused_grads.buffers(hs, weight, bias)
            total = torch.zeros((), dtype=torch.float32, device=hs.device)
            for start in range(0, hs.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                zs, capped = fused_grads.logits(hs[sl], weight, bias, softcap, scale)
                ls = torch.log_softmax(zs, dim=-1)
                del zs
                diff = ls - torch.log_softmax(fused_grads.logits(hb[sl], weight, bias, softcap, scale)[0], dim=-1)
                dz = ls.exp_()  # p_s (the log-probs are not needed again)
                per_row = (dz * diff).sum(-1, keepdim=True)
                total += per_row.sum()
                dz *= diff.sub_(per_row)
                del diff
                fused_grads.through_transform(dz, capped, scale)
                fused_grads.accumulate(grads, sl, dz, hs, weight)
            fused_grads.save(ctx, grads, weight, bias)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            gh, gw, gb = fused_grads.scaled(ctx, grad_out)
            return gh, None, gw, gb, None, None, None

    return ChunkedKL


_FUNCTION = []


def chunked_kl_sum(hs, hb, weight, bias=None, chunk_size: int = 1024, softcap=None, scale: float = 1.0):
    """sum_i KL(softmax(f(hs_i W^T)) || softmax(f(hb_i W^T))), one [chunk, V] block alive at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not _FUNCTION:
        _FUNCTION.append(_kl_function())
    return _FUNCTION[0].apply(hs, hb.detach(), weight, bias, chunk_size, softcap, scale)


def base_hidden(peft_model, decoder, batch):
    """The decoder's last hidden states with the adapter disabled (no grad): the base model's."""
    import torch

    with torch.no_grad(), peft_model.disable_adapter():
        return decoder(**batch, use_cache=False).last_hidden_state


def kl_to_base_sum(peft_model, decoder, batch, hidden, labels, head, transform=(None, 1.0), chunk_size: int = 1024):
    """Summed KL(student || base) over the label positions of `labels` (position t predicts t+1).

    `hidden`: the student's last hidden states [B, T, H] of `batch` (with grad); `head`: the lm_head
    whose weight both share (the frozen base head, as in the label-only cross-entropy); `transform`:
    (softcap, scale) of the final logits, q2g.scoring.logit_transform(config)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        return hidden.sum() * 0.0
    hs = hidden[:, :-1][keep]
    hb = base_hidden(peft_model, decoder, batch)[:, :-1][keep].to(hs.dtype)
    return chunked_kl_sum(hs, hb, head.weight, head.bias, chunk_size, *transform)
