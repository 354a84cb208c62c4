"""Non-finite guard: a NaN or inf loss or gradient norm stops the run, or (if asked) skips the step.

    guard = NonFiniteGuard(skip=False)                       # stop at the first bad step
    guard = NonFiniteGuard(skip=True, max_consecutive=3)     # skip bad steps; a 4th in a row stops
    trainer = LabelOnlyLossTrainer(..., nonfinite_guard=guard)   # or Trainer(callbacks=[guard])
    guard.last_good_adapter = "checkpoints/epoch-1"          # named in the error message

It is a TrainerCallback. Before every optimizer step (`on_pre_optimizer_step`, after the Trainer
has clipped the gradients) it checks the gradient norm of the trainable parameters and any loss
reported to `observe_loss` since the last step (LabelOnlyLossTrainer reports every micro-batch;
under a plain Trainer only the gradients are checked). A bad step either raises NonFiniteError or
sets every trainable `.grad` to None: torch's AdamW (and bitsandbytes' 8-bit AdamW) skip a
parameter without a gradient, so its weights, moments and step count stay as they were. The
learning-rate schedule still advances one step. `guard.skips` counts skipped steps, for the
`nonfinite_skips` field of the metrics row.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from q2g.errors import RunFailed


class NonFiniteError(RunFailed):
    """A NaN or inf loss or gradient norm; the message names the step, the value and the last
    good adapter folder."""


class NonFiniteGuard(TrainerCallback):
    def __init__(self, skip: bool = False, max_consecutive: int = 3, last_good_adapter: str | None = None):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.skip, self.max_consecutive, self.last_good_adapter = skip, max_consecutive, last_good_adapter
        self.skips = 0  # optimizer steps skipped in this run
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self._bad_loss: float | None = None

    def observe_loss(self, loss, step: int) -> None:
        """Record one micro-batch's loss (a tensor or float) for the coming optimizer `step`."""
        value = float(loss.detach().float().item()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value) and self._bad_loss is None:
            self._bad_loss = value
        if not math.isfinite(value) and not self.skip:  # stop now: no backward of later micro-batches
            self._fail(step, "loss", value)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        norm = grad_norm(params)
        what, value = ("loss", self._bad_loss) if self._bad_loss is not None else ("gradient norm", norm)
        self._bad_loss = None
        if math.isfinite(value):
            self.consecutive = 0
            return control
        if not self.skip:
            self._fail(step, what, value)
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            self._fail(step, what, value, f" after {self.max_consecutive} skipped steps in a row")
        for p in params:
            p.grad = None
        self.skips += 1
        self.skipped_steps.append(step)
        print(
            f"[finetune] step {step}: non-finite {what} ({value}); optimizer step skipped "
            f"({self.skips} so far, {self.consecutive} in a row)",
            flush=True,
        )
        return control

    def _fail(self, step: int, what: str, value: float, why: str = "") -> None:
        last = self.last_good_adapter or "none saved yet"
        raise NonFiniteError(
            f"step {step}: non-finite {what} ({value}){why}; training stopped. "
            f"Last good adapter: {last}. Lower the learning rate, check the data, or "
            f"skip such steps (NonFiniteGuard(skip=True))"
        )

    def metrics(self) -> dict:
        """Fields for the metrics row."""
        return {"nonfinite_skips": self.skips}


def grad_norm(params) -> float:
    """Global L2 norm of the gradients (inf or nan if any gradient is); 0.0 with none."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
