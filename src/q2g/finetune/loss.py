"""Causal-LM loss without the [batch, seq, vocab] logits: project only where a label is.

    trainer = LabelOnlyLossTrainer(model=peft_model, args=targs, ..., loss_chunk_size=1024)

A plain `model(**batch).loss` builds logits for every position (batch x seq x vocab, upcast to
fp32: 8 x 1024 x 256000 x 4 bytes = 8.4 GB for Gemma, twice that with the gradient). Here the
backbone returns hidden states, only the positions whose shifted label is not -100 are kept
(position t predicts labels[t+1], as in transformers' ForCausalLMLoss), and the cross-entropy is
computed over them in chunks whose gradient is taken inside the forward (the Liger Kernel trick):
at most one [chunk, vocab] fp32 block is alive at a time, in the forward and in the backward.
On CUDA with `liger_kernel` installed its fused Triton kernel does the same work faster.

The loss is the sum over label tokens divided by the Trainer's `num_items_in_batch` (the label
tokens of the whole accumulated batch), exactly as the model's own loss under the Trainer.
The same with one process or many: the (DDP-wrapped) model's own forward runs, asked for the
last position's logits only (`logits_to_keep=1`), and a forward hook on its decoder takes the
final hidden states, so DDP sees every forward it must see and no [B, T, V] tensor is built.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers import Trainer

from q2g.batching import causal_inputs
from q2g.examples import IGNORE_INDEX
from q2g.finetune import fused_grads
from q2g.finetune.distill.chunk_kl import distill_sum
from q2g.finetune.kl_anchor import kl_to_base_sum
from q2g.optional import install_hint, is_available
from q2g.scoring import logit_transform, split_causal_lm


def select_label_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, H], labels [B, T] -> (hidden rows [N, H] that predict a label, targets [N])."""
    shift = labels[:, 1:]
    keep = shift != IGNORE_INDEX
    return hidden[:, :-1][keep], shift[keep]


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(transform(h_i @ W.T + b), y_i), with d/dh (and d/dW, d/db when needed) computed
    chunk by chunk in the forward; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, softcap, scale):
        grads = fused_grads.buffers(h, weight, bias)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start : start + chunk_size], targets[start : start + chunk_size]
            z, capped = fused_grads.logits(hc, weight, bias, softcap, scale)
            logp = torch.log_softmax(z, dim=-1)
            total += -logp.gather(1, yc[:, None]).sum()
            dz = logp.exp_()  # softmax - onehot = d CE / d z (the log-probs are not needed again)
            dz[torch.arange(len(yc), device=dz.device), yc] -= 1
            fused_grads.through_transform(dz, capped, scale)
            del logp, z
            fused_grads.accumulate(grads, slice(start, start + chunk_size), dz, h, weight)
        fused_grads.save(ctx, grads, weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = fused_grads.scaled(ctx, grad_out)
        return gh, gw, gb, None, None, None, None


def chunked_linear_cross_entropy(
    h, weight, targets, bias=None, chunk_size: int = 1024, softcap: float | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy of logits transform(h @ W.T + b) against targets; fp32."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCE.apply(h, weight, bias, targets, chunk_size, softcap, scale)


def liger_linear_cross_entropy(h, weight, targets, bias=None, softcap: float | None = None) -> torch.Tensor:
    """Liger Kernel's fused linear cross-entropy (CUDA), summed. ImportError says what is wrong."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        if is_available("liger_kernel"):  # installed, but it (or its Triton) does not import
            raise ImportError(f"liger_kernel is installed but does not import ({e}); check its Triton") from e
        raise ImportError(f"the fused loss needs Liger Kernel: {install_hint('liger_kernel')}") from e
    kwargs = {"softcap": softcap} if softcap is not None else {}
    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", **kwargs)(
        weight, h, targets, bias
    )
    return out[0] if isinstance(out, tuple) else out


class LossPath:
    """What the loss ran: "liger" (fused Triton kernel), "chunked" (q2g's PyTorch path) or "plain"
    (the model's own loss, full logits), and why a fused path was left (`note`)."""

    def __init__(self, fused: str = "auto"):
        if fused not in ("auto", "liger", "never"):
            raise ValueError(f"fused must be auto, liger or never, got {fused!r}")
        self.fused, self.path, self.note, self.liger_failed = fused, None, None, False

    def info(self) -> dict:
        """The fields for config.json / the report."""
        return {"loss_path": self.path, "loss_fused": self.fused, "loss_note": self.note}


def planned_loss_path(device: str, config, fused: str = "auto") -> dict:
    """What the training loss will run, decided before training (for config.json): Liger where
    `fused` allows it, on CUDA, for a model without a logit scale, and its module imports; else
    the chunked path. The Trainer's `loss_info()` says what did run (a first-call failure falls back)."""
    path = LossPath(fused)
    _, scale = logit_transform(config)
    if fused == "never" or not device.startswith("cuda") or scale != 1.0 or not is_available("liger_kernel"):
        path.path = "chunked"
        return path.info()
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # a broken install (Triton): said here, and the chunked path runs
        path.path, path.note = "chunked", f"liger_kernel does not import ({type(e).__name__}: {e})"
        return path.info()
    path.path = "liger"
    return path.info()


def liger_eligible(h: torch.Tensor, scale: float) -> bool:
    """Liger's kernel runs on CUDA, for models without a logit scale (it has a softcap only)."""
    return h.is_cuda and scale == 1.0 and is_available("liger_kernel")


def _fused_or_none(h, lm_head, targets, softcap, scale, path: LossPath):
    """Liger's loss, or None where it is not to be used; a failing first call (a broken install,
    a Triton that cannot compile) falls back to the chunked path for the rest of the run, warned."""
    wanted = path.fused == "liger" or (path.fused == "auto" and liger_eligible(h, scale))
    if not wanted or path.liger_failed:
        return None
    try:
        out = liger_linear_cross_entropy(h, lm_head.weight, targets, lm_head.bias, softcap)
    except Exception as e:
        if path.fused == "liger" or path.path == "liger":  # insisted on, or worked before: a real error
            raise
        path.liger_failed = True
        path.note = f"Liger failed at its first call ({type(e).__name__}: {e}); the chunked loss is used"
        warnings.warn(f"[finetune] {path.note}", RuntimeWarning, stacklevel=3)
        return None
    path.path = "liger"
    return out


def label_only_loss_sum(
    hidden, labels, lm_head, config, chunk_size: int = 1024, fused: str = "auto", path: LossPath | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the shifted-label cross-entropy, number of label tokens) from the final hidden states.

    fused: "auto" = Liger's kernel on CUDA when installed (and the model has no logit scaling),
    else the chunked PyTorch path; "liger" = insist on Liger; "never" = always chunked. `path`
    (a LossPath, kept across calls) records what ran; its `fused` wins over the argument.
    """
    path = path or LossPath(fused)
    h, targets = select_label_positions(hidden, labels)
    softcap, scale = logit_transform(config)
    n = torch.tensor(targets.numel(), device=h.device)
    if targets.numel() == 0:  # a batch of prompts only: 0 with a graph, so backward still works
        return hidden.sum() * 0.0, n
    out = _fused_or_none(h, lm_head, targets, softcap, scale, path)
    if out is not None:
        return out, n
    path.path = "chunked"
    return chunked_linear_cross_entropy(h, lm_head.weight, targets, lm_head.bias, chunk_size, softcap, scale), n


def keeps_logits(model) -> bool:
    """Does the CausalLM's forward take `logits_to_keep` (transformers >= 4.50 decoders do)?"""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def decoder_hidden(model, unwrapped, inputs, drop_mask=True):
    """(the decoder's last hidden states, the batch it saw) of `inputs` through `model` (maybe
    DDP-wrapped; `unwrapped` is the peft/HF model inside it): the wrapper's forward runs with one
    kept logit, and the decoder's output is taken by a hook."""
    decoder, _, _ = split_causal_lm(unwrapped)
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    if drop_mask:
        batch = causal_inputs(batch)
    seen = {}

    def grab(module, args, output):
        seen["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(grab)
    try:
        model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["hidden"], batch


def label_only_loss(model, unwrapped, inputs, chunk_size=1024, path: LossPath | None = None, drop_mask=True):
    """(loss sum, label tokens) of a batch through `model` (maybe DDP-wrapped; see decoder_hidden)."""
    _, head, config = split_causal_lm(unwrapped)
    hidden, _ = decoder_hidden(model, unwrapped, inputs, drop_mask)
    return label_only_loss_sum(hidden, inputs["labels"], head, config, chunk_size, path=path)


class LabelOnlyLossTrainer(Trainer):
    """A Trainer whose training loss never builds full-vocabulary logits (see the module docstring).

    Extra arguments: loss_chunk_size (positions per fp32 log-softmax block), fused ("auto", "liger",
    "never"; what ran is `loss_info()`), nonfinite_guard (a q2g.guards.NonFiniteGuard: also added as a callback, and told
    every micro-batch's loss), drop_right_padding_mask (default True: a right-padded batch goes
    to the model without its attention mask, which changes no trained token and avoids the fully
    masked sliding-window rows that NaN Gemma 3 on GPU kernels; see q2g.batching). The mask stays
    in the batch, so the Trainer still counts non-padding tokens from it.
    """

    def __init__(
        self,
        *args,
        loss_chunk_size: int = 1024,
        fused: str = "auto",
        nonfinite_guard=None,
        drop_right_padding_mask: bool = True,
        kl_to_base: float = 0.0,
        distill_weight: float = 0.0,
        **kwargs,
    ):
        if nonfinite_guard is not None and nonfinite_guard not in (kwargs.get("callbacks") or []):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), nonfinite_guard]
        super().__init__(*args, **kwargs)
        self.loss_chunk_size, self.nonfinite_guard = loss_chunk_size, nonfinite_guard
        self.loss_path = LossPath(fused)
        if not keeps_logits(self.model):
            self.loss_path.path, self.loss_path.note = "plain", "the model's forward has no logits_to_keep"
        self.drop_right_padding_mask = drop_right_padding_mask
        self.kl_to_base = kl_to_base  # BETA of q2g.finetune.kl_anchor (0: the plain label-only loss)
        self.distill_weight = distill_weight  # W of q2g.finetune.distill.chunk_kl (0: off)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunks = {k: inputs.pop(k) for k in ("distill_chunk", "distill_teacher") if k in inputs}
        if return_outputs or "labels" not in inputs:  # evaluation with predictions: the plain path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.loss_path.path == "plain":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        first = self.loss_path.path is None
        unwrapped = self.accelerator.unwrap_model(model)
        decoder, head, config = split_causal_lm(unwrapped)
        hidden, batch = decoder_hidden(model, unwrapped, inputs, self.drop_right_padding_mask)
        labels = inputs["labels"]
        total, n = label_only_loss_sum(hidden, labels, head, config, self.loss_chunk_size, path=self.loss_path)
        if self.kl_to_base:  # + BETA x KL(student || base) on the same label tokens
            args = (unwrapped, decoder, batch, hidden, labels, head, logit_transform(config))
            total = total + self.kl_to_base * kl_to_base_sum(*args, self.loss_chunk_size)
        if self.distill_weight and chunks:  # + W x binarised chunk KL to the teacher (q2g.finetune.distill.chunk_kl)
            args = (hidden, labels, chunks["distill_chunk"], chunks["distill_teacher"], head, logit_transform(config))
            total = total + self.distill_weight * distill_sum(*args, self.loss_chunk_size)
        if first and self.is_world_process_zero():
            print(f"[finetune] loss: {self.loss_info_line()}", flush=True)
        if num_items_in_batch is None:  # the Trainer then divides by the accumulation steps itself
            return total / n.clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
        return loss

    def loss_info(self) -> dict:
        """What the loss ran (LossPath.info) and with how many processes."""
        return {**self.loss_path.info(), "loss_processes": self.args.world_size}

    def loss_info_line(self) -> str:
        i = self.loss_info()
        note = f" ({i['loss_note']})" if i["loss_note"] else ""
        return f"{i['loss_path']}, label tokens only, {i['loss_processes']} process(es){note}"

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_guard is not None:
            self.nonfinite_guard.observe_loss(loss, self.state.global_step + 1)
        return loss
