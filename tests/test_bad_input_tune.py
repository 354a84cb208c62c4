"""Stage 2's bad input and reliability (issue 20) and the baseline cache (issue 21), on the tiny Gemma3:
refused before anything is written, resume refuses changed result-changing settings, each q2g
callback registered once, a second run with the same settings reuses the cached baseline."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from faults import delay, faults_env
from helpers import finetune_argv, reference_dataset, tiny_training_args
from test_guards import Inject
from test_loss import examples, lora_model
from test_run import write_config
from transformers import TrainerCallback

from q2g import cli
from q2g.evaluation.core import evaluate_model
from q2g.finetune import baseline as baseline_cache
from q2g.finetune import epochs
from q2g.finetune.train import make_trainer
from q2g.guards import NonFiniteError, NonFiniteGuard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("ds"), 12)


def argv(model, ds, out, *extra, **settings):
    return finetune_argv(model, ds, out, *extra, **{"epochs": 1, **settings})


# ---------------------------------------------------------------- refused before anything is written


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--trainer-arg", "weight_decay=abc"), "trainer: weight_decay: must be float, got 'abc'"),
        (("--trainer-arg", "max_grad_norm=[1, 2]"), "trainer: max_grad_norm: must be float"),
        (("--trainer-arg", "seed=1.5"), "trainer: seed: must be int, got 1.5"),
        (("--trainer-arg", "torch_compile=yes please"), "trainer: torch_compile: must be bool"),
        (("--trainer-arg", "no_such_field=1"), "'no_such_field' is not a TrainingArguments field"),
        (("--report-to", "wandb"), "pip install wandb"),
        (("--report-to", "mlflow"), "pip install mlflow"),
        (("--report-to", "trackio", "wandb"), "--report-to trackio needs the trackio package"),
    ],
)
def test_refused_before_config_json(extra, message, tiny_gemma_dir, dataset, tmp_path, capsys):
    for tracker in ("wandb", "mlflow", "trackio"):
        if tracker in extra and importlib.util.find_spec(tracker) is not None:
            pytest.skip(f"{tracker} is installed here")
    out = tmp_path / "ck"
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()  # no config.json, no folder


@pytest.mark.parametrize(
    "make,flag,message",
    [
        (lambda t: t / "afile" / "ck", "--out", "is a file, not a folder"),
        (lambda t: t / "afile" / "deeper" / "ck", "--out", "is a file, not a folder"),
        (lambda t: t / ("x" * 300), "--out", "bytes (the file system allows"),
        (lambda t: t / "ok" / ("y" * 260) / "ck", "--out", "bytes (the file system allows"),
        (lambda t: t / ("z" * 300), "--traces", "bytes (the file system allows"),
        (lambda t: t / ("s" * 300), "--split", "bytes (the file system allows"),
        (lambda t: t / ("b" * 300), "--baseline-from", "bytes (the file system allows"),
    ],
)
def test_paths_the_file_system_cannot_hold(make, flag, message, tiny_gemma_dir, dataset, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path, out = make(tmp_path), tmp_path / "ck"
    args = argv(tiny_gemma_dir, dataset, path if flag == "--out" else out)
    if flag == "--traces":
        args = argv(tiny_gemma_dir, path, out)
    elif flag != "--out":
        args += [flag, str(path)]
    assert cli.call("finetune", args) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and message in err and "Traceback" not in err, err
    assert not out.exists()


def bad_run_config(path, student, **finetune_extra):
    write_config(path, student)
    path.write_text(path.read_text() + "".join(f"  {k}: {v}\n" for k, v in finetune_extra.items()))
    return path


@pytest.mark.parametrize(
    "student,extra,message",
    [
        (None, {"trainer": "{weight_decay: heavy}"}, "trainer: weight_decay: must be float"),
        (None, {"report_to": "[wandb]"}, "pip install wandb"),
        (None, {"target_modules": "[q_projj]"}, "--target-modules: q_projj not in"),
        ("./no/such/student", {}, "no folder ./no/such/student"),
        ("not a hub id!", {}, "is not a hub id"),
    ],
)
def test_q2g_run_checks_finetune_before_generate_writes(student, extra, message, tiny_gemma_dir, tmp_path, capsys):
    if "wandb" in str(extra) and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    config = bad_run_config(tmp_path / "c.yaml", student or tiny_gemma_dir, **extra)
    out = tmp_path / "run"
    assert cli.call("run", ["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()  # generate did not write its folder


def test_q2g_run_out_inside_a_file(tiny_gemma_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = bad_run_config(tmp_path / "c.yaml", tiny_gemma_dir)
    assert cli.call("run", ["--config", str(config), "--out", str(tmp_path / "afile" / "run")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------- resume refuses a changed setting


@pytest.fixture(scope="module")
def finished(tiny_gemma_dir, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ck"
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out)) == 0
    return out


@pytest.mark.parametrize(
    "extra,key",
    [
        (("--trainer-arg", "weight_decay=0.1"), "trainer"),
        (("--trainer-arg", "max_grad_norm=0.5"), "trainer"),
        (("--no-group-by-length",), "group_by_length"),
        (("--lora-r", "8"), "lora_r"),
        (("--eval-limit", "3"), "eval_limit"),
    ],
)
def test_resume_refuses_changed_results_settings(extra, key, finished, tiny_gemma_dir, dataset, capsys):
    before = (finished / "metrics.jsonl").read_text()
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, finished, "--resume", *extra)) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "made with other settings" in err and f"{key}:" in err, err
    assert (finished / "metrics.jsonl").read_text() == before


def test_resume_accepts_a_speed_setting(finished, tiny_gemma_dir, dataset, capsys):
    rows = (finished / "metrics.jsonl").read_text()
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, finished, "--resume", "--eval-batch-size", "3")) == 0
    assert (finished / "metrics.jsonl").read_text() == rows  # nothing trained or evaluated again


def test_config_json_and_report_say_what_ran(finished):
    """Issue 17.4: the loss path, attention, precision and gradient checkpointing (and why) are recorded."""
    config = json.loads((finished / "config.json").read_text())
    assert (config["loss_path"], config["attention"], config["precision_used"]) == ("chunked", "sdpa", "fp32")
    assert config["precision"] == "auto" and config["gradient_checkpointing"] is False  # asked, beside decided
    assert config["gradient_checkpointing_used"] is False and config["gradient_checkpointing_why"].startswith("off")
    assert config["memory_plan"]["action"] == "fits" and config["lora_r"] == 16 and "lora_rank" not in config
    report = (finished / "report.md").read_text()
    assert "- Ran: loss chunked, attention sdpa; gradient checkpointing off: not needed (fits:" in report
    assert [r["lora_r"] for r in rows(finished)] == [None, 16]


# ---------------------------------------------------------------- each q2g callback once


def guarded_trainer(tiny_gemma_dir, tmp_path, guard, bad, steps):
    model = lora_model(tiny_gemma_dir)
    inject = Inject(model, bad)
    args = tiny_training_args(tmp_path, steps)
    run = SimpleNamespace(
        examples=examples(6),
        tokenizer=SimpleNamespace(pad_token_id=0),
        settings=SimpleNamespace(
            loss_path="chunked",
            asked=SimpleNamespace(loss_chunk_size=64, kl_to_base=0.0, distill="none", distill_weight=1.0),
        ),
    )
    trainer = make_trainer(run, model, args, TrainerCallback(), guard)
    trainer.add_callback(inject)
    return trainer


def test_trainer_holds_each_q2g_callback_once(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard()
    trainer = guarded_trainer(tiny_gemma_dir, tmp_path, guard, set(), 1)
    held = trainer.callback_handler.callbacks
    assert sum(c is guard for c in held) == 1 and sum(type(c) is TrainerCallback for c in held) == 1


def test_n_skipped_steps_count_n(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard(skip=True, max_consecutive=1)
    guarded_trainer(tiny_gemma_dir, tmp_path, guard, {2, 4}, 5).train()
    assert guard.skips == 2 and guard.skipped_steps == [2, 4]


def test_consecutive_skips_counted_once_per_step(tiny_gemma_dir, tmp_path):
    guard = NonFiniteGuard(skip=True, max_consecutive=1)  # a second registration reset the count at each step
    with pytest.raises(NonFiniteError, match="after 1 skipped steps in a row"):
        guarded_trainer(tiny_gemma_dir, tmp_path, guard, {2, 3}, 4).train()
    assert guard.skips == 1


# ---------------------------------------------------------------- the baseline cache


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(baseline_cache.FOLDER_ENV, str(folder))
    calls = []
    real = evaluate_model
    monkeypatch.setattr(epochs, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return SimpleNamespace(folder=folder, calls=calls)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_second_run_reuses_the_cached_baseline(cache, tiny_gemma_dir, dataset, tmp_path, capsys):
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "a")) == 0
    assert len(cache.calls) == 2 and len(list(cache.folder.glob("*.json"))) == 1  # baseline + epoch 1
    first = rows(tmp_path / "a")[0]
    assert "reused_from" not in first
    capsys.readouterr()

    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "b", lr="5e-4")) == 0  # training differs
    assert len(cache.calls) == 3  # only epoch 1: the base model was not scored again
    second = rows(tmp_path / "b")[0]
    assert second["reused_from"].startswith(str(cache.folder))
    for k in ("pass@1", "token_perplexity", "heldout_loss"):
        assert second[k] == first[k]
    assert (tmp_path / "b" / second["generations"]).read_text() == (tmp_path / "a" / first["generations"]).read_text()
    assert "reused from the cache" in capsys.readouterr().out
    assert "- Baseline: reused from" in (tmp_path / "b" / "report.md").read_text()

    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "c", eval_limit=3)) == 0
    assert len(cache.calls) == 5 and "reused_from" not in rows(tmp_path / "c")[0]  # another eval setting: a miss
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "d", "--no-baseline-cache")) == 0
    assert len(cache.calls) == 7 and "reused_from" not in rows(tmp_path / "d")[0]


@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda e: "{not json", "damaged"),
        (lambda e: json.dumps({**e, "row": None}), "not a finite baseline row"),
        (lambda e: json.dumps({k: v for k, v in e.items() if k != "row"}), "damaged"),
        (lambda e: json.dumps({**e, "key": {**e["key"], "eval_limit": 99}}), "made for other settings"),
        (lambda e: json.dumps({**e, "format": "other-tool/1"}), "made for other settings"),
        (lambda e: json.dumps({**e, "row": {**e["row"], "token_perplexity": float("nan")}}), "not a finite"),
    ],
)
def test_a_damaged_or_foreign_entry_is_ignored(damage, why, cache, tiny_gemma_dir, dataset, tmp_path, capsys):
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "a")) == 0
    (entry,) = cache.folder.glob("*.json")
    entry.write_text(damage(json.loads(entry.read_text())))
    capsys.readouterr()
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, tmp_path / "b")) == 0
    printed = capsys.readouterr().out
    assert f"baseline cache entry {entry} ignored ({why}" in printed, printed
    assert len(cache.calls) == 4 and "reused_from" not in rows(tmp_path / "b")[0]  # evaluated afresh
    assert baseline_cache.row_ok(json.loads(entry.read_text())["row"])  # and the entry rewritten whole


# ---------------------------------------------------------------- killed during an evaluation


def test_sigkill_during_evaluation_keeps_the_trained_epoch(tiny_gemma_dir, dataset, tmp_path, capsys):
    """Saved first: the epoch's checkpoint exists before its evaluation, so a kill there costs the
    evaluation only; the resumed run evaluates that epoch without training it again."""
    out, log = tmp_path / "ck", tmp_path / "log.txt"
    slow_eval = delay("q2g.finetune.epochs", "evaluate", 60, when="(a[3:4] or [k.get('adapter_dir')])[0] is not None")
    env = faults_env(tmp_path, slow_eval, {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "q2g.cli", "finetune", *argv(tiny_gemma_dir, dataset, out, epochs=2)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.time() + 240
            while "epoch 1 (rank 16): evaluating" not in log.read_text() and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(1)  # inside the evaluation (it sleeps 60 s)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["global_step"]
    assert steps == 5 and [r["epoch"] for r in rows(out)] == [0]  # epoch 1 checkpointed, not scored

    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, "--resume", epochs=2)) == 0
    printed = capsys.readouterr().out
    assert f"resuming rank 16 from {out / 'checkpoint-5'}" in printed
    assert "epoch 1 (rank 16): trained, not evaluated: evaluating" in printed
    assert [(r["epoch"], r["step"]) for r in rows(out)] == [(0, 0), (1, 5), (2, 10)]  # each row once
    first_steps = [
        h["step"]
        for h in json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert first_steps == sorted(set(first_steps))  # no step trained twice
