"""Which loss ran: the chunked path by default on the CPU, Liger where asked, and a Liger that fails
to import or at its first call (a stand-in module here) falls back to the chunked loss, warned."""

import importlib.machinery
import sys
import types

import pytest
import torch

from q2g.finetune import loss
from q2g.finetune.loss import LossPath, label_only_loss_sum


class Head(torch.nn.Module):
    def __init__(self, vocab=11, hidden=6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.bias = None


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[:, :2] = -100
    return hidden, labels


def stand_in_liger(monkeypatch, calls, fail_import=False):
    """liger_kernel as far as q2g sees it: installed, with a kernel that raises (no Triton here)."""
    pkg = types.ModuleType("liger_kernel")
    pkg.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    fused = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")

    class LigerFusedLinearCrossEntropyLoss:
        def __init__(self, **kw):
            pass

        def __call__(self, *a):
            calls.append(1)
            raise RuntimeError("triton: cannot compile for this device")

    fused.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, fused.__name__, None if fail_import else fused)
    monkeypatch.setattr(loss, "liger_eligible", lambda h, scale: True)  # as if on CUDA


def chunked_reference(head, hidden, labels):
    cfg = types.SimpleNamespace()
    return label_only_loss_sum(hidden, labels, head, cfg, 4, path=LossPath("never"))[0]


def test_cpu_default_is_the_chunked_path():
    head, (hidden, labels) = Head(), inputs()
    path = LossPath()
    label_only_loss_sum(hidden, labels, head, types.SimpleNamespace(), 4, path=path)
    assert path.info() == {"loss_path": "chunked", "loss_fused": "auto", "loss_note": None}


@pytest.mark.parametrize("fail_import", [False, True])
def test_failing_liger_falls_back_to_chunked_with_a_warning(monkeypatch, fail_import):
    torch.manual_seed(0)
    head, (hidden, labels) = Head(), inputs()
    calls = []
    stand_in_liger(monkeypatch, calls, fail_import)
    path = LossPath("auto")
    with pytest.warns(RuntimeWarning, match="Liger failed at its first call"):
        total, n = label_only_loss_sum(hidden, labels, head, types.SimpleNamespace(), 4, path=path)
    assert total.item() == pytest.approx(chunked_reference(head, hidden, labels).item(), rel=1e-6)
    assert n.item() == 10 and path.path == "chunked"
    assert ("does not import" if fail_import else "cannot compile") in path.note
    label_only_loss_sum(hidden, labels, head, types.SimpleNamespace(), 4, path=path)  # not tried again
    assert len(calls) == (0 if fail_import else 1)


def test_liger_insisted_on_raises_instead_of_falling_back(monkeypatch):
    head, (hidden, labels) = Head(), inputs()
    stand_in_liger(monkeypatch, [])
    with pytest.raises(RuntimeError, match="cannot compile"):
        label_only_loss_sum(hidden, labels, head, types.SimpleNamespace(), 4, path=LossPath("liger"))


def test_trainer_reports_the_path_it_ran(tiny_qwen_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from q2g.examples import Collator
    from q2g.finetune.loss import LabelOnlyLossTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    rows = [{"input_ids": list(range(3, 12)), "labels": [-100] * 3 + list(range(6, 12))}] * 2
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to="none", save_strategy="no")
    trainer = LabelOnlyLossTrainer(
        model=model, args=args, train_dataset=rows, data_collator=Collator(0), loss_chunk_size=4
    )
    assert trainer.loss_info()["loss_path"] is None  # nothing ran yet
    trainer.train()
    assert trainer.loss_info() == {
        "loss_path": "chunked",
        "loss_fused": "auto",
        "loss_note": None,
        "loss_processes": 1,
    }


def test_planned_path_before_training(monkeypatch):
    from q2g.finetune.loss import planned_loss_path

    cfg = types.SimpleNamespace()
    assert planned_loss_path("cpu", cfg)["loss_path"] == "chunked"
    stand_in_liger(monkeypatch, [], fail_import=True)
    planned = planned_loss_path("cuda", cfg)
    assert planned["loss_path"] == "chunked" and "does not import" in planned["loss_note"]
    stand_in_liger(monkeypatch, [])
    assert planned_loss_path("cuda", cfg)["loss_path"] == "liger"
    assert planned_loss_path("cuda", cfg, fused="never")["loss_path"] == "chunked"
    assert planned_loss_path("cuda", types.SimpleNamespace(logit_scale=0.5))["loss_path"] == "chunked"
