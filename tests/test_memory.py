"""Memory estimates with numbers worked out by hand (Gemma-7B shapes), the parameter count against
the tiny models, the activation term against the bytes autograd really saves, and the decision."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig

from q2g.memory import TrainShape, activation_bytes, count_params, estimate, free_memory, lora_params, plan

GEMMA_7B = GemmaConfig(
    vocab_size=256000,
    hidden_size=3072,
    intermediate_size=24576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=256,
)


def test_gemma_7b_by_hand():
    # embed 256000*3072 + 28 * (attn 4*3072*4096 + mlp 3*3072*24576 + 2 norms 2*3072) + final norm
    assert count_params(GEMMA_7B) == 786_432_000 + 28 * (50_331_648 + 226_492_416 + 6_144) + 3_072 == 8_537_680_896
    assert lora_params(GEMMA_7B, 16) == 28 * 2 * 16 * (3072 + 4096) == 6_422_528
    shape = TrainShape(batch_size=8, seq_len=2048, dtype_bytes=2, gradient_checkpointing=True)
    full = estimate(GEMMA_7B, replace(shape, label_only_loss=False))
    chunked = estimate(GEMMA_7B, shape)
    assert full["weights"] == chunked["weights"] == 2 * 8_537_680_896
    assert full["lora"] == 16 * 6_422_528
    # checkpointing: each layer's input (28 * 3072 * 2 bytes) + one layer's (4I+10h+3.5q+3kv) * 2 bytes, per token
    assert full["activations"] == 16384 * (28 * 3072 * 2 + 155_648 * 2) == 7_918_845_952
    assert full["logits"] == 16384 * 256000 * (2 + 4 + 4 + 4) == 58_720_256_000
    assert chunked["logits"] == 1024 * 256000 * (2 + 4 + 4) + 2 * 16384 * 3072 * 2 == 2_822_766_592
    assert full["total"] == 83_817_224_192 > 80e9 > 27_919_734_784 == chunked["total"]


def test_plan_turns_on_checkpointing_then_shrinks_the_batch():
    shape = TrainShape(batch_size=8, seq_len=1024)
    assert estimate(GEMMA_7B, shape)["activations"] == 8192 * 28 * 311_296  # 71.4 GB without checkpointing
    p = plan(GEMMA_7B, shape, free_bytes=80 * 10**9, grad_accum=4)
    assert (p.action, p.shape.gradient_checkpointing, p.shape.batch_size, p.grad_accum) == (
        "gradient_checkpointing",
        True,
        8,
        4,
    )
    assert p.need_bytes <= 0.9 * 80e9 and "--gradient-checkpointing" in p.message
    p = plan(GEMMA_7B, shape, free_bytes=24 * 10**9, grad_accum=4)  # 23.9 GB at batch 8, 21.8 at 4, 20.8 at 2
    assert (p.action, p.shape.batch_size, p.grad_accum) == ("smaller_batch", 2, 16)
    assert "--batch-size 2 --grad-accum 16" in p.message
    p = plan(GEMMA_7B, shape, free_bytes=16 * 10**9)  # the bf16 weights alone are 17.1 GB
    assert p.action == "does_not_fit" and "bigger GPU" in p.message
    assert plan(GEMMA_7B, replace(shape, batch_size=1, seq_len=128), free_bytes=80 * 10**9).action == "fits"


@pytest.mark.parametrize("fixture", ["tiny_gemma_dir", "tiny_qwen_dir"])
def test_count_params_matches_the_tiny_models(request, fixture):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    assert count_params(model.config) == sum(p.numel() for p in model.parameters())


def test_activation_term_is_close_to_what_autograd_saves(tiny_gemma_dir):
    from peft import LoraConfig, get_peft_model

    from q2g.finetune.loss import split_causal_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.05))
    model.train()
    decoder = split_causal_lm(model)[0]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=torch.randint(3, 100, (2, 64)))
    want = activation_bytes(model.config, TrainShape(batch_size=2, seq_len=64, dtype_bytes=4))
    assert 0.75 < sum(storages.values()) / want < 1.25


def test_free_memory_on_cpu_is_positive():
    assert free_memory("cpu") > 0


def test_gemma3_270m_logits_dominate():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
    )
    # embed 262144*640 + 18 * (attn 1_638_400 + mlp 3_932_160 + norms 4*640 + 2*256) + final norm: the 268M model
    assert count_params(cfg) == 167_772_160 + 18 * (1_638_400 + 3_932_160 + 3_072) + 640 == 268_098_176
    shape = TrainShape(batch_size=8, seq_len=1024, label_only_loss=False)
    full = estimate(cfg, shape)
    assert full["activations"] == 8192 * 18 * (4 * 2048 + 10 * 640 + 3.5 * 1024 + 3 * 256) * 2  # 5.6 GB
    assert full["logits"] == 8192 * 262144 * 14 > 5 * full["activations"]  # 30.1 GB of logits
    assert estimate(cfg, replace(shape, label_only_loss=True))["logits"] == 1024 * 262144 * 10 + 2 * 8192 * 640 * 2


def test_lora_params_all_linear_and_unknown_names():
    from types import SimpleNamespace

    from q2g.memory import lora_params

    c = SimpleNamespace(
        hidden_size=8,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        vocab_size=100,
        model_type="qwen2",
    )
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora_params(c, 4, ["all-linear"]) == lora_params(c, 4, every)
    # q: 8x8, k/v: 8x4, o: 8x8, gate/up: 8x32, down: 32x8 -> r * (in + out) summed, 2 layers
    assert lora_params(c, 4, every) == 2 * 4 * (16 + 12 + 12 + 16 + 40 + 40 + 40)
    assert lora_params(c, 4, ["w_pack"]) == 2 * 4 * 40  # unknown: counted as the largest


@pytest.fixture
def fake_cuda(monkeypatch):
    """A 80 GB card: 30 GB free at the driver, torch holding 20 GB reserved of which 5 GB is in use."""
    gb = 10**9
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (30 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=0: 20 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=0: 5 * gb)
    return gb


def test_free_memory_counts_torch_cached_but_unused_blocks(fake_cuda):
    assert free_memory("cuda") == 45 * fake_cuda  # 30 at the driver + (20 - 5) cached, free to reuse
    assert free_memory("cuda:0") == 45 * fake_cuda


def test_vllm_evaluation_share_is_kept_out_of_the_plan(fake_cuda):
    from q2g.memory import free_for_training

    free, note = free_for_training("cuda", {"eval_backend": "vllm", "vllm_gpu_memory_utilization": 0.3})
    assert free == 45 * fake_cuda - 24 * fake_cuda  # 0.3 x 80 GB for the engine
    assert "24.0 GB kept for the vLLM evaluation engine (30%)" == note
    assert free_for_training("cuda", {"eval_backend": "hf"}) == (45 * fake_cuda, "")
    assert free_for_training("cuda", {"eval_backend": "vllm", "no_eval": True})[0] == 45 * fake_cuda
    free, _ = free_for_training("cuda", {"eval_backend": "vllm", "vllm_gpu_memory_utilization": 0.9})
    assert free == 0  # 72 GB for the engine: nothing left, never negative


def test_free_accelerator_memory_collects_and_empties_the_cache(monkeypatch):
    import gc

    from q2g.memory import free_accelerator_memory

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc") or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    free_accelerator_memory()
    assert calls == ["gc", "empty_cache"]
