"""q2g merge on the tiny Gemma3: the merged model gives base + adapter's logits; quantized bases refused."""

import json
import shutil

import pytest
import torch

from q2g import cli

# peft reads a property transformers 5 renamed (harmless); q2g's own code filters it the same way
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def adapter(tiny_gemma_dir, tmp_path_factory):
    """A LoRA adapter with large random B (a fresh one is B = 0, which any merge would 'match')."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gemma_dir),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_merge_matches_base_plus_adapter(tiny_gemma_dir, adapter, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli.call("merge", ["--adapter", str(adapter), "--out", str(out)]) == 0
    assert "max |logit(merged) - logit(base + adapter)|" in capsys.readouterr().out
    check = json.loads((out / "merge_check.json").read_text())
    assert check["ok"] and check["max_abs_logit_diff"] <= 1e-3 and check["base_model"] == str(tiny_gemma_dir)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()

    ids = torch.tensor([[2, 53, 343, 416, 31, 204, 60, 77]])
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    plain = logits(base, ids)
    with_adapter = logits(PeftModel.from_pretrained(base, adapter), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(out), ids)
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter matters ...
    assert torch.allclose(merged, with_adapter, atol=1e-4)  # ... and the merge keeps it


def test_bf16_merge_and_tolerance_failure(adapter, tmp_path, capsys):
    out = tmp_path / "merged16"
    assert cli.call("merge", ["--adapter", str(adapter), "--out", str(out), "--precision", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 rounds the merged weights once: a zero tolerance must fail with a non-zero exit
    assert cli.call("merge", ["--adapter", str(adapter), "--out", str(out), "--precision", "bf16", "--atol", "0"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_quantized_base_is_refused(tiny_gemma_dir, adapter, tmp_path, capsys):
    base = tmp_path / "quantized"
    shutil.copytree(tiny_gemma_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    code = cli.call("merge", ["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--base-model", str(base)])
    assert code == 2
    assert "is quantized (bitsandbytes)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_folder_without_adapter_is_an_error(tmp_path, capsys):
    assert cli.call("merge", ["--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
