"""Fitting the ecosystem: trackers get every evaluation row, TrainingArguments pass through, and
`accelerate launch` trains on several processes while writing once (tiny Gemma3, CPU, gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import finetune_argv, reference_dataset

from q2g import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=5)


def argv(model, ds, out, *extra):
    return finetune_argv(
        model,
        ds,
        out,
        *extra,
        batch_size=2,
        max_seq_len=256,
        eval_max_new_tokens=4,
        ppl_max_tokens=64,
        ppl_max_length=64,
        ppl_stride=32,
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_evaluation_row(tiny_gemma_dir, dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ck"
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, "--report-to", "tensorboard")) == 0
    rows = metrics(out)
    [run_dir] = list((out / "runs").iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/pass@1", "eval/token_perplexity", "eval/ppl_change", "eval/over_budget", "train/loss"} <= tags
    assert any(t.startswith("eval/pass@1/") for t in tags)  # per source
    ppl = events.Scalars("eval/token_perplexity")
    assert [e.step for e in ppl] == [r["step"] for r in rows] == [0, rows[1]["step"], rows[2]["step"]]
    assert [e.value for e in ppl] == pytest.approx([r["token_perplexity"] for r in rows], rel=1e-6)


def test_trainer_fields_pass_through_and_q2g_options_win(tiny_gemma_dir, dataset, tmp_path, capsys):
    out = tmp_path / "ck"
    config = tmp_path / "ft.yaml"
    config.write_text("finetune:\n  trainer:\n    weight_decay: 0.25\n    adam_beta2: 0.95\n")
    extra = [
        "--config",
        str(config),
        "--trainer-arg",
        "adam_beta2=0.9",
        "--trainer-arg",
        "learning_rate=1",
        "--no-eval",
        "--epochs",
        "1",
    ]
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, *extra)) == 0
    assert "learning_rate are set by q2g's own options" in capsys.readouterr().out
    [ckpt] = list(out.glob("checkpoint-*"))
    targs = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert (targs.weight_decay, targs.adam_beta2, targs.learning_rate) == (0.25, 0.9, 1e-3)  # flag beats YAML


@pytest.mark.parametrize(
    "arg,message",
    [
        ("no_such_field=1", "trainer: 'no_such_field' is not a TrainingArguments field"),
        ("logging_strategy=sometimes", "trainer: TrainingArguments refused the settings"),
        ("weight_decay", "expected KEY=VALUE"),
    ],
)
def test_bad_trainer_field_is_refused_before_anything_is_written(
    tiny_gemma_dir, dataset, tmp_path, capsys, arg, message
):
    out = tmp_path / "ck"
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, "--trainer-arg", arg)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_and_write_once(tiny_gemma_dir, dataset, tmp_path):
    """2 CPU processes (gloo) under torchrun, the launcher `accelerate launch --multi_gpu` uses (on a
    CPU accelerate launches one process unless MPI is set up): one metrics row per evaluation, one
    adapter per epoch, and the optimizer steps of a global batch of 2 processes x batch size."""
    out = tmp_path / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "q2g.cli",
        "finetune",
        *argv(tiny_gemma_dir, dataset, out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    n_examples = json.loads((out / "config.json").read_text())["n_train_examples"]
    steps_per_epoch = math.ceil(n_examples / (2 * 2))  # 2 processes x batch 2, no accumulation
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 0), (1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-1", "epoch-2"]
    assert (out / "final" / "adapter_model.safetensors").exists() and (out / "report.md").exists()
    assert proc.stdout.count("[finetune] baseline: pass@1") == 2  # both processes heard the same row
    assert proc.stdout.count("[finetune] final/: epoch-2") == 1  # ... and one of them wrote
