"""q2g.decoding.cpu_head: the CPU output head through oneDNN where it is timed faster. The logits
and greedy tokens are the plain head's; the head is restored after decoding (a peft model too);
what cannot take the packed head (bf16 weights, a LoRA-wrapped head, autograd) keeps the plain one."""

import pytest
import torch

from q2g import decoding, models, prompts
from q2g.decoding import cpu_head


@pytest.fixture()
def always(monkeypatch):
    """oneDNN chosen whatever the timing says (FASTER = 0), a fresh cache before and after."""
    monkeypatch.setattr(cpu_head, "FASTER", 0.0)
    cpu_head._PACKED.clear()
    yield
    cpu_head._PACKED.clear()


@pytest.fixture()
def never(monkeypatch):
    monkeypatch.setattr(cpu_head, "FASTER", float("inf"))
    cpu_head._PACKED.clear()
    yield
    cpu_head._PACKED.clear()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_head_gives_the_plain_logits(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 1000, bias=bias)
    x = torch.randn(3, 5, 48)
    with torch.inference_mode():
        got, want = cpu_head.OneDNNHead(head)(x), head(x)
    assert got.shape == (3, 5, 1000)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_under_autograd_the_plain_head_runs():
    head = torch.nn.Linear(8, 16)
    x = torch.randn(2, 8, requires_grad=True)
    y = cpu_head.OneDNNHead(head)(x)
    y.sum().backward()  # the oneDNN path has no backward: it must not be the one taken
    assert x.grad is not None and torch.allclose(x.grad, head.weight.sum(0).expand(2, 8))


def _gemma(tiny_gemma_dir):
    return models.load_model(str(tiny_gemma_dir)).eval(), models.load_tokenizer(
        str(tiny_gemma_dir), padding_side="left"
    )


def _ids(tok):
    return [prompts.student_prompt_ids(tok, f"What is {i} plus {i * 3}? " * (1 + i % 3)) for i in range(5)]


def test_decoding_with_the_packed_head_gives_the_same_tokens_and_restores_it(tiny_gemma_dir, always):
    model, tok = _gemma(tiny_gemma_dir)
    head, n_params = model.get_output_embeddings(), len(list(model.parameters()))
    kw = dict(max_new_tokens=12, batch_size=3)
    with cpu_head.onednn_head(model, 3) as how:
        assert how.startswith("onednn (") and model.get_output_embeddings() is not head
        assert len(list(model.parameters())) == n_params  # the packed head adds no parameter
    assert model.get_output_embeddings() is head
    fast = decoding.generate(model, tok, _ids(tok), **kw)
    assert model.get_output_embeddings() is head
    cpu_head._PACKED.clear()
    cpu_head.FASTER = float("inf")  # monkeypatch (the fixture) restores it
    assert decoding.generate(model, tok, _ids(tok), **kw) == fast


def test_a_slower_packed_head_is_not_used(tiny_gemma_dir, never):
    model, _ = _gemma(tiny_gemma_dir)
    head = model.get_output_embeddings()
    with cpu_head.onednn_head(model, 4) as how:
        assert how.startswith("mkl (") and model.get_output_embeddings() is head


def test_bf16_weights_and_a_lora_head_keep_the_plain_head(tiny_gemma_dir, always):
    from peft import LoraConfig, get_peft_model

    model, _ = _gemma(tiny_gemma_dir)
    with cpu_head.onednn_head(model.to(torch.bfloat16), 2) as how:
        assert how == "plain: weights on cpu in torch.bfloat16"
    lora = get_peft_model(_gemma(tiny_gemma_dir)[0], LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    head = lora.get_base_model().get_output_embeddings()
    with cpu_head.onednn_head(lora, 2) as how:
        assert how == "plain: no plain Linear output head" and lora.get_base_model().get_output_embeddings() is head


def test_the_pack_is_made_again_when_the_weight_changes(tiny_gemma_dir, always):
    model, _ = _gemma(tiny_gemma_dir)
    head = model.get_output_embeddings()
    first = cpu_head.choose(head, 2)[0]
    assert cpu_head.choose(head, 2)[0] is first  # cached
    with torch.no_grad():
        head.weight.mul_(2.0)  # an in-place change (a merge, a load) bumps the version
    again = cpu_head.choose(head, 2)[0]
    assert again is not first and len(cpu_head._PACKED) == 1
    x = torch.randn(2, 1, head.in_features)
    with torch.inference_mode():
        assert torch.allclose(again(x), head(x), atol=1e-5)


def test_another_models_weight_is_never_taken_for_the_cached_one(always):
    """A freed weight's address can be reused by the next model's: the cache must miss then."""
    import gc
    import weakref

    first = torch.nn.Linear(16, 64, bias=False)
    cpu_head.choose(first, 2)
    gone = weakref.ref(first.weight)
    del first
    gc.collect()
    assert gone() is None  # the cache keeps no model's weight alive
    second = torch.nn.Linear(16, 64, bias=False)
    packed, _ = cpu_head.choose(second, 2)
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        assert torch.allclose(packed(x), second(x), atol=1e-5)


def test_under_cpu_autocast_or_another_dtype_the_plain_head_runs():
    """A bf16 hidden state (CPU autocast) must not reach oneDNN with an fp32 weight."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 64, bias=False)
    packed = cpu_head.OneDNNHead(head)
    x = torch.randn(2, 1, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = packed(x), head(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
