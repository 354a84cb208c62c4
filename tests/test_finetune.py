"""Stage 2 on the tiny random Gemma3: label masks, a two-epoch run, forgetting policies, resume,
and the input checks (leaks, malformed traces). Traces are the packaged problems' own reference
solutions, as the `reference` teacher writes them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finetune_argv, reference_dataset
from transformers import AutoTokenizer

from q2g import cli
from q2g.examples import IGNORE_INDEX, Collator, build_example
from q2g.finetune import stage as finetune
from q2g.finetune import train as training

ASSETS = Path(__file__).resolve().parent / "assets"
PROBLEM, TRACE = "What is 2+3?", "2+3=5. The final answer is $\\boxed{5}$."


# ---------------------------------------------------------------- examples and labels


def test_label_mask_gemma_plain_format():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-gemma3")
    ex = build_example(tok, PROBLEM, TRACE, 1024)
    ids, labels = ex["input_ids"], ex["labels"]
    assert (len(ids), len(labels)) == (42, 42)
    assert labels == [IGNORE_INDEX] * 20 + ids[20:]  # 20 prompt tokens masked, trace + <eos> trained
    assert tok.decode(ids[:20]) == "<bos>Problem:\nWhat is 2+3?\n\nSolution:\n"
    assert tok.convert_ids_to_tokens(ids[0]) == "<bos>" and tok.convert_ids_to_tokens(ids[-1]) == "<eos>"
    assert tok.decode(ids[20:]) == TRACE + "<eos>"


def test_label_mask_qwen_chatml():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-qwen2")
    ex = build_example(tok, PROBLEM, TRACE, 1024)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == 44
    assert labels == [IGNORE_INDEX] * 22 + ids[22:]
    assert tok.decode(ids[:22]) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[22:]) == TRACE + "<|im_end|>"  # the end of turn is trained: the student learns to stop


@pytest.mark.parametrize("kind,n_prompt", [("tiny-gemma3", 20), ("tiny-qwen2", 22)])
def test_truncation_keeps_prompt_and_cuts_trace(kind, n_prompt):
    tok = AutoTokenizer.from_pretrained(ASSETS / kind)
    full = build_example(tok, PROBLEM, TRACE, 1024)
    cut = build_example(tok, PROBLEM, TRACE, n_prompt + 5)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 5]
    assert cut["labels"] == [IGNORE_INDEX] * n_prompt + full["input_ids"][n_prompt : n_prompt + 5]
    assert build_example(tok, PROBLEM, TRACE, n_prompt) is None  # no room for one target token: skipped
    assert build_example(tok, PROBLEM, TRACE, n_prompt + 1)["labels"][-1] == full["input_ids"][n_prompt]


def test_collator_pads_right_with_masked_labels():
    batch = Collator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_seed_command_line_parses():
    args, _ = finetune.parse(["--base-model", "google/gemma-7b", "--traces", "dataset/", "--epochs", "3"])
    assert (args.base_model, args.traces, args.epochs, args.lora_r, args.lora_alpha) == (
        "google/gemma-7b",
        "dataset/",
        3,
        16,
        32,
    )
    assert (args.target_modules, args.lr, args.batch_size, args.grad_accum, args.optim) == (
        ["q_proj", "v_proj"],
        2e-4,
        8,
        4,
        "adamw_8bit",
    )
    assert (args.forgetting_budget, args.on_forgetting, args.max_seq_len, args.out) == (
        0.05,
        "flag",
        1024,
        "checkpoints/",
    )


def test_precision_on_the_cpu_keeps_fp32_weights():
    import torch

    from q2g.errors import ConfigError
    from q2g.models import Precision, resolve_precision

    assert resolve_precision("auto", "cpu") == Precision(torch.float32, None, "fp32")
    assert resolve_precision("fp32", "cuda") == Precision(torch.float32, None, "fp32")  # fp32 means fp32 everywhere
    p = resolve_precision("bf16", "cpu")
    assert (p.dtype, p.autocast) == (torch.float32, "bf16")  # bf16 autocast only
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_traces_without_split_manifest_are_refused(tmp_path):
    (tmp_path / "traces.jsonl").write_text("{}\n")
    from q2g.errors import DataError
    from q2g.examples import locate_traces

    with pytest.raises(DataError, match="split.json: split manifest not found"):
        locate_traces(str(tmp_path), None)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """split.json + holdout.jsonl + traces.jsonl (reference solutions; one row not validated)."""
    out = reference_dataset(tmp_path_factory.mktemp("dataset"), limit=5, teacher="reference", backend="reference")
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    rows[-1]["validated"] = False
    (out / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def argv(model, ds, out, *extra, epochs=2):
    return finetune_argv(model, ds, out, *extra, epochs=epochs)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, dataset, tmp_path_factory):
    """A two-epoch run; the LoRA model is captured with a snapshot of its weights before training."""
    out = tmp_path_factory.mktemp("run") / "checkpoints"
    captured = {}
    real = training.build_lora_model

    def capture(*a, **k):
        peft_model = real(*a, **k)
        captured["model"] = peft_model
        captured["before"] = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
        return peft_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "build_lora_model", capture)
        assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out)) == 0
    return out, captured


def test_two_epochs_write_a_row_per_evaluation(trained):
    out, _ = trained
    rows = metrics(out)
    assert [(r["epoch"], r["lora_r"]) for r in rows] == [(0, None), (1, 16), (2, 16)]
    assert [r["step"] for r in rows] == [0, 2, 4]  # 7 examples / batch 4 = 2 steps an epoch
    for r in rows:
        assert r["n_eval"] == 2 and r["ppl_tokens_scored"] == 128  # --ppl-max-tokens 128, all scored after <bos>
        assert 0.0 <= r["pass@1"] <= 1.0 and r["token_perplexity"] > 1 and r["flagged"] is False
        gens = (out / r["generations"]).read_text().splitlines()
        assert len(gens) == 2 and {"generation", "correct", "answer"} <= set(json.loads(gens[0]))
    assert rows[1]["train_loss"] > 0 and rows[1]["train_tokens"] > 0 and rows[1]["train_tokens_per_s"] > 0
    assert rows[2]["ppl_change"] == pytest.approx(rows[2]["token_perplexity"] / rows[0]["token_perplexity"] - 1)


def test_outputs_adapters_final_and_config(trained):
    out, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert (config["n_train_examples"], config["n_skipped_prompt_too_long"]) == (7, 4) and config[
        "optim_used"
    ] == "adamw_torch"  # no CUDA: 8-bit falls back
    assert config["teachers"] == [{"teacher": "reference", "backend": "reference", "n": 12}]
    for name in ("epoch-1", "epoch-2", "final"):
        assert (out / name / "adapter_model.safetensors").exists() and (out / name / "tokenizer.json").exists()
    assert json.loads((out / "epoch-2" / "q2g_config.json").read_text())["epoch"] == 2
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == (
        out / "epoch-2" / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((out / "final" / "selection.json").read_text())["adapter"] == "epoch-2"
    report = (out / "report.md").read_text()
    assert "| pass@1 overall |" in report and "| WikiText perplexity (token) |" in report
    assert "reference solutions" in report and (out / "pass_at_1.png").stat().st_size > 1000


def test_adapter_changed_and_base_unchanged(trained):
    _, captured = trained
    after = dict(captured["model"].named_parameters())
    lora = [n for n in captured["before"] if "lora_" in n]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    for name, before in captured["before"].items():
        changed = not after[name].detach().equal(before)
        assert changed == ("lora_" in name), name


# ---------------------------------------------------------------- forgetting policies


def fake_perplexity(monkeypatch, values):
    """Perplexity that follows `values` call by call (the real one barely moves on a random model)."""
    from q2g.evaluation import core

    values = iter(values)

    def perplexity(model, tokenizer, text, cfg, progress=True, precision=None):
        return {"token_perplexity": next(values), "word_perplexity": 1.0, "bits_per_byte": 1.0, "n_tokens_scored": 128}

    monkeypatch.setattr(core, "perplexity", perplexity)


def test_flag_policy_marks_rows_and_continues(tiny_gemma_dir, dataset, tmp_path, monkeypatch):
    fake_perplexity(monkeypatch, [100.0, 101.0, 102.0])
    out = tmp_path / "ck"
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, "--forgetting-budget", "0")) == 0
    assert [(r["epoch"], r["flagged"]) for r in metrics(out)] == [(0, False), (1, True), (2, True)]
    assert json.loads((out / "final" / "selection.json").read_text())["adapter"] == "epoch-2"
    assert "OVER BUDGET: WikiText perplexity +2.0% > 0% allowed" in (out / "report.md").read_text()


def test_stop_policy_ends_training_without_an_adapter(tiny_gemma_dir, dataset, tmp_path, monkeypatch):
    fake_perplexity(monkeypatch, [100.0, 101.0, 102.0])
    out = tmp_path / "ck"
    args = argv(tiny_gemma_dir, dataset, out, "--forgetting-budget", "0", "--on-forgetting", "stop", epochs=3)
    assert cli.call("finetune", args) == 0
    assert [r["epoch"] for r in metrics(out)] == [0, 1]  # stopped after epoch 1
    assert not (out / "epoch-2").exists()
    assert not (out / "final" / "adapter_model.safetensors").exists()
    assert "base model" in (out / "final" / "README.md").read_text()
    assert "No adapter stayed within budget" in (out / "report.md").read_text()


def test_reduce_rank_retrains_at_half_rank(tiny_gemma_dir, dataset, tmp_path, monkeypatch):
    fake_perplexity(monkeypatch, [100.0, 110.0, 100.0, 99.0])  # r16 epoch 1 over; r8 within
    out = tmp_path / "ck"
    args = argv(tiny_gemma_dir, dataset, out, "--forgetting-budget", "0", "--on-forgetting", "reduce-rank")
    assert cli.call("finetune", args) == 0
    assert [(r["lora_r"], r["epoch"], r["flagged"]) for r in metrics(out)] == [
        (None, 0, False),
        (16, 1, True),
        (8, 1, False),
        (8, 2, False),
    ]
    adapter = json.loads((out / "rank-8" / "epoch-2" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)  # alpha / r kept at 2
    assert json.loads((out / "final" / "selection.json").read_text())["adapter"] == "rank-8/epoch-2"


# ---------------------------------------------------------------- resume after SIGKILL

KILL_AFTER_FIRST_SAVE = """
import os, signal, sys
from q2g import cli
from q2g.finetune import train as training
real = training.make_callback
def make_callback(*a, **k):
    cb = real(*a, **k)
    cb.on_save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # after checkpoint-2, before epoch 1's evaluation
    return cb
