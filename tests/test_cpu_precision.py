"""The CPU decides its precision (q2g.cpu_info + models.resolve_precision), tested on faked CPUs:
an AMX / AVX512-BF16 CPU gets bf16 (bf16 base weights, fp32 LoRA), an AVX2 one fp32, and the
decision, its reason and the CPU are in config.json, the log and report.md."""

import json

import pytest
import torch
from helpers import finetune_argv, reference_dataset

from q2g import cli, cpu_info, models
from q2g.finetune import train

REAL_PROBE = cpu_info.bf16_units  # conftest's avx2_only_cpu replaces it for the session, after collection


def fake_cpu(monkeypatch, unit):
    """A CPU whose bf16 matrix unit is `unit` ('AMX', 'AVX512-BF16' or None: AVX2 only)."""
    monkeypatch.setattr(cpu_info, "bf16_units", lambda: unit)
    monkeypatch.setattr(cpu_info, "simd_level", lambda: "AVX512" if unit else "AVX2")


@pytest.mark.parametrize(
    "unit, dtype, autocast, why",
    [
        ("AMX", torch.bfloat16, "bf16", "bf16: AMX present"),
        ("AVX512-BF16", torch.bfloat16, "bf16", "bf16: AVX512-BF16 present"),
        (None, torch.float32, None, "fp32: no bf16 matrix units (AVX2 only)"),
    ],
)
def test_auto_on_the_cpu_follows_its_bf16_units(monkeypatch, unit, dtype, autocast, why):
    fake_cpu(monkeypatch, unit)
    p = models.resolve_precision("auto", "cpu")
    assert (p.dtype, p.autocast, p.why) == (dtype, autocast, why)


def test_asked_precision_wins_and_says_so(monkeypatch, capsys):
    fake_cpu(monkeypatch, "AMX")
    assert models.resolve_precision("fp32", "cpu") == models.Precision(torch.float32, None, "fp32", "fp32: asked")
    assert "warning" not in capsys.readouterr().out
    fake_cpu(monkeypatch, None)
    p = models.resolve_precision("bf16", "cpu")
    assert (p.dtype, p.autocast, p.why) == (torch.bfloat16, "bf16", "bf16: asked")
    assert "no bf16 matrix units" in capsys.readouterr().out  # asked on AVX2: runs, but is said to be slow


def test_the_probe_asks_torch_not_the_cpu_name(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert REAL_PROBE() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert REAL_PROBE() == "AMX"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert REAL_PROBE() is None


def test_cpu_line_names_model_flags_and_units(monkeypatch):
    monkeypatch.setattr(cpu_info, "_cpuinfo", lambda: {"model name": "Xeon Test", "flags": "fpu avx2 amx_tile"})
    monkeypatch.setattr(cpu_info, "bf16_units", lambda: "AMX")
    assert cpu_info.cpu_line() == "Xeon Test (flags: amx_tile, avx2; bf16 matrix units: AMX)"
    assert cpu_info.cpu_flags()["avx512_bf16"] is False


def lora_step(model_dir, precision):
    """The LoRA model q2g trains under `precision`, and the loss of one AdamW step on a batch."""
    from q2g.finetune.config import FinetuneConfig

    model = models.load_model(str(model_dir), precision.dtype, "cpu")
    peft_model = train.build_lora_model(
        model, FinetuneConfig(target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=8)
    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, 100, (2, 16))
    with precision.context("cpu"):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return peft_model, opt, loss


def test_cpu_bf16_stores_base_weights_in_bf16_and_lora_in_fp32(monkeypatch, tiny_gemma_dir):
    fake_cpu(monkeypatch, "AMX")
    peft_model, opt, loss = lora_step(tiny_gemma_dir, models.resolve_precision("auto", "cpu"))
    base = {n: p.dtype for n, p in peft_model.named_parameters() if "base_layer.weight" in n}
    lora = {n: p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    assert base and set(base.values()) == {torch.bfloat16}  # stored bf16: no per-call re-cast of fp32 weights
    assert lora and set(lora.values()) == {torch.float32}
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}
    assert torch.isfinite(loss) and loss.item() > 0


def test_fp32_stays_fp32(monkeypatch, tiny_gemma_dir):
    fake_cpu(monkeypatch, None)
    peft_model, _, loss = lora_step(tiny_gemma_dir, models.resolve_precision("auto", "cpu"))
    assert {p.dtype for p in peft_model.parameters()} == {torch.float32}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("unit, why", [("AMX", "bf16: AMX present"), (None, "fp32: no bf16 matrix units (AVX2 only)")])
def test_the_decision_is_in_config_log_and_report(monkeypatch, tiny_gemma_dir, tmp_path, capsys, unit, why):
    fake_cpu(monkeypatch, unit)
    monkeypatch.setattr(cpu_info, "_cpuinfo", lambda: {"model name": "Fake CPU 9000", "flags": "avx2"})
    ds = reference_dataset(tmp_path / "ds", limit=3, teacher="reference", backend="reference")
    out = tmp_path / "run"
    argv = finetune_argv(
        tiny_gemma_dir, ds, out, epochs=1, eval_limit=1, rehearsal_fraction=0.3, rehearsal_max_tokens=8
    )
    assert cli.call("finetune", argv) == 0  # rehearsal: the base model samples in the decided precision too
    config = json.loads((out / "config.json").read_text())
    assert config["precision_why"] == why and config["dtype"] == ("bfloat16" if unit else "float32")
    assert config["cpu"].startswith("Fake CPU 9000 (flags: avx2; bf16 matrix units: ")
    assert config["n_rehearsal_examples"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows if r["epoch"] > 0)
    assert f"({why}; CPU Fake CPU 9000" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert f"({why})." in report and "- CPU: Fake CPU 9000 (flags: avx2" in report
