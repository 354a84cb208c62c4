"""The GPU paths issue 27 found broken on first contact, each simulated on the CPU: stand-in vLLM
and Liger modules, patched CUDA memory functions, a tiny Gemma3ForConditionalGeneration."""

import os
import sys
import textwrap

import pytest
import torch

from q2g import distributed, memory, models
from q2g.errors import ConfigError

STAND_IN_VLLM = '''
"""A stand-in vllm: records what an engine saw at birth and whether it was shut down."""
import json, os, types
EVENTS = []

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class _Core:
    def shutdown(self):
        EVENTS.append("shutdown")

class LLM:
    def __init__(self, **kw):
        EVENTS.append(("start", {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}, kw))
        self.llm_engine = types.SimpleNamespace(engine_core=_Core())
        self.kw = kw

    def get_tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.kw["model"])

    def generate(self, prompts, params, use_tqdm=True, **kw):
        EVENTS.append("generate")
        out = types.SimpleNamespace
        text = "The answer is 1.\\n#### 1"
        return [out(outputs=[out(text=text, token_ids=[1, 2], finish_reason="stop")] * p.kw["n"]) for p in params]
'''


@pytest.fixture()
def stand_in_vllm(tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(textwrap.dedent(STAND_IN_VLLM))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    yield vllm
    sys.modules.pop("vllm", None)


# 3. `q2g run` with the vLLM teacher: the engine is shut down before finetune starts.
def test_run_shuts_the_vllm_teacher_down_before_finetune(
    tmp_path, tiny_qwen_dir, tiny_gemma_dir, stand_in_vllm, monkeypatch
):
    from q2g import run

    config = tmp_path / "run.yaml"
    config.write_text(
        f"generate:\n  backend: vllm\n  teacher: {tiny_qwen_dir}\n  data_dir: packaged\n  limit: 4\n"
        f"finetune:\n  base_model: {tiny_gemma_dir}\n  data_dir: packaged\n"
    )
    monkeypatch.setattr(run.finetune, "main", lambda argv: stand_in_vllm.EVENTS.append("finetune") or 0)
    monkeypatch.setattr(run, "summarize", lambda *a: None)
    assert run.run_pipeline(config, tmp_path / "out") == 0
    steps = [e if isinstance(e, str) else e[0] for e in stand_in_vllm.EVENTS]
    assert steps[0] == "start" and "generate" in steps
    assert steps[-2:] == ["shutdown", "finetune"]  # the engine went before training began


def test_shutdown_prefers_llm_shutdown_and_frees_the_cache(monkeypatch):
    from q2g.backends.vllm import shutdown_engine

    calls = []
    monkeypatch.setattr(memory, "free_accelerator_memory", lambda: calls.append("free"))

    class Newer:  # vLLM with LLM.shutdown() (PR 36283)
        def shutdown(self):
            calls.append("LLM.shutdown")

    shutdown_engine(Newer())
    shutdown_engine(None)
    assert calls == ["LLM.shutdown", "free"]


# 7. A vLLM engine built on the main process of a torchrun run does not see the launcher's env.
def test_vllm_engine_is_built_without_the_launchers_env(stand_in_vllm, tiny_qwen_dir, monkeypatch):
    from q2g.backends.vllm import VLLMBackend

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    VLLMBackend(str(tiny_qwen_dir), temperature=0.0, top_p=1.0, max_new_tokens=4)
    _, env, _ = stand_in_vllm.EVENTS[0]
    assert env == {"RANK": None, "WORLD_SIZE": None, "MASTER_PORT": None}
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "2"  # put back for the Trainer


def test_launcher_env_is_put_back_after_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError):
        with distributed.without_launcher_env():
            assert "WORLD_SIZE" not in os.environ
            raise RuntimeError("engine failed")
    assert os.environ["WORLD_SIZE"] == "4"


# 6. DeepSpeed (ZeRO 1/2) steps inside backward: --skip-nonfinite could not skip, so it is refused.
@pytest.mark.parametrize(
    "trainer, env",
    [({"deepspeed": {"zero_optimization": {"stage": 2}}}, {}), ({}, {"ACCELERATE_USE_DEEPSPEED": "true"})],
)
def test_deepspeed_refuses_skip_nonfinite(trainer, env):
    with pytest.raises(ConfigError, match="--skip-nonfinite cannot skip under DeepSpeed"):
        distributed.check_parallel_mode(trainer, env, skip_nonfinite=True)
    distributed.check_parallel_mode(trainer, env)  # without it ZeRO-2 stays supported
    distributed.check_parallel_mode({}, {}, skip_nonfinite=True)  # and DDP / one process skip as before


