"""The label-only chunked loss equals the plain `model(**batch).loss` (loss and LoRA gradients, fp32)
on the tiny Qwen2 and Gemma3, also under the Trainer with gradient accumulation, and never builds
a [batch, seq, vocab] tensor."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from q2g.examples import IGNORE_INDEX, Collator
from q2g.finetune.loss import LabelOnlyLossTrainer, chunked_linear_cross_entropy, label_only_loss_sum, split_causal_lm

TOL = 1e-5


def lora_model(folder, softcap=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    # init_lora_weights=False: B is random too, so the adapter's A gets a non-zero gradient
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(model, cfg)


def examples(n=4, seed=0, vocab=200):
    """Rows of different lengths, prompt masked with -100 (as finetune.build_example makes them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length, prompt = 9 + 5 * i, 3 + i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def folder(request, kind):
    return request.getfixturevalue("tiny_gemma_dir" if kind == "gemma3" else "tiny_qwen_dir")


@pytest.mark.parametrize("kind,softcap", [("qwen2", None), ("gemma3", None), ("gemma3", 3.0)])
def test_chunked_loss_and_lora_grads_equal_plain(request, kind, softcap):
    path = folder(request, kind)
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    batch = Collator(pad)(examples())
    model = lora_model(path, softcap)
    plain = model(**batch).loss
    plain.backward()
    want = lora_grads(model)
    model.zero_grad()

    decoder, head, config = split_causal_lm(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    total, n = label_only_loss_sum(hidden, batch["labels"], head, config, chunk_size=7, fused="never")
    loss = total / n
    loss.backward()
    got = lora_grads(model)

    assert n.item() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert abs(loss.item() - plain.item()) <= TOL
    assert want.keys() == got.keys() and len(got) == 2 * 2 * 2  # 2 layers x q,v x A,B
    for name in want:
        assert want[name].abs().max() > 0, name
        assert (got[name] - want[name]).abs().max().item() <= TOL, name


def test_chunked_function_matches_dense_with_weight_and_bias_grads():
    torch.manual_seed(0)
    h = torch.randn(10, 6, requires_grad=True)
    w, b = torch.randn(13, 6, requires_grad=True), torch.randn(13, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    for cap, scale in [(None, 1.0), (2.0, 0.5)]:
        z = (h @ w.t() + b) * scale
        z = cap * torch.tanh(z / cap) if cap else z
        want = torch.nn.functional.cross_entropy(z, y, reduction="sum")
        gw = torch.autograd.grad(want, (h, w, b))
        got = chunked_linear_cross_entropy(h, w, y, b, chunk_size=3, softcap=cap, scale=scale)
        gg = torch.autograd.grad(got * 1.0, (h, w, b))
        assert abs(got.item() - want.item()) < 1e-4
        for a, c in zip(gw, gg):
            assert (a - c).abs().max().item() < 1e-5


class VocabShapes(TorchDispatchMode):
    """Records the shape of every op output whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.dim() != 1:
                self.shapes.append(tuple(t.shape))
        return out


def test_chunked_path_never_builds_full_logits(tiny_gemma_dir):
    batch = Collator(0)(examples())
    model = lora_model(tiny_gemma_dir)
    decoder, head, config = split_causal_lm(model)
    vocab = head.weight.shape[0]
    calls = []
    head.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    with VocabShapes(vocab) as mode:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        total, _ = label_only_loss_sum(hidden, batch["labels"], head, config, chunk_size=4, fused="never")
        total.backward()
    assert calls == []  # the lm_head module is never run on hidden states
    weight = {tuple(head.weight.shape), tuple(head.weight.t().shape)}  # the weight itself, [V, H] or [H, V]
    logit_shapes = [s for s in mode.shapes if s not in weight]
    assert logit_shapes and all(s[0] <= 4 and len(s) == 2 for s in logit_shapes), set(logit_shapes)
    with VocabShapes(vocab) as mode:  # the check itself sees the plain path's logits
        model(**batch).loss.backward()
    assert (*batch["input_ids"].shape, vocab) in mode.shapes


def train_one_step(trainer_cls, path, tmp_path, collator=None, **kw):
    model = lora_model(path)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        label_names=["labels"],
        train_sampling_strategy="sequential",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_cls(
        model=model, args=args, train_dataset=examples(4), data_collator=collator or Collator(0), **kw
    )
    trainer.train()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, delta


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_trainer_step_equals_plain_trainer_with_accumulation(request, kind, tmp_path):
    """Rows with unequal label counts over 2 accumulated batches: the same loss and the same SGD
    update (lr 1, no clipping: the update is minus the gradient) as the stock Trainer."""
    path = folder(request, kind)
    want_loss, want = train_one_step(Trainer, path, tmp_path / "plain")
    got_loss, got = train_one_step(LabelOnlyLossTrainer, path, tmp_path / "chunked", loss_chunk_size=5)
    assert abs(got_loss - want_loss) <= TOL
    for name in want:
        assert want[name].abs().max() > 0
        assert (got[name] - want[name]).abs().max().item() <= TOL, name


def test_packed_batches_train_the_same_step(tiny_gemma_dir, tmp_path):
    from helpers import PackedCollator

    want_loss, want = train_one_step(Trainer, tiny_gemma_dir, tmp_path / "plain")
    got_loss, got = train_one_step(
        LabelOnlyLossTrainer, tiny_gemma_dir, tmp_path / "packed", collator=PackedCollator()
    )
    assert abs(got_loss - want_loss) <= TOL
    assert all((got[n] - want[n]).abs().max().item() <= TOL for n in want)


def test_liger_path_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    head = torch.nn.Linear(4, 9, bias=False)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        label_only_loss_sum(torch.randn(1, 3, 4), torch.tensor([[1, 2, 3]]), head, object(), fused="liger")
