"""Generation across machines (README "More than one machine", docs/multi_node.md): three
`q2g generate --shard I/3` processes started at the same time, as a scheduler starts them, then
the merge, give exactly the records of one unsharded run: same ids, same order, same bytes; the
summary differs only in its timing and shard fields. Two layouts: one output folder that every
shard writes into (a shared file system: the last shard to finish merges), and one folder per
node (node-local disks: the shard files are copied into one folder, then `--merge-shards`).
Teachers: the `reference` one and a fake OpenAI server that answers slowly enough for the three
processes to overlap (their requests interleave)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from test_backends import ChatServer

from q2g import cli
from q2g.backends import stable_int
from q2g.data.splits import select_split
from q2g.generate.shards import in_shard

REPO = Path(__file__).resolve().parents[1]
N = 3
BASE = ["--data-dir", "packaged", "--limit", "8", "--seed", "0", "--batch-size", "2", "--samples-per-problem", "2"]
TIMING = {"seconds", "tokens_per_s"}  # differ from run to run
SHARD_FIELDS = {"shard", "merged_shards"}


PROBLEMS = select_split(data_dir="packaged", limit=8, seed=0)[0]
SHARD_OF = {p["problem"]: i for p in PROBLEMS for i in range(N) if in_shard(p["id"], (i, N))}


class SlowTeacher:
    """A fake OpenAI teacher on 127.0.0.1, right on two problems in three (one request per problem).
    `gate()`: it answers nobody until every shard has a request in flight (or 60 s passed), so the
    shard processes provably ran at the same time (`overlapped`). `hold(shard, after)`: that
    shard's requests past the first `after` wait until `release` is set (`held`: one is waiting)."""

    def __init__(self):
        self.gold = {p["problem"]: p["answer"] for p in PROBLEMS}
        self.lock, self.waiting, self.opened = threading.Lock(), set(), None
        self.asked, self.held_shard, self.after = Counter(), None, 0
        self.held, self.release = threading.Event(), threading.Event()
        self.server = ChatServer(text=self.answer)

    def gate(self):
        self.opened = threading.Event()

    def hold(self, shard: int, after: int):
        self.held_shard, self.after = shard, after

    @property
    def overlapped(self) -> bool:
        return self.waiting == set(range(N))

    def answer(self, body) -> str:
        question = max((q for q in self.gold if q in body["messages"][-1]["content"]), key=len)
        shard = SHARD_OF[question]
        with self.lock:
            self.asked[shard] += 1
            hold = shard == self.held_shard and self.asked[shard] > self.after
            if self.opened is not None:
                self.waiting.add(shard)
                if self.overlapped:
                    self.opened.set()
        if self.opened is not None:
            self.opened.wait(60)
        if hold:
            self.held.set()
            self.release.wait(60)
        right = stable_int("right", question) % 3 != 0
        return "Work.\nThe final answer is $\\boxed{" + (self.gold[question] if right else "-987654321") + "}$."

    def argv(self) -> list[str]:
        return ["--backend", "openai", "--teacher", "teacher-model", "--base-url", self.server.url, "--api-key", "k"]


@pytest.fixture()
def slow_teacher():
    teacher = SlowTeacher()
    yield teacher
    teacher.release.set()
    teacher.server.close()


def start_shard(teacher_argv: list[str], i: int, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "q2g.cli", "generate", *teacher_argv, *BASE, "--shard", f"{i}/{N}", "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path) -> str:
    """The shard's output; it must have exited 0."""
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def shards_at_once(teacher_argv: list[str], out_of) -> list[str]:
    """N `q2g generate --shard I/N` processes started together; shard I writes into out_of(I)."""
    logs = [out_of(i).parent / f"shard-{i}.log" for i in range(N)]
    procs = [start_shard(teacher_argv, i, out_of(i), logs[i]) for i in range(N)]
    with killed_at_exit(procs):
        return [finish(p, log) for p, log in zip(procs, logs)]


@contextlib.contextmanager
def killed_at_exit(procs: list[subprocess.Popen]):
    """A failing test leaves no shard process behind."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


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
    assert sum(f"all {N} shards complete: merged" in out for out in done) >= 1  # the last one merged
    assert_same_as_one_run(shared, one)
    for i in range(N):  # each shard's own files stay beside the merge (a rerun resumes from them)
        assert json.loads((shared / f"summary.shard-{i}-of-{N}.json").read_text())["complete"] is True
    if name == "openai":
        assert slow_teacher.overlapped  # all three processes had a request in flight at once


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_shard_killed_mid_run_is_rerun_alone_and_the_merge_is_still_one_run(tmp_path, slow_teacher):
    """A dead node: shard 1 is SIGKILLed with its first batch on disk and its second in flight. The
    other two finish and nothing is merged; the same command rerun for shard 1 asks only for the
    problems it had not written, and its end merges into exactly one run's records."""
    argv = slow_teacher.argv()
    one = unsharded(tmp_path, argv)
    mine = [p for p in PROBLEMS if in_shard(p["id"], (1, N))]
    assert len(mine) > 2  # more than one batch of 2
    slow_teacher.asked.clear()
    slow_teacher.hold(shard=1, after=2)  # the first batch (2 problems) is answered, the second waits
    shared = tmp_path / "shared"
    logs = [tmp_path / f"shard-{i}.log" for i in range(N)]
    procs = [start_shard(argv, i, shared, logs[i]) for i in range(N)]
    with killed_at_exit(procs):
        summary = shared / f"summary.shard-1-of-{N}.json"
        wait_for(lambda: slow_teacher.held.is_set() and summary.exists(), "shard 1's first batch and second request")
        written = json.loads(summary.read_text())
        assert written["total"]["samples"] == 4 and not written["complete"]
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=60)
        slow_teacher.release.set()
        outs = [finish(procs[i], logs[i]) for i in (0, 2)]
    assert not any("shards complete" in out for out in outs) and not (shared / "traces.jsonl").exists()

    slow_teacher.asked.clear()
    slow_teacher.hold(shard=None, after=0)
    rerun = finish(start_shard(argv, 1, shared, logs[1]), logs[1])
    assert slow_teacher.asked == {1: len(mine) - 2}  # the written batch was not asked again
    assert f"all {N} shards complete: merged" in rerun
    assert_same_as_one_run(shared, one)


def test_three_shard_processes_into_their_own_folders_merge_after_a_copy(tmp_path):
    argv = ["--backend", "reference"]
    one = unsharded(tmp_path, argv)
    done = shards_at_once(argv, lambda i: tmp_path / f"node-{i}")
    assert not any("shards complete" in out for out in done)  # no folder holds all shards
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
