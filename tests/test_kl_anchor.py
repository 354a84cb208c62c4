"""--kl-to-base: the chunked KL(student || base) equals the dense one computed from full logits
(value and LoRA gradients), BETA=0 leaves the loss and the update exactly as today, and BETA>0
adds BETA x KL to the Trainer's loss as computed by hand."""

import pytest
import torch
import torch.nn.functional as F
from test_loss import examples, lora_grads, lora_model, train_one_step
from transformers import AutoTokenizer

from q2g.examples import IGNORE_INDEX, Collator
from q2g.finetune.kl_anchor import check_init, kl_to_base_sum
from q2g.finetune.loss import LabelOnlyLossTrainer, logit_transform, split_causal_lm

TOL = 1e-5


def dense_kl(model, batch) -> torch.Tensor:
    """sum over label positions of KL(student || base), from the full [B, T, V] logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    ls, lb = F.log_softmax(logits[keep].float(), -1), F.log_softmax(base[keep].float(), -1)
    return F.kl_div(lb, ls, log_target=True, reduction="sum")  # = sum p_s (log p_s - log p_b)


@pytest.mark.parametrize("kind,softcap", [("qwen2", None), ("gemma3", 3.0)])
def test_chunked_kl_equals_dense_value_and_grads(request, kind, softcap):
    path = request.getfixturevalue("tiny_gemma_dir" if kind == "gemma3" else "tiny_qwen_dir")
    batch = Collator(AutoTokenizer.from_pretrained(path).pad_token_id)(examples())
    model = lora_model(path, softcap)  # B random: the student differs from the base
    want = dense_kl(model, batch)
    want.backward()
    want_grads = lora_grads(model)
    model.zero_grad()

    decoder, head, config = split_causal_lm(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden = decoder(**inputs).last_hidden_state
    got = kl_to_base_sum(model, decoder, inputs, hidden, batch["labels"], head, logit_transform(config), chunk_size=5)
    got.backward()
    assert want.item() > 1e-4  # a real difference to anchor against
    assert abs(got.item() - want.item()) <= TOL * max(1.0, want.item())
    for name, g in lora_grads(model).items():
        assert want_grads[name].abs().max() > 0, name
        assert (g - want_grads[name]).abs().max().item() <= TOL, name


def test_kl_is_zero_for_the_untrained_adapter(tiny_gemma_dir):
    """peft's default init (B = 0): the student is the base, so the anchor adds nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    batch = Collator(0)(examples())
    decoder, head, config = split_causal_lm(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kl = kl_to_base_sum(model, decoder, inputs, decoder(**inputs).last_hidden_state, batch["labels"], head)
    assert abs(kl.item()) <= 1e-6


def test_beta_zero_gives_exactly_todays_step(tiny_qwen_dir, tmp_path):
    want_loss, want = train_one_step(LabelOnlyLossTrainer, tiny_qwen_dir, tmp_path / "a", loss_chunk_size=5)
    got_loss, got = train_one_step(
        LabelOnlyLossTrainer, tiny_qwen_dir, tmp_path / "b", loss_chunk_size=5, kl_to_base=0.0
    )
    assert got_loss == want_loss
    assert all(torch.equal(got[n], want[n]) for n in want)
    kl_loss, kl = train_one_step(
        LabelOnlyLossTrainer, tiny_qwen_dir, tmp_path / "c", loss_chunk_size=5, kl_to_base=1.0
    )
    assert kl_loss > want_loss  # the KL of the random-B adapter is added
    assert any(not torch.allclose(kl[n], want[n]) for n in want)


def test_trainer_loss_is_ce_plus_beta_kl_by_hand(tiny_gemma_dir, tmp_path):
    from transformers import TrainingArguments

    model = lora_model(tiny_gemma_dir)
    batch = Collator(0)(examples())
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", label_names=["labels"])
    trainer = LabelOnlyLossTrainer(model=model, args=args, loss_chunk_size=7, kl_to_base=0.25)
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    with torch.no_grad():
        ce = model(**batch).loss.item()  # mean CE over the label tokens
        want = ce + 0.25 * dense_kl(model, batch).item() / n.item()
    assert abs(got.item() - want) <= TOL


def test_kl_with_a_residual_init_is_refused():
    assert check_init(0.0, "pissa") is None and check_init(0.1, "gaussian") is None
    assert "replaces them by a residual" in check_init(0.1, "pissa_niter_4")


def test_kl_with_several_processes_is_refused():
    from q2g.errors import ConfigError
    from q2g.finetune.kl_anchor import check_processes

    check_processes(0.0, 4)
    check_processes(0.1, 1)
    with pytest.raises(ConfigError, match="--kl-to-base runs in one process"):
        check_processes(0.1, 2)


def test_kl_path_never_builds_full_logits(tiny_gemma_dir):
    """Every [*, vocab] block the anchor builds (forward and backward) has at most `chunk` rows."""
    from test_loss import VocabShapes

    model = lora_model(tiny_gemma_dir)
    batch = Collator(0)(examples())
    decoder, head, config = split_causal_lm(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden = decoder(**inputs).last_hidden_state
    vocab = head.weight.shape[0]
    with VocabShapes(vocab) as mode:
        kl_to_base_sum(model, decoder, inputs, hidden, batch["labels"], head, chunk_size=4).backward()
    weight = {tuple(head.weight.shape), tuple(head.weight.t().shape)}
    shapes = [s for s in mode.shapes if s not in weight]
    assert shapes and all(len(s) == 2 and s[0] <= 4 for s in shapes), set(shapes)
