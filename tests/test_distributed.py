"""Several processes on the CPU (gloo, torchrun): the process group's timeout is ddp_timeout, a main
process that is slower than that timeout (its evaluation) does not kill the others, the label-only
loss runs through the DDP wrapper and equals the one-process loss, and FSDP / ZeRO-3 are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults import delay, faults_env
from helpers import finetune_argv, reference_dataset

from q2g import cli, distributed
from q2g.errors import ConfigError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{TESTS}", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_late_main_process_is_waited_for_where_a_collective_times_out(tmp_path):
    late = faults_env(
        tmp_path, delay("q2g.distributed", "share", 6, when="_m.is_main() and _m.num_processes() > 1")
    )  # twice the group's 3 s timeout
    proc = torchrun(str(TESTS / "dist_worker.py"), "store", env=late)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sorted(json.loads(line)["rank"] for line in proc.stdout.splitlines() if line.startswith("{"))
    assert got == [0, 1] and proc.stdout.count('"got": {"row": 1}') == 2
    assert "process-group timeout 3 s" in proc.stdout
    proc = torchrun(str(TESTS / "dist_worker.py"), "collective")
    assert proc.returncode != 0  # the same lateness in a gloo broadcast under that timeout
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[-2000:]


def test_label_only_loss_through_ddp_equals_one_process(tiny_gemma_dir):
    proc = torchrun(str(TESTS / "dist_worker.py"), "loss", str(tiny_gemma_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["loss_path"] == "chunked"
    assert row["loss_ddp"] == pytest.approx(row["loss_plain"], rel=1e-5)
    assert row["grad_diff"] < 1e-5


def test_two_processes_survive_an_evaluation_longer_than_ddp_timeout(tiny_gemma_dir, tmp_path):
    """The finetune stage under torchrun with ddp_timeout=5 s while every main-process evaluation
    (baseline, 2 epochs) takes 8 s longer: the run finishes, with the label-only loss. Each epoch's
    pass@1 is decoded by both processes (3 problems: 2 + 1), and its rows, in subset order, are the
    ones one process decodes from the saved adapter."""
    ds, out = reference_dataset(tmp_path / "ds", limit=4), tmp_path / "ck"
    flags = dict(batch_size=2, max_seq_len=256, eval_max_new_tokens=4, ppl_max_tokens=64, ppl_max_length=64)
    flags["eval_limit"] = 3
    argv = finetune_argv(tiny_gemma_dir, ds, out, "--trainer-arg", "ddp_timeout=5", **flags, ppl_stride=32)
    proc = torchrun(
        "-m",
        "q2g.cli",
        "finetune",
        *argv,
        env=faults_env(tmp_path, delay("q2g.distributed", "share", 8, when="_m.is_main() and _m.num_processes() > 1")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (gloo), process-group timeout 5 s" in proc.stdout
    assert "[finetune] loss: chunked, label tokens only, 2 process(es)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert [r["eval_processes"] for r in rows] == [1, 2, 2] and rows[2]["n_eval"] == 3  # the baseline: main only
    assert_one_process_decodes_the_same(tiny_gemma_dir, ds, out, rows[2])


def assert_one_process_decodes_the_same(model_dir, ds, out, row):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from q2g.data.splits import load_holdout
    from q2g.evaluation.config import EvalConfig
    from q2g.evaluation.core import select_eval_subset
    from q2g.evaluation.pass_at_1 import math_pass_at_1

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / row["adapter"]))
    subset = select_eval_subset(load_holdout(ds / "split.json"), 3)
    cfg = EvalConfig(eval_limit=3, eval_max_new_tokens=4)
    alone = math_pass_at_1(model, AutoTokenizer.from_pretrained(model_dir), subset, cfg, progress=False)
    two = [json.loads(line) for line in (out / row["generations"]).read_text().splitlines()]
    assert [r["id"] for r in two] == [r["id"] for r in subset]
    assert [(r["generation"], r["n_tokens"]) for r in two] == [
        (r["generation"], r["n_tokens"]) for r in alone["generations"]
    ]
    assert row["pass@1"] == alone["pass@1"]


@pytest.mark.parametrize(
    "trainer,env,named",
    [
        ({"fsdp": "full_shard"}, {}, "trainer: fsdp='full_shard'"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, {}, "zero_optimization.stage 3"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, "ACCELERATE_USE_FSDP"),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO-3"),
    ],
)
def test_sharded_modes_are_refused_naming_the_supported_ones(trainer, env, named):
    with pytest.raises(ConfigError) as e:
        distributed.check_parallel_mode(trainer, env)
    assert (
        named in str(e.value) and "Supported: one process, DDP" in str(e.value) and "ZeRO stage 1 or 2" in str(e.value)
    )


def test_ddp_and_zero2_pass_and_a_deepspeed_file_is_read(tmp_path):
    distributed.check_parallel_mode({"deepspeed": {"zero_optimization": {"stage": 2}}}, {})
    distributed.check_parallel_mode(None, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage 3"):
        distributed.check_parallel_mode({"deepspeed": str(ds)}, {})


def test_ddp_timeout_default_and_bad_values():
    assert distributed.timeout_s(None) == distributed.DEFAULT_TIMEOUT_S == 10800
    assert distributed.timeout_s({"ddp_timeout": "7"}) == 7
    with pytest.raises(ConfigError, match="ddp_timeout must be a number"):
        distributed.timeout_s({"ddp_timeout": "soon"})


def test_finetune_refuses_fsdp_before_loading(tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = finetune_argv(tiny_gemma_dir, tmp_path / "no_such_traces", out, "--trainer-arg", "fsdp=full_shard")
    assert cli.call("finetune", argv) == 2
    assert "FSDP, ZeRO-3) are not supported" in capsys.readouterr().err
    assert not out.exists()


def run_config(path, student, trainer=""):
    path.write_text(f"""out: unused
