"""Generation across machines (README "More than one machine", docs/multi_node.md): three
`q2g generate --shard I/3` processes started at the same time, as a scheduler starts them, then
the merge, give exactly the records of one unsharded run: same ids, same order, same bytes; the
summary differs only in its timing and shard fields. Two layouts: one output folder that every
shard writes into (a shared file system: the last shard to finish merges), and one folder per
node (node-local disks: the shard files are copied into one folder, then `--merge-shards`).
Teachers: the `reference` one and a fake OpenAI server that answers slowly enough for the three
processes to overlap (their requests interleave)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_backends import ChatServer

import q2g.generate as gen
from q2g import cli

REPO = Path(__file__).resolve().parents[1]
N = 3
BASE = ["--data-dir", "packaged", "--limit", "8", "--seed", "0", "--batch-size", "2", "--samples-per-problem", "2"]
TIMING = {"seconds", "tokens_per_s"}  # differ from run to run
SHARD_FIELDS = {"shard", "merged_shards"}


PROBLEMS = gen.select_split(data_dir="packaged", limit=8, seed=0)[0]
SHARD_OF = {p["problem"]: i for p in PROBLEMS for i in range(N) if gen.in_shard(p["id"], (i, N))}


class SlowTeacher:
    """A fake OpenAI teacher on 127.0.0.1, right on two problems in three. Once `gate()` is called
    it answers nobody until every shard has a request in flight (or 60 s passed), so the shard
    processes provably ran at the same time; `overlapped` says whether that happened."""

    def __init__(self):
        self.gold = {p["problem"]: p["answer"] for p in PROBLEMS}
        self.waiting, self.opened = set(), None
        self.server = ChatServer(text=self.answer)

    def gate(self):
        import threading

        self.opened = threading.Event()

    @property
    def overlapped(self) -> bool:
        return self.waiting == set(range(N))

    def answer(self, body) -> str:
        question = max((q for q in self.gold if q in body["messages"][-1]["content"]), key=len)
        if self.opened is not None:
            self.waiting.add(SHARD_OF[question])
            if self.overlapped:
                self.opened.set()
            self.opened.wait(60)
        right = gen.stable_int("right", question) % 3 != 0
        return "Work.\nThe final answer is $\\boxed{" + (self.gold[question] if right else "-987654321") + "}$."

    def argv(self) -> list[str]:
        return ["--backend", "openai", "--teacher", "teacher-model", "--base-url", self.server.url, "--api-key", "k"]


@pytest.fixture()
def slow_teacher():
    teacher = SlowTeacher()
    yield teacher
    teacher.server.close()


def shards_at_once(teacher_argv: list[str], out_of) -> list[subprocess.CompletedProcess]:
    """N `q2g generate --shard I/N` processes started together; shard I writes into out_of(I)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "q2g.cli", "generate", *teacher_argv, *BASE, "--shard", f"{i}/{N}"]
            + ["--out", str(out_of(i))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N)
    ]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def unsharded(tmp_path: Path, teacher_argv: list[str]) -> Path:
    out = tmp_path / "one-run"
    assert cli.call("generate", [*teacher_argv, *BASE, "--out", str(out)]) == 0
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without(summary: dict, drop: set) -> dict:
    if isinstance(summary, dict):
        return {k: without(v, drop) for k, v in summary.items() if k not in drop}
    return summary


def assert_same_as_one_run(merged: Path, one: Path) -> None:
    for name in ("traces.jsonl", "rejected.jsonl", "split.json", "holdout.jsonl"):
        assert (merged / name).read_bytes() == (one / name).read_bytes(), name
    records = read(merged / "traces.jsonl") + read(merged / "rejected.jsonl")
    assert len({r["id"] for r in records}) == len(records)  # every sample once
    problems = {p["id"] for p in PROBLEMS}
    assert {r["problem_id"] for r in records} == problems
    assert len(records) == 2 * len(problems)  # k = 2 each
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["merged_shards"] == N and summary["complete"] is True
    one_summary = json.loads((one / "summary.json").read_text())
    assert without(summary, TIMING | SHARD_FIELDS) == without(one_summary, TIMING | SHARD_FIELDS)


