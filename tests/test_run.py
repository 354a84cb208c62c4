"""`q2g run`: generate -> finetune -> report from one YAML, and a rerun that skips finished stages."""

import json
from pathlib import Path

import pytest

from q2g import cli, run
from q2g.errors import ConfigError


def write_config(path, student, lr=2e-4):
    path.write_text(f"""# q2g run --config {path.name}
out: unused
generate:
  backend: reference
  teacher: reference
  data_dir: packaged
  limit: 4
finetune:
  base_model: {student}
  data_dir: packaged
  epochs: 1
  lr: {lr}
  batch_size: 4
  grad_accum: 1
  max_seq_len: 128
  eval_limit: 2
  eval_max_new_tokens: 4
  ppl_max_tokens: 64
  ppl_max_length: 64
  ppl_stride: 32
""")
    return path


def test_run_then_rerun_skips_and_other_settings_are_refused(tmp_path, tiny_gemma_dir, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_gemma_dir)
    out = tmp_path / "out"
    assert run.run_pipeline(config, out) == 0
    metrics = (out / "checkpoints" / "metrics.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in metrics.splitlines()] == [0, 1]
    assert (out / "checkpoints" / "final" / "adapter_model.safetensors").exists()
    assert (out / "dataset" / "traces.jsonl").read_text().count("\n") == 9  # 12 problems, 3 held out
    printed = capsys.readouterr().out
    assert "| pass@1 overall |" in printed  # the report's table is printed at the end
    assert "s (CPU: " in printed and "bf16 matrix units: none)" in printed  # the wall time says its CPU
    assert "- CPU: " in (out / "checkpoints" / "report.md").read_text()

    assert run.run_pipeline(config, out) == 0  # a rerun: nothing is trained or scored again
    printed = capsys.readouterr().out
    assert "baseline: already in metrics.jsonl" in printed and "trained already" in printed
    assert (out / "checkpoints" / "metrics.jsonl").read_text() == metrics

    other = write_config(tmp_path / "other.yaml", tiny_gemma_dir, lr=1e-3)
    assert cli.call("run", ["--config", str(other), "--out", str(out)]) == 2
    assert "was made with other settings (lr: 0.0002 there, 0.001 now)" in capsys.readouterr().err
    assert (out / "checkpoints" / "metrics.jsonl").read_text() == metrics  # refused: nothing written


def test_eval_batch_size_is_not_a_different_run(tmp_path, tiny_gemma_dir, capsys):
    """Once refused by `q2g run` and accepted by `finetune --resume`: now both accept it."""
    config = write_config(tmp_path / "tiny.yaml", tiny_gemma_dir)
    out = tmp_path / "out"
    assert run.run_pipeline(config, out) == 0
    config.write_text(config.read_text() + "  eval_batch_size: 3\n")
    assert cli.call("run", ["--config", str(config), "--out", str(out)]) == 0


def test_unknown_top_level_key_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\ngenerte: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level key"):
        run.run_pipeline(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="shipped configs: .*demo_quick"):
        run.resolve_config("no-such-config")
    assert run.resolve_config("demo_quick").name == "demo_quick.yaml"


@pytest.mark.parametrize("name", sorted(p.stem for p in run.CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_is_valid(name, tmp_path):
    """Each stage section of every shipped config passes its typed config (no training)."""
    from q2g.finetune import stage as finetune
    from q2g.generate import stage as generate

    path = run.resolve_config(name)
    generate.parse(run.stage_argv("generate", path, tmp_path))
    cfg, eval_cfg = finetune.parse(run.stage_argv("finetune", path, tmp_path))
    assert cfg.out == str(tmp_path / "checkpoints") and eval_cfg.eval_batch_size >= 1
    assert path.read_text().startswith("# q2g ")  # the first line is the command that runs it


def test_the_demo_trains_on_gsm8k_and_scores_unseen_test_problems():
    """`q2g demo`'s sizes (issue 30): the 177 shipped GSM8K train solutions of <= 68 words, 24 GSM8K
    test problems, and the precision left to the CPU (bf16 with AMX / AVX512-BF16, else fp32)."""
    from q2g.backends.reference import ReferenceBackend
    from q2g.data.splits import select_split
    from q2g.finetune import stage as finetune
    from q2g.generate import stage as generate

    config, out = run.resolve_config(run.DEMO_CONFIG), Path("runs/x")
    gen = generate.parse(run.stage_argv("generate", config, out))
    ft, ev = finetune.parse(run.stage_argv("finetune", config, out))
    train, held, _ = select_split(
        datasets=gen.datasets, holdout=gen.holdout, fraction=gen.holdout_fraction, limit=gen.limit, data_dir="packaged"
    )
    assert (len(train), len(held), ev.eval_limit) == (240, 24, 24)
    kept = [s for [s] in ReferenceBackend(max_new_tokens=gen.max_new_tokens).generate(train, 1, 0) if not s.truncated]
    assert len(kept) == 177 and max(s.n_tokens for s in kept) <= 68
    assert {r["source"] for r in train + held} == {"gsm8k"} and ft.precision == "auto" and ft.epochs == 1
    assert not set(r["id"] for r in train) & set(r["id"] for r in held)
