"""q2g.cpu_linears: CPU decoding's linear layers through oneDNN where that is timed faster.
The outputs and greedy tokens are the plain layers'; the plain forwards are back after decoding
(also after an error; a peft model too); what cannot take a pack (bf16 weights, autograd, a bf16
input or CPU autocast, the small LoRA factors) stays plain; a pack is never reused for a changed
or another weight."""

import gc
import weakref

import pytest
import torch

from q2g import cpu_linears as cl
from q2g import decoding, models, prompts


def _fresh(monkeypatch, faster):
    monkeypatch.setattr(cl, "FASTER", faster)
    monkeypatch.setattr(cl, "MIN_DIM", 8)  # the tiny test models are 32 wide
    cl._PACKS.clear()
    cl._CHOICE.clear()


@pytest.fixture()
def always(monkeypatch):
    """oneDNN chosen whatever the timing says (FASTER = 0); fresh caches before and after."""
    _fresh(monkeypatch, 0.0)
    yield
    cl._PACKS.clear()
    cl._CHOICE.clear()


@pytest.fixture()
def never(monkeypatch):
    _fresh(monkeypatch, float("inf"))
    yield
    cl._PACKS.clear()
    cl._CHOICE.clear()


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_gives_the_plain_outputs(monkeypatch, bias, pointwise):
    """Both oneDNN routes: the packed op, and mkldnn_linear where torch lacks it."""
    monkeypatch.setattr(cl, "_linear_pointwise_ok", lambda: pointwise)
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 1000, bias=bias)
    packed = cl.PackedLinear(lin, rows=3)
    assert packed.pointwise is pointwise
    for shape in [(3, 5, 48), (7, 48), (1, 1, 48)]:  # any row count, not only the packed one
        x = torch.randn(*shape)
        with torch.inference_mode():
            got, want = packed(x), lin(x)
        assert got.shape == want.shape == (*shape[:-1], 1000)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_under_autograd_the_plain_layer_runs():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(2, 8, requires_grad=True)
    cl.PackedLinear(lin, 2)(x).sum().backward()  # the oneDNN path has no backward: it must not be taken
    assert x.grad is not None and torch.allclose(x.grad, lin.weight.sum(0).expand(2, 8))
    lin.weight.grad = None
    cl.PackedLinear(lin, 2)(torch.randn(2, 8)).sum().backward()  # a trained weight, a plain input
    assert lin.weight.grad is not None


