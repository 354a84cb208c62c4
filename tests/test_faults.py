"""Faults: a disk that fills up during `generate` and `finetune`, and `finetune` SIGKILLed at chosen
moments (during a step, during an evaluation, while a checkpoint is written), then rerun.

What must hold: a failed write exits 1 with "disk full: <path>" (never a traceback) and leaves every
file written before it whole (no torn JSONL line, no half adapter, the previous checkpoint); the
rerun (`--resume` for finetune) ends with the same metrics rows as an uninterrupted run, no epoch
missing or twice, and a loadable adapter in final/.

The disk fills in two ways: in-process, q2g.io's `os` is wrapped so writes stop after a byte budget
(ENOSPC, part of the last write landing, as on a real disk); in a subprocess, RLIMIT_FSIZE is
dropped to 0 at the chosen moment (SIGXFSZ ignored, so every write past it fails with EFBIG), which
also hits the libraries' own writes (Trainer checkpoints, safetensors, matplotlib).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import finetune_argv, reference_dataset

from q2g import cli, io
from q2g.finetune import train as trainer

ROWS = [(0, 0, None), (1, 2, 16), (2, 4, 16)]  # (epoch, step, rank): 6 examples / batch 4 = 2 steps an epoch


# ---------------------------------------------------------------- helpers


class FillingDisk:
    """Stands in for q2g.io's `os`: after `budget` bytes, os.write writes what fits, then ENOSPC."""

    def __init__(self, budget: int):
        self.budget, self.failed = budget, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.budget <= 0:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(data[: self.budget]))
        self.budget -= n
        return n


