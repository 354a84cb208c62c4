"""--use-rslora, --use-dora, --init-lora-weights: each changes the adapter where it should, and the
saved adapter loads on the ORIGINAL base and merges with `q2g merge`'s logits check passing
(PiSSA/OLoRA rewrite the base weights in memory; their saved adapter is converted back)."""

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from q2g import cli
from q2g.errors import ConfigError
from q2g.finetune import epochs
from q2g.finetune import train as trainer
from q2g.finetune.config import FinetuneConfig
from q2g.finetune.lora import supported_inits

RANK, ALPHA = 4, 8


def build(folder, **options):
    cfg = FinetuneConfig(lora_r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, **options)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return trainer.build_lora_model(base, cfg.replace(lora_r=RANK, lora_alpha=ALPHA))


def train_a_little(model):
    """Stand-in for training: every trainable tensor moves (so B A != 0)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_rslora_scales_by_sqrt_rank(tiny_gemma_dir):
    assert q_proj(build(tiny_gemma_dir)).scaling["default"] == ALPHA / RANK
    assert q_proj(build(tiny_gemma_dir, use_rslora=True)).scaling["default"] == pytest.approx(ALPHA / math.sqrt(RANK))


def test_dora_trains_a_magnitude_vector(tiny_gemma_dir):
    plain = {n for n, p in build(tiny_gemma_dir).named_parameters() if p.requires_grad}
    dora = {n for n, p in build(tiny_gemma_dir, use_dora=True).named_parameters() if p.requires_grad}
    magnitudes = sorted(dora - plain)
    assert magnitudes and all("lora_magnitude_vector" in n for n in magnitudes)
    assert len(magnitudes) == 2 * 2  # 2 layers x q_proj, v_proj


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_rewrites_base_weights_keeping_the_output(tiny_gemma_dir, init):
    original = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    model = build(tiny_gemma_dir, init_lora_weights=init)
    layer = q_proj(model)
    w0 = original.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(layer.base_layer.weight, w0)  # the residual W - s B A, not W
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(layer.base_layer.weight + delta, w0, atol=1e-5)
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    assert torch.allclose(logits(model, ids), logits(original, ids), atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [{"use_rslora": True}, {"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}],
    ids=lambda o: next(iter(o)) if "use" in next(iter(o)) else o["init_lora_weights"],
)
def test_saved_adapter_reloads_on_the_original_base_and_merges(tiny_gemma_dir, tmp_path, options):
    from peft import PeftModel

    model = build(tiny_gemma_dir, **options)
    train_a_little(model)
    ids = torch.tensor([[2, 11, 22, 33, 44, 55]])
    want = logits(model, ids)
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epochs.save_adapter(model, tok, tmp_path / "epoch-1", {"lora_r": RANK})
    assert not [w for w in caught if "changes the base weights" in str(w.message)]  # peft's own conversion step
    saved = json.loads((tmp_path / "epoch-1" / "adapter_config.json").read_text())
    if "init_lora_weights" in options:  # converted to a plain LoRA of twice the rank on the original base
        assert saved["init_lora_weights"] is True and saved["r"] == 2 * RANK
    fresh = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "epoch-1"))
    assert (logits(reloaded, ids) - want).abs().max().item() <= 1e-4
    assert (want - logits(AutoModelForCausalLM.from_pretrained(tiny_gemma_dir), ids)).abs().max() > 1e-3
    assert cli.call("merge", ["--adapter", str(tmp_path / "epoch-1"), "--out", str(tmp_path / "merged")]) == 0
    check = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    assert check["ok"] and check["max_abs_logit_diff"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged, ids) - want).abs().max().item() <= 1e-3


def test_inits_offered_are_the_installed_pefts():
    inits = supported_inits()
    assert {"default", "gaussian", "pissa", "olora"} <= set(inits)
    assert "eva" not in inits and "loftq" not in inits  # need a calibration pass / a quantisation config


@pytest.mark.parametrize(
    "options,message",
    [
        ({"init_lora_weights": "eva"}, "--init-lora-weights 'eva' is not one q2g can train"),
        ({"init_lora_weights": "pissa_niter_x"}, "choose one of default, gaussian, pissa"),
        ({"init_lora_weights": "pissa", "kl_to_base": 0.1}, "--kl-to-base 0.1 needs the base weights unchanged"),
        ({"use_dora": True, "init_lora_weights": "olora"}, "--use-dora with --init-lora-weights olora"),
        ({"forgetting_check_steps": 5, "no_eval": True}, "--forgetting-check-steps needs the WikiText evaluation"),
    ],
)
def test_bad_combinations_are_refused_when_the_config_is_built(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FinetuneConfig(**options)
    assert FinetuneConfig(init_lora_weights="pissa_niter_4").init_lora_weights == "pissa_niter_4"


def test_bad_init_on_the_command_line_exits_2_before_loading(tmp_path, capsys):
    rc = cli.call("finetune", ["--base-model", str(tmp_path / "nope"), "--init-lora-weights", "lora_ga"])
    assert rc == 2
    assert "--init-lora-weights 'lora_ga'" in capsys.readouterr().err