def test_under_cpu_autocast_or_another_dtype_the_plain_layer_runs():
    """A bf16 hidden state (CPU autocast) must not reach oneDNN with an fp32 weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 64, bias=False)
    packed = cl.PackedLinear(lin, 2)
    x = torch.randn(2, 1, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = packed(x), lin(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def _gemma(tiny_gemma_dir):
    return models.load_model(str(tiny_gemma_dir)).eval(), models.load_tokenizer(
        str(tiny_gemma_dir), padding_side="left"
    )


def _ids(tok):
    return [prompts.student_prompt_ids(tok, f"What is {i} plus {i * 3}? " * (1 + i % 3)) for i in range(5)]


def _replaced(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_decoding_with_packed_layers_gives_the_same_tokens_and_restores_them(tiny_gemma_dir, always):
    model, tok = _gemma(tiny_gemma_dir)
    n_params, n_linear = len(list(model.parameters())), len(cl.linears(model))
    assert n_linear == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    kw = dict(max_new_tokens=12, batch_size=3)
    with cl.onednn_linears(model, 3) as how:
        assert how.startswith("onednn (") and f"{n_linear} layers" in how
        assert len(_replaced(model)) == n_linear and "lm_head" in _replaced(model)
        assert len(list(model.parameters())) == n_params  # a pack adds no parameter
    assert _replaced(model) == []
    fast = decoding.generate(model, tok, _ids(tok), **kw)
    assert _replaced(model) == []
    cl._PACKS.clear()
    cl._CHOICE.clear()
    cl.FASTER = float("inf")  # monkeypatch (the fixture) restores it
    assert decoding.generate(model, tok, _ids(tok), **kw) == fast


def test_an_error_inside_restores_the_plain_forwards(tiny_gemma_dir, always):
    model, _ = _gemma(tiny_gemma_dir)
    with pytest.raises(RuntimeError, match="boom"):
        with cl.onednn_linears(model, 2):
            assert _replaced(model)
            raise RuntimeError("boom")
    assert _replaced(model) == []


def test_slower_packs_are_not_used(tiny_gemma_dir, never):
    model, _ = _gemma(tiny_gemma_dir)
    with cl.onednn_linears(model, 4) as how:
        assert how.startswith("mkl (") and _replaced(model) == []


def test_bf16_weights_stay_plain_and_a_lora_model_packs_only_its_base_layers(tiny_gemma_dir, always):
    from peft import LoraConfig, get_peft_model

    model, _ = _gemma(tiny_gemma_dir)
    with cl.onednn_linears(model.to(torch.bfloat16), 2) as how:
        assert how == "plain: no fp32 CPU linear layer (weights: cpu torch.bfloat16)" and _replaced(model) == []
    lora = get_peft_model(_gemma(tiny_gemma_dir)[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with cl.onednn_linears(lora, 2):
        done = _replaced(lora)
        assert any(n.endswith("q_proj.base_layer") for n in done)
        assert not any("lora_" in n for n in done)  # the r=2 factors are below MIN_DIM
        assert not any(n.endswith("q_proj") for n in done)  # the LoRA wrapper itself is not a plain Linear
    assert _replaced(lora) == []


def test_a_pack_is_made_again_when_its_weight_changes(always):
    lin = torch.nn.Linear(16, 64)
    first = cl.packs([lin], 2)[0]
    assert cl.packs([lin], 2)[0] is first  # cached
    assert cl.packs([lin], 7)[0] is first  # at another row count too (rows only hints the layout)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place change (a merge, a load) bumps the version
    again = cl.packs([lin], 2)[0]
    assert again is not first and len(cl._PACKS) == 1
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        assert torch.allclose(again(x), lin(x), atol=1e-5)


def test_another_models_weight_is_never_taken_for_a_cached_one(always):
    """A freed weight's address can be reused by the next model's: the cache must miss then."""
    first = torch.nn.Linear(16, 64, bias=False)
    cl.packs([first], 2)
    gone = weakref.ref(first.weight)
    del first
    gc.collect()
    assert gone() is None  # the cache keeps no model's weight alive
    second = torch.nn.Linear(16, 64, bias=False)
    packed = cl.packs([second], 2)[0]
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        assert torch.allclose(packed(x), second(x), atol=1e-5)


def test_no_room_for_the_packs_keeps_the_plain_layers(tiny_gemma_dir, always, monkeypatch):
    import q2g.memory

    model, _ = _gemma(tiny_gemma_dir)
    monkeypatch.setattr(q2g.memory, "free_memory", lambda device: 1000)
    with cl.onednn_linears(model, 2) as how:
        assert how.startswith("plain: no room for packed copies") and _replaced(model) == []


def test_the_timing_runs_a_bounded_sample_of_the_layers(monkeypatch):
    """Layers of one shape are timed up to TIMED_PER_SHAPE each, at most TIMED_ROWS rows: a big
    model's timing stays short. Every shape is in the sample."""
    monkeypatch.setattr(cl, "TIMED_PER_SHAPE", 2)
    layers = [torch.nn.Linear(16, 32) for _ in range(5)] + [torch.nn.Linear(32, 16) for _ in range(3)]
    layers.insert(2, torch.nn.Linear(16, 64))
    assert cl.timed_sample(layers) == [0, 1, 2, 6, 7]
    seen = []
    monkeypatch.setattr(cl, "_seconds", lambda fns, xs, reps=2: seen.append([x.shape[0] for x in xs]) or 1.0)
    monkeypatch.setattr(cl, "TIMED_ROWS", 4)
    cl._CHOICE.clear()
    use, how = cl.choose(layers, [None] * len(layers), rows=500)
    assert seen == [[4] * 5, [4] * 5] and "at 4 rows, 9 layers" in how
    assert cl.choose(layers, [None] * len(layers), rows=900) == (use, how) and len(seen) == 2  # same timing: not again
    cl._CHOICE.clear()