def strict_rows(path: Path) -> list[dict]:
    """Every line whole JSON, the file ending on a newline (no torn tail)."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or "probe" in p.name)


# ---------------------------------------------------------------- io


def test_a_failed_append_or_replace_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    io.append_jsonl(path, [{"a": 1}])
    monkeypatch.setattr(io, "os", FillingDisk(budget=5))  # 5 bytes of the next group land, then ENOSPC
    with pytest.raises(io.WriteFailed, match=f"disk full: {path} \\(No space left on device\\)"):
        io.append_jsonl(path, [{"b": 2}, {"c": 3}])
    assert path.read_text() == '{"a": 1}\n'  # the torn part was cut off again

    target = tmp_path / "summary.json"
    target.write_text("old\n")
    with pytest.raises(io.WriteFailed, match=f"disk full: {target}"):
        io.atomic_write_json(target, {"new": True})
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


# ---------------------------------------------------------------- generate

GEN = ["--backend", "reference", "--data-dir", "packaged", "--limit", "4", "--batch-size", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def clean_generate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ds"
    disk = FillingDisk(budget=10**12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "os", disk)
        assert cli.call("generate", [*GEN, "--out", str(out)]) == 0
    return out, 10**12 - disk.budget  # the folder and the bytes its run wrote


def outputs(out: Path) -> dict:
    return {
        name: (out / name).read_text() for name in ("traces.jsonl", "rejected.jsonl", "split.json", "holdout.jsonl")
    }


@pytest.mark.parametrize("share", [0.1, 0.3, 0.55, 0.8, 0.95])  # holdout.jsonl, an append, summary.json, ...
def test_generate_disk_full_keeps_whole_batches_and_the_rerun_completes(
    share, clean_generate, tmp_path, monkeypatch, capsys
):
    clean, total = clean_generate
    out = tmp_path / "ds"
    disk = FillingDisk(budget=int(total * share))
    monkeypatch.setattr(io, "os", disk)
    assert cli.call("generate", [*GEN, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"disk full: {out}/" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert disk.failed >= 1
    clean_lines = set((clean / "traces.jsonl").read_text().splitlines())
    if (out / "traces.jsonl").exists():  # whole records of the clean run only, none torn
        assert {json.dumps(r, ensure_ascii=False) for r in strict_rows(out / "traces.jsonl")} <= clean_lines
    for name in ("config.json", "split.json", "summary.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # whole, or not there at all
    assert leftovers(out) == []

    monkeypatch.setattr(io, "os", os)  # space freed: the same command resumes
    assert cli.call("generate", [*GEN, "--out", str(out)]) == 0
    assert outputs(out) == outputs(clean)


# ---------------------------------------------------------------- evaluate


def test_evaluate_disk_full_says_so_after_scoring(tiny_gemma_dir, dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    monkeypatch.setattr(io, "os", FillingDisk(budget=0))
    argv = [
        "--model",
        str(tiny_gemma_dir),
        "--split",
        str(dataset / "split.json"),
        "--data-dir",
        "packaged",
        "--out",
        str(out),
        "--eval-limit",
        "1",
        "--eval-max-new-tokens",
        "2",
        "--ppl-max-tokens",
        "32",
        "--ppl-max-length",
        "32",
        "--ppl-stride",
        "16",
    ]
    assert cli.call("evaluate", argv) == 1
    err = capsys.readouterr().err
    assert f"error: disk full: {out / 'generations.jsonl'} (No space left on device)" in err and "Traceback" not in err
    assert leftovers(out) == [] and not (out / "eval.json").exists()


# ---------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=4)


def ft_argv(model, ds, out, *extra):
    return finetune_argv(
        model,
        ds,
        out,
        *extra,
        eval_limit=1,
        eval_max_new_tokens=2,
        ppl_max_tokens=32,
        ppl_max_length=32,
        ppl_stride=16,
    )


def key(rows):
    return [(r["epoch"], r["step"], r["lora_r"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tiny_gemma_dir, dataset, tmp_path_factory):
    """An uninterrupted run: the rows every interrupted one must end with."""
    out = tmp_path_factory.mktemp("reference") / "ck"
    assert cli.call("finetune", ft_argv(tiny_gemma_dir, dataset, out)) == 0
    rows = strict_rows(out / "metrics.jsonl")
    assert key(rows) == ROWS
    return rows


def check_finished(out: Path, reference_rows: list[dict], tiny_gemma_dir):
    rows = strict_rows(out / "metrics.jsonl")
    assert key(rows) == key(reference_rows)  # no epoch missing or twice
    for got, want in zip(rows, reference_rows):  # the same numbers, not just the same epochs
        assert got["adapter"] == want["adapter"]
        assert got["token_perplexity"] == pytest.approx(want["token_perplexity"], rel=1e-4)
    assert json.loads((out / "final" / "selection.json").read_text())["adapter"] == "epoch-2"
    assert (out / "report.md").exists() and leftovers(out) == []
    load_adapter(tiny_gemma_dir, out / "final")


def load_adapter(base, folder: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


# Runs in a subprocess: `where` says when to fill the disk (RLIMIT_FSIZE 0) or to SIGKILL itself.
FAULT = r"""
import os, resource, signal, sys
from transformers import Trainer, TrainerState
from q2g import cli
from q2g.evaluation import core
from q2g.finetune import epochs, stage
from q2g.finetune.loss import LabelOnlyLossTrainer

mode, where = sys.argv[1].split(":")
def fault():
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

def at(owner, name, nth, before=True):
    real, calls = getattr(owner, name), [0]
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == nth and before:
            fault()
        result = real(*a, **k)
        if calls[0] == nth and not before:
            fault()
        return result
    setattr(owner, name, wrapper)

{"step": lambda: at(LabelOnlyLossTrainer, "compute_loss", 4, before=False),  # step 4, after its forward
 "eval": lambda: at(core, "perplexity", 2)       ,                      # epoch 1's evaluation
 "checkpoint": lambda: at(Trainer, "_save_optimizer_and_scheduler", 2),  # checkpoint-4, weights already written
 "trainer_state": lambda: at(TrainerState, "save_to_json", 2),       # checkpoint-4's last file, written in place
 "adapter": lambda: at(epochs, "save_adapter", 2),                   # epoch-2/
 "metrics": lambda: at(epochs, "record", 2),                         # epoch 2's row
 "report": lambda: at(stage, "write_report", 1)}[where]()
