"""The non-finite guard on the tiny Gemma3: a NaN injected at optimizer step 2 (a forward hook on
the embeddings) stops the run with NonFiniteError, or in skip mode leaves the LoRA weights and
the AdamW state untouched on that step and counts it."""

import pytest
import torch
from helpers import tiny_training_args
from test_loss import examples, lora_model
from transformers import Trainer, TrainerCallback

from q2g.examples import Collator
from q2g.finetune.loss import LabelOnlyLossTrainer
from q2g.guards import NonFiniteError, NonFiniteGuard


class Inject(TrainerCallback):
    """Makes the embeddings' output NaN during the optimizer steps in `bad` (1-based) and keeps a
    copy of the trainable weights before and after every step."""

    def __init__(self, model, bad):
        self.bad, self.on, self.before, self.after = set(bad), False, {}, {}
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda mod, inp, out: out * float("nan") if self.on else out)

    def snapshot(self, model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.on = state.global_step + 1 in self.bad
        self.before[state.global_step + 1] = self.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = self.snapshot(model)


def run(tiny_gemma_dir, tmp_path, guard, bad, trainer_cls=LabelOnlyLossTrainer, steps=3):
    model = lora_model(tiny_gemma_dir)
    inject = Inject(model, bad)
    args = tiny_training_args(tmp_path, steps)
    kw = {"nonfinite_guard": guard} if trainer_cls is LabelOnlyLossTrainer else {"callbacks": [guard]}
    trainer = trainer_cls(model=model, args=args, train_dataset=examples(6), data_collator=Collator(0), **kw)
    trainer.add_callback(inject)
    trainer.train()
    return trainer, inject


def changed(a, b):
    return any(not torch.equal(a[n], b[n]) for n in a)


def test_nan_loss_stops_with_step_value_and_last_adapter(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard(last_good_adapter="ckpt/epoch-1")
    with pytest.raises(NonFiniteError) as e:
        run(tiny_gemma_dir, tmp_path, guard, bad={2})
    msg = str(e.value)
    assert msg.startswith("step 2: non-finite loss (nan)") and "Last good adapter: ckpt/epoch-1" in msg


def test_plain_trainer_guard_sees_the_gradient_norm(tiny_gemma_dir, tmp_path):
    with pytest.raises(NonFiniteError, match=r"^step 1: non-finite gradient norm \(nan\).*none saved yet"):
        run(tiny_gemma_dir, tmp_path, NonFiniteGuard(), bad={1}, trainer_cls=Trainer)


def test_skip_mode_leaves_weights_and_adam_state_and_counts(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard(skip=True, max_consecutive=2)
    trainer, inject = run(tiny_gemma_dir, tmp_path, guard, bad={2})
    assert guard.skips == 1 and guard.skipped_steps == [2] and guard.metrics() == {"nonfinite_skips": 1}
    assert not changed(inject.before[2], inject.after[2])  # the bad step did nothing
    assert changed(inject.before[1], inject.after[1]) and changed(inject.before[3], inject.after[3])
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # AdamW stepped twice, not three times (moments untouched on the bad step)
    assert all(torch.isfinite(p).all() for p in inject.after[3].values())


def test_too_many_consecutive_skips_still_stop(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard(skip=True, max_consecutive=1)
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite loss \(nan\) after 1 skipped steps in a row"):
        run(tiny_gemma_dir, tmp_path, guard, bad={2, 3}, steps=4)
    assert guard.skips == 1