training.make_callback = make_callback
sys.exit(cli.call("finetune", sys.argv[1:]))
"""


def test_resume_after_kill(tiny_gemma_dir, dataset, tmp_path, capsys):
    out = tmp_path / "ck"
    script = tmp_path / "killed_run.py"
    script.write_text(KILL_AFTER_FIRST_SAVE)
    proc = subprocess.run(
        [sys.executable, str(script), *argv(tiny_gemma_dir, dataset, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "final").exists()
    assert [r["epoch"] for r in metrics(out)] == [0]  # saved first: killed before epoch 1 was evaluated

    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out)) == 2  # an existing run needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert cli.call("finetune", argv(tiny_gemma_dir, dataset, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"resuming rank 16 from {out / 'checkpoint-2'}" in printed
    assert "epoch 1 (rank 16): trained, not evaluated: evaluating" in printed  # not trained again
    rows = metrics(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 0), (1, 2), (2, 4)]  # kept, not duplicated
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


# ---------------------------------------------------------------- input checks


def test_holdout_leak_is_refused(tiny_gemma_dir, dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("split.json", "holdout.jsonl"):
        (ds / name).write_text((dataset / name).read_text())
    held = json.loads((dataset / "holdout.jsonl").read_text().splitlines()[0])
    rows = (dataset / "traces.jsonl").read_text()
    leak = {**held, "id": "copied", "qwen_trace": "x", "validated": True}
    (ds / "traces.jsonl").write_text(rows + json.dumps(leak) + "\n")
    assert cli.call("finetune", argv(tiny_gemma_dir, ds, tmp_path / "ck")) == 2
    err = capsys.readouterr().err
    assert "1 of 12 validated traces are holdout problems" in err
    assert f"copied = holdout {held['id']} (by problem_hash)" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "traces.jsonl: no traces (the file is empty)"),
        (
            '{"problem": "p", "qwen_trace": "t", "answer": "1", "source": "gsm8k"}\n{not json\n',
            "traces.jsonl:2: not valid JSON",
        ),
        ('{"problem": "p", "answer": "1", "source": "gsm8k"}\n', "traces.jsonl:1: missing field(s) qwen_trace"),
        (
            '{"problem": "p", "qwen_trace": "t", "answer": "1", "source": "gsm8k", "validated": false}\n',
            "none of the 1 traces is marked `validated: true`",
        ),
    ],
)
def test_bad_traces_file_names_file_and_line(tiny_gemma_dir, dataset, tmp_path, capsys, content, message):
    (tmp_path / "split.json").write_text((dataset / "split.json").read_text())
    traces = tmp_path / "traces.jsonl"
    traces.write_text(content)
    assert cli.call("finetune", argv(tiny_gemma_dir, traces, tmp_path / "ck")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {traces}") and message in err
