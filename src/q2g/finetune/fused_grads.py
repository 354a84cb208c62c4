"""The bookkeeping shared by q2g's fused linear losses (loss._ChunkedLinearCE, kl_anchor's
ChunkedKL): each takes d loss / d logits of one chunk in the forward, turns it into the gradients
of the hidden rows, the head weight and bias here, and its backward only scales them."""

from __future__ import annotations


def logits(h, weight, bias, softcap, scale):
    """(fp32 logits cap * tanh(scale * (h W^T + b) / cap), the tanh or None): the model's final logits."""
    import torch

    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float() * scale
    if softcap is None:
        return z, None
    capped = torch.tanh(z / softcap)
    return capped * softcap, capped


def through_transform(dz, capped, scale: float):
    """d loss / d logits -> d loss / d (h W^T + b), in place: back through the cap and the scale."""
    if capped is not None:
        dz *= 1 - capped.square()
    if scale != 1.0:
        dz *= scale
    return dz


def buffers(h, weight, bias):
    """Zeroed (grad_h, grad_w, grad_b), each None where that input needs no gradient."""
    import torch

    grad_h = torch.zeros_like(h) if h.requires_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
    return grad_h, grad_w, grad_b


def accumulate(grads, sl: slice, dz, h, weight) -> None:
    """Add one chunk's d loss / d logits `dz` [chunk, V] (rows `sl` of h) into `grads`."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[sl] = (dz.to(weight.dtype) @ weight).to(h.dtype)
    if grad_w is not None:
        grad_w += dz.t() @ h[sl].float()
    if grad_b is not None:
        grad_b += dz.sum(0)


def save(ctx, grads, weight, bias) -> None:
    ctx.save_for_backward(*grads)
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)


def scaled(ctx, grad_out) -> tuple:
    """The saved (grad_h, grad_w, grad_b) times the incoming gradient, in the inputs' dtypes."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
    gw = (grad_w * grad_out).to(ctx.dtypes[0]) if grad_w is not None else None
    gb = (grad_b * grad_out).to(ctx.dtypes[1]) if grad_b is not None else None
    return gh, gw, gb
