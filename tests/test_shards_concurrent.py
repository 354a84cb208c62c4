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