@pytest.mark.parametrize("name", ["reference", "openai"])
def test_three_shard_processes_into_one_folder_merge_into_one_run(tmp_path, slow_teacher, name):
    argv = ["--backend", "reference"] if name == "reference" else slow_teacher.argv()
    one = unsharded(tmp_path, argv)
    shared = tmp_path / "shared"
    slow_teacher.gate()
    done = shards_at_once(argv, lambda i: shared)
    assert sum(f"all {N} shards complete: merged" in d.stdout for d in done) >= 1  # the last one merged
    assert_same_as_one_run(shared, one)
    for i in range(N):  # each shard's own files stay beside the merge (a rerun resumes from them)
        assert json.loads((shared / f"summary.shard-{i}-of-{N}.json").read_text())["complete"] is True
    if name == "openai":
        assert slow_teacher.overlapped  # all three processes had a request in flight at once


def test_three_shard_processes_into_their_own_folders_merge_after_a_copy(tmp_path):
    argv = ["--backend", "reference"]
    one = unsharded(tmp_path, argv)
    done = shards_at_once(argv, lambda i: tmp_path / f"node-{i}")
    assert not any("shards complete" in d.stdout for d in done)  # no folder holds all shards
    assert not any((tmp_path / f"node-{i}" / "traces.jsonl").exists() for i in range(N))
    merged = tmp_path / "node-0"  # as docs/multi_node.md says: the other nodes' shard files into one folder
    for i in range(1, N):
        for path in (tmp_path / f"node-{i}").glob(f"*.shard-{i}-of-{N}.*"):
            shutil.copy2(path, merged / path.name)
    assert cli.call("generate", [*argv, *BASE, "--merge-shards", "--out", str(merged)]) == 0
    assert_same_as_one_run(merged, one)


FAKE_SBATCH = '''#!/usr/bin/env python3
"""sbatch for the test: runs --wrap at once (an --array's tasks side by side), logs its argv."""
import json, os, subprocess, sys
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
with open(os.environ["FAKE_SBATCH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
job = str(100 + sum(1 for _ in open(os.environ["FAKE_SBATCH_LOG"])))
tasks = [None]
if "array" in args:
    tasks = [t for part in args["array"].split(",") for t in (
        range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
procs = []
for t in tasks:
    env = dict(os.environ, SLURM_JOB_ID=job, **({"SLURM_ARRAY_TASK_ID": str(t)} if t is not None else {}))
    log = args["output"].replace("%A", job).replace("%a", str(t)).replace("%j", job)
    procs.append(subprocess.Popen(["sh", "-c", args["wrap"]], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
codes = [p.wait() for p in procs]
print(job + ";cluster")
'''


def test_the_slurm_array_script_runs_one_shard_per_task_then_the_merge(tmp_path):
    """scripts/slurm_generate_array.sh against a fake sbatch that runs each job at once: N array
    tasks with --shard $SLURM_ARRAY_TASK_ID/N into one folder, the merge after them; the result is
    one run's records, and the merge job's log says it merged N shards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    one = unsharded(tmp_path, ["--backend", "reference"])
    out = tmp_path / "dataset"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "Q2G": f"{sys.executable} -m q2g.cli",
        "LOGS": str(tmp_path / "logs"),
        "FAKE_SBATCH_LOG": str(tmp_path / "sbatch.jsonl"),
        "SBATCH_ARGS": "--partition=gpu --gres=gpu:1",
    }
    cmd = ["bash", str(REPO / "scripts" / "slurm_generate_array.sh"), str(N), str(out), "--backend", "reference"]
    proc = subprocess.run(cmd + BASE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted: shards 101 (tasks 0-2 of 3), merge 102 (after them)" in proc.stdout
    array, merge = read(tmp_path / "sbatch.jsonl")
    assert "--array=0-2" in array and "--requeue" in array and "--partition=gpu" in array
    assert "--dependency=afterany:101" in merge
    assert_same_as_one_run(out, one)
    assert "merged 3 shards" in (tmp_path / "logs" / "merge-102.log").read_text()
    assert sorted(p.name for p in (tmp_path / "logs").glob("generate-*")) == [
        f"generate-101-{i}.log" for i in range(N)
    ]


def test_the_slurm_array_script_refuses_a_bad_shard_count(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_generate_array.sh"), "0", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "N: number of shards, a positive integer" in proc.stderr
