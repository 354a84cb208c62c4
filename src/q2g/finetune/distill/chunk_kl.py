"""Off-policy token-level distillation across tokenizers (`--distill chunk-likelihood`): the math.

    total = ce_sum + weight * distill_sum(hidden, labels, batch["distill_chunk"], batch["distill_teacher"],
                                          head, logit_transform(config), chunk_size)

The teacher (Qwen) and the student (Gemma) tokenize a trace differently, so their token
distributions cannot be compared position by position. Both can be compared on *chunks*: spans
of the trace text where both tokenizations end on the same byte (q2g.finetune.distill.data builds
them; ALM, Minixhofer et al. 2025). A chunk's log-likelihood is the sum of the token log-probs
inside it, on each side. Per chunk the loss is ALM's binarised KL

    KL(Bern(p_t) || Bern(p_s)) = p_t (l_t - l_s) + (1 - p_t) (log1mexp(l_t) - log1mexp(l_s)),

with l = the chunk log-likelihood and p = exp(l): zero, with zero gradient, where l_s = l_t, and
d/dl_s = (p_s - p_t) / (1 - p_s). It is computed in float64 from l (log1mexp is stable), and l is
clamped at LOGP_MAX on both sides so a chunk the model finds certain (l rounds to 0 in fp32, where
log1mexp is -inf) gives a finite value.

The student's token log-probs come from the label-only chunked projection (no [B, T, V] tensor):
only the hidden rows whose label lies in a chunk are projected, CHUNK rows at a time, through the
model's final-logit transform (q2g.fused_grads). Each token's log-prob gets its own incoming
gradient, so the backward builds each [chunk, V] block again (one alive at a time): d log p_y /
d z = onehot(y) - softmax(z), times the token's incoming gradient, back through the transform.

Normalisation: the caller adds `weight * distill_sum` to the cross-entropy *sum* and divides both
by the Trainer's `num_items_in_batch` (the label tokens of the whole accumulated batch), as the KL
anchor does. So W weighs "binarised KL per trained token" against "CE per trained token", and the
step is the same whatever the split into micro-batches (a mean over each micro-batch's chunks,
summed over the accumulation steps, would not be). A per-chunk mean would be this times (label
tokens / chunks): about 1.05 for the real Qwen2 and Gemma 3 tokenizers on the shipped traces (1.03
Gemma tokens per chunk, plus the end token), so W means nearly the same either way.
"""

from __future__ import annotations

import math

from q2g.finetune import fused_grads

LOGP_MAX = math.log1p(-1e-6)  # chunk log-likelihoods are clamped here: p <= 1 - 1e-6
NO_CHUNK = -1  # distill_chunk of a position whose label is in no chunk (prompt, end token, padding)


def _logprob_function():
    """The autograd Function, built on first use (torch is imported lazily in this module)."""
    import torch

    class LabelLogProbs(torch.autograd.Function):
        """log softmax(f(h_i W^T + b))[y_i] for each row i, in chunks; the backward recomputes each chunk."""

        @staticmethod
        def forward(ctx, h, weight, bias, targets, chunk_size, softcap, scale):
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                z, _ = fused_grads.logits(h[sl], weight, bias, softcap, scale)
                out[sl] = z.gather(1, targets[sl, None])[:, 0] - torch.logsumexp(z, dim=-1)
                del z
            ctx.save_for_backward(h, weight, bias, targets)
            ctx.settings = (chunk_size, softcap, scale)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            h, weight, bias, targets = ctx.saved_tensors
            chunk_size, softcap, scale = ctx.settings
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grads = (
                torch.zeros_like(h) if need_h else None,
                torch.zeros_like(weight, dtype=torch.float32) if need_w else None,
                torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None,
            )
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                g = grad_out[sl].float()
                z, capped = fused_grads.logits(h[sl], weight, bias, softcap, scale)
                dz = torch.softmax(z, dim=-1).mul_(-g[:, None])  # d/dz (g log p_y) = g (onehot - softmax)
                del z
                dz[torch.arange(len(g), device=dz.device), targets[sl]] += g
                fused_grads.through_transform(dz, capped, scale)
                fused_grads.accumulate(grads, sl, dz, h, weight)
            gh, gw, gb = grads
            gw = gw.to(weight.dtype) if gw is not None else None
            gb = gb.to(bias.dtype) if gb is not None else None
            return gh, gw, gb, None, None, None, None

    return LabelLogProbs


_FUNCTION = []


def label_logprobs(h, weight, targets, bias=None, chunk_size: int = 1024, softcap=None, scale: float = 1.0):
    """[N] fp32 log-probs of `targets` under logits transform(h W^T + b), one [chunk, V] block at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not _FUNCTION:
        _FUNCTION.append(_logprob_function())
    return _FUNCTION[0].apply(h, weight, bias, targets, chunk_size, softcap, scale)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012: switch at -log 2)."""
    import torch

    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binarised_kl(student, teacher):
    """Per chunk KL(Bern(exp(teacher)) || Bern(exp(student))) of chunk log-likelihoods, in float64."""
    import torch

    s = student.double().clamp(max=LOGP_MAX)
    t = teacher.double().clamp(max=LOGP_MAX)
    return t.exp() * (t - s) - torch.expm1(t) * (log1mexp(t) - log1mexp(s))


def chunk_loglik(token_lp, chunk_index, n_chunks: int):
    """Sum of the token log-probs `token_lp` [N] into `n_chunks` chunks by `chunk_index` [N]."""
    import torch

    out = torch.zeros(n_chunks, dtype=token_lp.dtype, device=token_lp.device)
    return out.index_add(0, chunk_index, token_lp)


def distill_sum(hidden, labels, chunk_ids, teacher, head, transform=(None, 1.0), chunk_size: int = 1024):
    """Sum over the batch's chunks of KL(Bern(p_teacher) || Bern(p_student)) (see the module docstring).

    hidden [B, T, H] (with grad), labels [B, T]; chunk_ids [B, T]: the chunk (0..C-1 of its example)
    of the label at each position, NO_CHUNK elsewhere; teacher [B, C]: the teacher's chunk
    log-likelihoods, NaN past an example's last chunk; transform: q2g.scoring.logit_transform(config).
    """
    import torch

    ids = chunk_ids[:, 1:].to(hidden.device)  # position t predicts the label at t + 1
    keep = ids != NO_CHUNK
    teacher = teacher.to(hidden.device)
    if not keep.any():
        return hidden.sum() * 0.0
    width = teacher.shape[1]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    where = (rows * width + ids)[keep]
    token_lp = label_logprobs(
        hidden[:, :-1][keep], head.weight, labels[:, 1:][keep], head.bias, chunk_size, *transform
    )
    student = chunk_loglik(token_lp, where, teacher.numel())
    flat = teacher.flatten()
    valid = ~torch.isnan(flat)
    return binarised_kl(student[valid], flat[valid]).sum().float()