generate:
  backend: reference
  teacher: reference
  data_dir: packaged
  limit: 4
finetune:
  base_model: {student}
  data_dir: packaged
{trainer}""")
    return path


@pytest.mark.parametrize("main", [True, False])
def test_q2g_run_under_a_launcher_generates_on_the_main_process_only(tmp_path, tiny_gemma_dir, monkeypatch, main):
    from q2g import run
    from q2g.finetune import stage as finetune
    from q2g.generate import stage as generate

    calls = []
    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(distributed, "init", lambda s: calls.append(("init", s)))
    monkeypatch.setattr(distributed, "is_main", lambda: main)
    monkeypatch.setattr(distributed, "wait", lambda *a: calls.append("wait"))
    monkeypatch.setattr(generate, "main", lambda argv: calls.append("generate"))
    monkeypatch.setattr(finetune, "main", lambda argv: calls.append("finetune"))
    monkeypatch.setattr(run, "summarize", lambda *a: None)
    (tmp_path / "o" / "dataset").mkdir(parents=True)
    assert run.run_pipeline(run_config(tmp_path / "r.yaml", tiny_gemma_dir), tmp_path / "o") == 0
    expected = ["generate", "wait", "finetune"] if main else ["wait", "finetune"]
    assert calls == [("init", distributed.DEFAULT_TIMEOUT_S), *expected]


def test_q2g_run_refuses_fsdp_before_the_teacher_loads(tmp_path, tiny_gemma_dir, capsys):
    config = run_config(tmp_path / "r.yaml", tiny_gemma_dir, "  trainer:\n    fsdp: full_shard\n")
    assert cli.call("run", ["--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "sharded weights (FSDP, ZeRO-3) are not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shards_deal_every_nth_and_unshard_restores_the_order():
    from q2g.evaluation.core import shards, unshard

    items = list(range(7))
    parts = shards(items, 3)
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts) == items
    assert shards([1], 2) == [[1], []] and unshard([[1], []]) == [1]


def test_one_process_is_not_sharded_and_gathers_itself(tiny_gemma_dir):
    from q2g.evaluation.config import EvalConfig
    from q2g.evaluation.core import sharded_pass_at_1

    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert sharded_pass_at_1(None, None, [{"id": "x"}], EvalConfig()) is None  # main decodes alone, as before
