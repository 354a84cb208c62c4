"""Evaluation's padded batches under a strict attention kernel (issue 17 item 5).

`strict` (tests/test_batching.py) returns NaN for a query row that sees no key, as fused GPU kernels
do in bf16; torch's CPU kernel returns 0. Left-padded pass@1 decoding has such rows in every layer
and the right-padded held-out loss in sliding-window layers. Evaluation runs them under the guarded
sdpa (batching.use_guarded_sdpa) and gives the model its own attention back, also on an exception.
"""

import math

import pytest
import torch
from test_batching import strict_attention  # noqa: F401  (registers the "strict" attention)
from transformers import AutoModelForCausalLM

from q2g import decoding, models
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.heldout_loss import heldout_loss
from q2g.evaluation.pass_at_1 import math_pass_at_1
from q2g.examples import Collator, build_example

SOLUTIONS = ["Add them: 2 + 3 = 5.\n#### 5", "Double 21 and you get 42, the answer.\n#### 42", "#### 7"]
RECORDS = [
    {"id": f"r{i}", "source": "gsm8k", "subject": None, "problem": p, "answer": a, "reference_solution": s}
    for i, (p, a, s) in enumerate(
        zip(["What is 2 + 3?", "What is twice 21, a long question with words?", "Seven?"], ["5", "42", "7"], SOLUTIONS)
    )
]
CFG = EvalConfig(eval_max_new_tokens=6, eval_batch_size=3, heldout_max_seq_len=128)


def load(tiny_gemma_dir, attn):
    """The tiny Gemma with a 4-token sliding window, so right padding leaves fully masked rows too."""
    return AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, sliding_window=4, attn_implementation=attn)


@pytest.fixture()
def tok(tiny_gemma_dir):
    return models.load_tokenizer(str(tiny_gemma_dir), padding_side="left")


def test_the_strict_kernel_nans_both_padded_batches_unguarded(tiny_gemma_dir, tok):
    """The premise: without the guard, both evaluation batches go NaN under `strict`."""
    model = load(tiny_gemma_dir, "strict")
    ids, mask = decoding.left_pad([[5, 6, 7, 8, 9, 10, 11], [5, 6]], tok.pad_token_id)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits[1].isnan().any()
        batch = Collator(tok.pad_token_id)(
            [build_example(tok, r["problem"], r["reference_solution"], 128) for r in RECORDS]
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.isnan().any()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_heldout_loss_and_pass_at_1_are_finite_and_the_attention_is_restored(tiny_gemma_dir, tok, precision):
    prec = models.resolve_precision(precision, "cpu")
    strict, eager = load(tiny_gemma_dir, "strict"), load(tiny_gemma_dir, "eager")
    got = heldout_loss(strict, tok, RECORDS, CFG, progress=False, precision=prec)
    assert strict.config._attn_implementation == "strict"  # the training model's attention, unchanged
    assert math.isfinite(got["heldout_loss"]) and got["heldout_n"] == 3
    want = heldout_loss(eager, tok, RECORDS, CFG, progress=False, precision=prec)
    tolerance = 1e-4 if precision == "fp32" else 0.05  # bf16: the kernels round differently
    assert abs(got["heldout_loss"] - want["heldout_loss"]) <= tolerance
    res = math_pass_at_1(strict, tok, RECORDS, CFG, progress=False, precision=prec)
    assert strict.config._attn_implementation == "strict"
    assert all(g["n_tokens"] >= 1 for g in res["generations"]) and res["n"] == 3
    if precision == "fp32":  # the same greedy tokens as eager, which never NaNs
        ref = math_pass_at_1(eager, tok, RECORDS, CFG, progress=False, precision=prec)
        assert [g["generation"] for g in res["generations"]] == [g["generation"] for g in ref["generations"]]


def test_the_guard_is_on_during_decoding_and_off_after_an_exception(tiny_gemma_dir, tok, monkeypatch):
    model, seen = load(tiny_gemma_dir, "strict"), []

    def failing_generate(model, *a, **k):
        seen.append(model.config._attn_implementation)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(decoding, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="simulated"):
        math_pass_at_1(model, tok, RECORDS, CFG, progress=False)
    assert seen == ["sdpa_guarded_strict_attention"] and model.config._attn_implementation == "strict"
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_a_peft_model_keeps_its_attention(tiny_gemma_dir, tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(tiny_gemma_dir, "sdpa"), LoraConfig(r=2, target_modules=["q_proj"]))
    out = heldout_loss(model, tok, RECORDS, CFG, progress=False)
    assert math.isfinite(out["heldout_loss"]) and model.config._attn_implementation == "sdpa"
    assert model.get_base_model().config._attn_implementation == "sdpa"