def test_run_refuses_deepspeed_with_skip_nonfinite_before_the_teacher(tmp_path, tiny_gemma_dir, capsys):
    from q2g import cli

    config = tmp_path / "run.yaml"
    config.write_text(
        "generate:\n  backend: reference\n  teacher: reference\n  data_dir: packaged\n  limit: 4\n"
        f"finetune:\n  base_model: {tiny_gemma_dir}\n  data_dir: packaged\n  skip_nonfinite: true\n"
        "  trainer:\n    deepspeed: {zero_optimization: {stage: 2}}\n"
    )
    assert cli.call("run", ["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "--skip-nonfinite cannot skip under DeepSpeed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# 5. Gemma3ForConditionalGeneration: the plan counts the vision tower; LoRA leaves it alone.
def tiny_gemma3_vlm():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text.update(num_key_value_heads=2, head_dim=8, sliding_window=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    cfg = Gemma3Config(text_config=text, vision_config={**vision, "patch_size": 8}, mm_tokens_per_image=4)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(cfg)


def test_plan_counts_the_vision_tower():
    model = tiny_gemma3_vlm()
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal" in n)
    assert vision > 0 and memory.vision_params(model.config) == vision
    assert memory.count_params(model.config) == sum(p.numel() for p in model.parameters())
    assert memory.vision_params(model.config.get_text_config()) == 0  # a text-only config: nothing added
    shape = memory.TrainShape(batch_size=1, seq_len=16, dtype_bytes=4)
    with_vision = memory.estimate(model.config, shape)["weights"]
    assert with_vision - memory.estimate(model.config.get_text_config(), shape)["weights"] == 4 * vision


def test_lora_on_a_vlm_adapts_the_language_model_only():
    from peft import LoraConfig, get_peft_model

    model = tiny_gemma3_vlm()
    exclude = models.lora_exclude(model)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    adapted = [n for n, _ in get_peft_model(model, cfg).named_parameters() if "lora_A" in n]
    assert adapted and all("language_model" in n for n in adapted)
    assert len(adapted) == 4  # q and v of both decoder layers, none of the 4 in the vision tower
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text_only = Gemma3ForCausalLM(Gemma3TextConfig(**tiny_gemma3_vlm().config.text_config.to_dict()))
    assert models.lora_exclude(text_only) is None


# 8. Expandable segments for training unless the user chose an allocator setting.
def test_allocator_default_respects_the_user():
    env = {}
    assert memory.allocator_defaults(env) and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert not memory.allocator_defaults(mine) and mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    newer = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert not memory.allocator_defaults(newer) and "PYTORCH_CUDA_ALLOC_CONF" not in newer


def test_run_sets_the_allocator_default_first(tmp_path, monkeypatch):
    from q2g import run

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    with pytest.raises(ConfigError):
        run.run_pipeline(tmp_path / "missing.yaml")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# 8. benchmarks/eval_speed.py puts its batches on the model's device (CUDA crashed with CPU tensors).
def test_eval_speed_batches_go_to_the_models_device(monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import eval_speed

    seen = []

    class Stop(Exception):
        pass

    class OnMeta(torch.nn.Module):  # parameters on another device than the CPU's tensors
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, input_ids, **kw):
            seen.append(input_ids.device.type)
            raise Stop

    example = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    with pytest.raises(Stop):
        eval_speed.logits_examples_nll(OnMeta(), [example], pad_id=0)
    with pytest.raises(Stop):
        eval_speed.logits_windows_nll(OnMeta(), [([1, 2, 3], [2, 3], 0)])
    assert seen == ["meta", "meta"]


# 2. The vLLM evaluation engine: the cache is emptied first, its share sized from what is free.
@pytest.fixture()
def card(monkeypatch):
    """An 80 GB card whose driver has 30 GB free until torch empties its cache (20 GB more)."""
    gb, state = 10**9, {"emptied": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(emptied=state["emptied"] + 1))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: ((50 if state["emptied"] else 30) * gb, 80 * gb))
    return state


def test_vllm_share_empties_the_cache_then_fits_what_is_free(card):
    assert memory.vllm_share(0.5) == (0.5, "")  # 40 GB asked, 50 GB free once the cache went back
    assert card["emptied"] == 1
    util, note = memory.vllm_share(0.9)  # 72 GB asked: cut to what is free
    assert util == 0.612 and "72.0 GB, 50.0 GB are free: started with 0.612" in note
    assert memory.vllm_share(0.9, "cpu") == (0.9, "")


def test_vllm_evaluation_engine_starts_on_an_emptied_cache_with_a_share_that_fits(card, stand_in_vllm, monkeypatch):
    from q2g.evaluation import pass_at_1 as decoding_vllm

    monkeypatch.setattr(decoding_vllm, "_ENGINES", {})
    monkeypatch.setenv("WORLD_SIZE", "2")  # 7. also outside the launcher's env
    decoding_vllm.vllm_engine("base", dtype="bfloat16", lora_r=16, gpu_memory_utilization=0.9)
    _, env, kw = stand_in_vllm.EVENTS[0]
    assert card["emptied"] == 1 and kw["gpu_memory_utilization"] == 0.612  # 50 of 80 GB free once emptied
    assert env["WORLD_SIZE"] is None
    decoding_vllm.vllm_engine("base", dtype="bfloat16", lora_r=512, gpu_memory_utilization=0.5)  # a rebuild
    assert stand_in_vllm.EVENTS[1] == "shutdown" and stand_in_vllm.EVENTS[2][2]["gpu_memory_utilization"] == 0.5


# 1. A Liger that fails at its first call falls back to the chunked loss; training goes on.
def test_liger_failing_at_first_call_falls_back_to_the_chunked_loss(tiny_gemma_dir, tmp_path, monkeypatch):
    import types

    from transformers import TrainerCallback, TrainingArguments

    from q2g.finetune import loss
    from q2g.finetune import train as ft_trainer

    calls = []

    class LigerFusedLinearCrossEntropyLoss:  # the stand-in: its Triton kernel cannot compile
        def __init__(self, **kw):
            pass

        def __call__(self, *a, **kw):
            calls.append("liger")
            raise RuntimeError("triton: cannot compile for this GPU")

    module = types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=LigerFusedLinearCrossEntropyLoss)
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.fused_linear_cross_entropy", module)
    monkeypatch.setattr(loss, "liger_eligible", lambda h, scale: True)  # as on CUDA with the wheel installed
    model = models.load_model(str(tiny_gemma_dir))
    tok = models.load_tokenizer(str(tiny_gemma_dir))
    asked = types.SimpleNamespace(loss_chunk_size=16, kl_to_base=0.0, distill="none", distill_weight=0.0)
    run = types.SimpleNamespace(
        settings=types.SimpleNamespace(loss_path="liger", asked=asked), examples=[], tokenizer=tok
    )
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ft_trainer.make_trainer(run, model, targs, TrainerCallback(), TrainerCallback())
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    batch["labels"] = torch.tensor([[-100, -100, 6, 7, 8]])
    with pytest.warns(RuntimeWarning, match="Liger failed at its first call"):
        first = trainer.compute_loss(model, batch)
    second = trainer.compute_loss(model, batch)
    assert calls == ["liger"] and torch.isfinite(first) and torch.allclose(first, second)
    info = trainer.loss_info()
    assert info["loss_path"] == "chunked" and "cannot compile" in info["loss_note"]


# 4. --use-dora with --eval-backend vllm: refused before anything loads, exit 2, nothing written.
def test_dora_with_vllm_evaluation_is_refused_before_anything_loads(tmp_path, tiny_gemma_dir, monkeypatch, capsys):
    from q2g import cli

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "ck"
    argv = ["--base-model", str(tiny_gemma_dir), "--traces", str(tmp_path / "none"), "--out", str(out)]
    assert cli.call("finetune", [*argv, "--use-dora", "--eval-backend", "vllm"]) == 2
    assert "--use-dora with --eval-backend vllm" in capsys.readouterr().err
    assert not out.exists()


# 6 + 8 in `q2g finetune` itself (sweep trials go through it too).
def test_finetune_refuses_deepspeed_skip_nonfinite_and_sets_the_allocator(
    tmp_path, tiny_gemma_dir, monkeypatch, capsys
):
    from q2g import cli

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "ck"
    argv = ["--base-model", str(tiny_gemma_dir), "--traces", str(tmp_path / "none"), "--out", str(out)]
    assert cli.call("finetune", [*argv, "--skip-nonfinite"]) == 2
    assert "--skip-nonfinite cannot skip under DeepSpeed" in capsys.readouterr().err and not out.exists()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# 5. Through finetune's own LoRA builder: the vision tower of a Gemma3ForConditionalGeneration gets none.
def test_finetune_lora_builder_leaves_the_vision_tower_alone():
    from q2g.finetune.config import FinetuneConfig
    from q2g.finetune.train import build_lora_model

    cfg = FinetuneConfig(target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=8)
    peft_model = build_lora_model(tiny_gemma3_vlm(), cfg)
    adapted = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(adapted) == 4 and not [n for n in adapted if "vision_tower" in n]
