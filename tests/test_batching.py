"""Padding share, length grouping, and the Gemma 3 NaN from right padding + sliding windows.

The NaN needs an attention kernel that, like fused GPU kernels, returns NaN for a query row that
sees no key; torch's CPU kernel returns 0 there. `strict` below is that kernel in plain PyTorch
(masked scores = -inf, no guard), registered as a transformers attention implementation, so the
failure and its fix are tested on the CPU in fp32.
"""

import pytest
import torch
from helpers import PackedCollator, fully_masked_rows, sliding_windows
from transformers import AttentionInterface, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask, sliding_window_causal_mask_function

from q2g.batching import (
    causal_inputs,
    is_right_padded,
    padding_report,
    padding_share,
    trainer_order,
)
from q2g.examples import IGNORE_INDEX, Collator


def test_padding_share_by_hand():
    assert padding_share([[3, 5], [4, 4]]) == pytest.approx(2 / 18)  # 10 + 8 slots, 16 real tokens
    assert padding_share([[7]]) == 0.0 and padding_share([]) == 0.0


def test_length_grouping_cuts_padding():
    lengths = [20 + (i * 37) % 500 for i in range(256)]  # 20..519, well mixed
    report = padding_report(lengths, batch_size=8, grad_accum=2)
    assert report["group_by_length"] < 0.1 < 0.3 < report["random"]  # (mega-batches of 64 here: 8.6%)
    batches = trainer_order(lengths, 8, 2, "group_by_length")
    assert sorted(n for b in batches for n in b) == sorted(lengths)  # every row once
    assert max(batches[0]) == max(lengths)  # the longest batch first: an OOM shows at step 1


def test_causal_inputs_drops_only_a_right_padding_mask():
    right = {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    left = {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}
    assert is_right_padded(right["attention_mask"]) and not is_right_padded(left["attention_mask"])
    assert "attention_mask" not in causal_inputs(right) and causal_inputs(left) is left


@pytest.mark.parametrize("window", [2, 4, 7])
def test_fully_masked_rows_match_transformers_sliding_mask(window):
    mask2d = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate([12, 5, 2]):
        mask2d[i, :n] = 1
    mask = sdpa_mask(
        batch_size=3,
        q_length=12,
        kv_length=12,
        attention_mask=mask2d.bool(),
        mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
    )
    assert fully_masked_rows(mask2d, window) == int((~mask.any(-1)).sum())


def strict_attention(module, q, k, v, mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    k, v = repeat_kv(k, module.num_key_value_groups), repeat_kv(v, module.num_key_value_groups)
    s = (q @ k.transpose(2, 3)) * scaling
    if mask is None:  # no mask: sdpa's is_causal
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).tril(m - n)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")).float(), -1).to(q.dtype)
    return (p @ v).transpose(1, 2).contiguous(), p


AttentionInterface.register("strict", strict_attention)
AttentionMaskInterface.register("strict", sdpa_mask)


def sliding_gemma(attn: str):
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg)


def padded_batch():
    """A 20-token row and a 5-token row, padded by q2g's Collator: positions 8..19 of the short row
    see only padding in the window-4 layer."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (20, 5)]
    return Collator(0)([{"input_ids": r, "labels": [IGNORE_INDEX] * 2 + r[2:]} for r in rows])


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_right_padding_nans_a_strict_kernel_and_dropping_the_mask_fixes_it():
    batch = padded_batch()
    assert sliding_windows(sliding_gemma("eager").config) == [4]
    assert fully_masked_rows(batch["attention_mask"], 4) == 12
    loss, grads = loss_and_grads(sliding_gemma("strict"), batch)
    assert loss != loss and any(g.isnan().any() for g in grads)  # the bug: NaN loss and gradients

    want, want_grads = loss_and_grads(sliding_gemma("eager"), batch)  # eager's finite -inf stand-in hides it
    got, got_grads = loss_and_grads(sliding_gemma("strict"), causal_inputs(batch))
    assert abs(got - want) <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(want_grads, got_grads))


def test_label_only_trainer_drops_the_mask_by_default(tmp_path):
    from transformers import TrainingArguments

    from q2g.finetune.loss import LabelOnlyLossTrainer

    batch, model = padded_batch(), sliding_gemma("strict")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", label_names=["labels"])
    want, _ = loss_and_grads(sliding_gemma("eager"), batch)
    for drop, finite in [(True, True), (False, False)]:
        loss = LabelOnlyLossTrainer(model=model, args=args, drop_right_padding_mask=drop).compute_loss(model, batch)
        assert bool(torch.isfinite(loss)) == finite
        if finite:
            assert abs(loss.item() - want) <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "gemma3-window-4"])
def test_packed_batch_equals_padded_batch(request, kind):
    """One packed row with per-example positions: the same loss and LoRA gradients as the padded
    batch (no attention across examples, sliding windows included)."""
    from test_loss import examples, lora_grads, lora_model

    path = request.getfixturevalue("tiny_qwen_dir" if kind == "qwen2" else "tiny_gemma_dir")
    rows = examples(4)
    padded, packed = Collator(0)(rows), PackedCollator()(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    results = []
    for batch in (padded, packed):
        model = lora_model(path)
        if kind != "qwen2":
            model.config.sliding_window = 4
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), lora_grads(model)))
    (want, want_grads), (got, got_grads) = results
    assert abs(got - want) <= 1e-5
    for name in want_grads:
        assert (got_grads[name] - want_grads[name]).abs().max() <= 1e-5, name


def test_left_padding_nans_a_strict_kernel_and_the_guarded_mask_fixes_it():
    """Generation pads on the left: a padded query sees only padding in every layer. The guarded
    sdpa mask unmasks such rows, and every real token's logits equal eager's."""
    from q2g.batching import use_guarded_sdpa

    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(3, 64, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    assert sliding_gemma("strict")(input_ids=ids, attention_mask=mask).logits[1, 5:].isnan().all()
    want = sliding_gemma("eager")(input_ids=ids, attention_mask=mask).logits
    model = use_guarded_sdpa(sliding_gemma("strict"), strict_attention)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa_guarded_strict_attention"
    assert (got[0] - want[0]).abs().max() <= 1e-5 and (got[1, 5:] - want[1, 5:]).abs().max() <= 1e-5
    assert torch.isfinite(got).all()
    real = use_guarded_sdpa(sliding_gemma("sdpa"))  # the registered torch sdpa: the same numbers on the CPU
    assert (real(input_ids=ids, attention_mask=mask).logits[1, 5:] - want[1, 5:]).abs().max() <= 1e-5
