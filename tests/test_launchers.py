"""The shipped launcher configs (configs/accelerate/): `accelerate launch --config_file ddp.yaml`
runs two CPU processes (gloo) that train one model together and write once; zero2.yaml is a
DeepSpeed ZeRO-2 config that accelerate reads as it is (DeepSpeed itself is not installed here)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finetune_argv, reference_dataset
from test_ecosystem import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_the_ddp_config_is_multi_process_data_parallel():
    config = load("ddp.yaml")
    assert config.distributed_type == "MULTI_GPU" and not config.use_cpu
    assert config.mixed_precision == "no"  # q2g chooses the precision (--precision)


def test_the_zero2_config_is_deepspeed_stage_2_without_weight_sharding():
    config = load("zero2.yaml")
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2  # 3 would shard the weights: refused by q2g
    assert config.deepspeed_config["zero3_init_flag"] is False
    assert not config.fsdp_config


def test_accelerate_launch_with_the_ddp_config_trains_two_processes_that_write_once(tiny_gemma_dir, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2`, unchanged
    otherwise: on a machine without GPUs accelerate's multi-GPU launcher (torchrun) starts 2 CPU
    processes on gloo. One metrics row per evaluation, the optimizer steps of a global batch of
    2 processes x batch 2, one adapter per epoch, and each process saw world size 2."""
    ds = reference_dataset(tmp_path / "ds", limit=5)
    out = tmp_path / "ck"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "world_size_probe",
        *finetune_argv(
            tiny_gemma_dir,
            ds,
            out,
            batch_size=2,
            max_seq_len=256,
            eval_max_new_tokens=4,
            ppl_max_tokens=64,
            ppl_max_length=64,
            ppl_stride=32,
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worlds = sorted(line for line in proc.stdout.splitlines() if line.startswith("[probe] "))
    assert worlds == ["[probe] rank 0 of 2 (gloo)", "[probe] rank 1 of 2 (gloo)"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n_examples = json.loads((out / "config.json").read_text())["n_train_examples"]
    steps_per_epoch = math.ceil(n_examples / (2 * 2))  # 2 processes x batch 2, no accumulation
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 0), (1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-1", "epoch-2"]
    assert (out / "final" / "adapter_model.safetensors").exists() and (out / "report.md").exists()
    assert proc.stdout.count("[finetune] baseline: pass@1") == 2  # both processes heard the same row
    assert proc.stdout.count("[finetune] final/: epoch-2") == 1  # ... and one of them wrote


@pytest.mark.parametrize("name", ["ddp.yaml", "zero2.yaml"])
def test_each_config_names_its_launch_command(name):
    head = (CONFIGS / name).read_text().splitlines()[:6]
    assert any(f"accelerate launch --config_file configs/accelerate/{name} -m q2g.cli finetune" in h for h in head)


def test_accelerate_launch_takes_the_zero2_config_as_it_is_up_to_deepspeed(tmp_path):
    """Without DeepSpeed installed, `accelerate launch --config_file zero2.yaml` gets as far as its
    DeepSpeed launcher and says what to install (the file itself is accepted)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed: this checks the message shown without it")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero2.yaml")]
    proc = subprocess.run(
        cmd + ["-m", "json.tool", os.devnull], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "in deepspeed_launcher" in proc.stderr and "DeepSpeed is not installed" in proc.stderr