sys.exit(cli.call("finetune", sys.argv[2:]))
"""


def run_with_fault(fault, model, ds, out, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    return subprocess.run(
        [sys.executable, str(script), fault, *ft_argv(model, ds, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize(
    "where,rows_left",
    [
        ("trainer_state", ROWS[:2]),  # checkpoint-4's trainer_state.json empty (saved before epoch 2 is scored)
        ("adapter", ROWS[:2]),  # epoch-2/ half written (beside, under a .tmp name)
        ("metrics", ROWS[:2]),  # epoch 2's row: the append is cut back to epoch 1's
        ("report", ROWS),  # after training: final/ is whole, the report is missing
    ],
)
def test_finetune_disk_full_then_resume(where, rows_left, tiny_gemma_dir, dataset, reference, tmp_path, capsys):
    out = tmp_path / "ck"
    proc = run_with_fault(f"full:{where}", tiny_gemma_dir, dataset, out, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: disk full: {out}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "rerun the same command with --resume" in proc.stderr
    assert key(strict_rows(out / "metrics.jsonl")) == rows_left
    json.loads((out / "config.json").read_text())
    # the last whole checkpoint is kept; checkpoint-4 is written before epoch 2's row (save first, then evaluate)
    kept = "checkpoint-4" if where in ("report", "metrics") else "checkpoint-2"
    assert trainer.latest_checkpoint(out) == str(out / kept)
    if where == "trainer_state":
        assert (out / "checkpoint-4" / "trainer_state.json").read_text() == ""
    load_adapter(tiny_gemma_dir, out / "epoch-1")
    if where == "report":
        assert not (out / "report.md").exists() and json.loads((out / "final" / "selection.json").read_text())

    assert cli.call("finetune", ft_argv(tiny_gemma_dir, dataset, out, "--resume")) == 0
    check_finished(out, reference, tiny_gemma_dir)


@pytest.mark.parametrize(
    "where,rows_left,resumed_from",
    [
        ("step", ROWS[:2], "checkpoint-2"),  # killed in the middle of step 4
        ("eval", ROWS[:1], "checkpoint-2"),  # killed while epoch 1 was scored: checkpoint-2 was saved first
        ("checkpoint", ROWS[:2], "checkpoint-2"),  # killed while checkpoint-4 was written (before epoch 2's row)
    ],
)
def test_finetune_sigkill_then_resume(
    where, rows_left, resumed_from, tiny_gemma_dir, dataset, reference, tmp_path, capsys
):
    out = tmp_path / "ck"
    proc = run_with_fault(f"kill:{where}", tiny_gemma_dir, dataset, out, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert key(strict_rows(out / "metrics.jsonl")) == rows_left
    assert not (out / "final").exists()

    assert cli.call("finetune", ft_argv(tiny_gemma_dir, dataset, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert (f"resuming rank 16 from {out / resumed_from}" in printed) if resumed_from else "resuming" not in printed
    check_finished(out, reference, tiny_gemma_dir)


def test_finetune_sigkill_at_a_random_moment_then_resume(tiny_gemma_dir, dataset, reference, tmp_path):
    """Killed at a random time after the baseline row (training, an evaluation, a save, final/, the
    report...); Q2G_KILL_SEED=<seed> replays a failure."""
    seed = int(os.environ.get("Q2G_KILL_SEED") or random.randrange(10**6))
    out = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-m", "q2g.cli", "finetune", *ft_argv(tiny_gemma_dir, dataset, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0, 3))  # the rest of the run takes ~2-4 s here
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert cli.call("finetune", ft_argv(tiny_gemma_dir, dataset, out, "--resume")) == 0, f"Q2G_KILL_SEED={seed}"
    check_finished(out, reference, tiny_gemma_dir)
