"""Stage 1 end to end on the shipped subsets: files and fields, wrong answers dropped, k > 1
dedup, holdout exclusion, shards, settings refusal, resume after torn writes and after a real
SIGKILL, bad input, and a tiny random Qwen2 teacher whose garbage is all rejected."""

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from faults import delay, faults_env

import q2g.generate.stage as gen
from q2g import cli
from q2g.answers.check import is_correct
from q2g.backends import Sample, stable_int
from q2g.backends import load as backend_load
from q2g.data.loaders import packaged_data_dir
from q2g.data.splits import find_leaks, read_split, select_split

BASE = ["--data-dir", "packaged", "--limit", "10", "--seed", "0"]
TRACE_FIELDS = {
    "problem",
    "qwen_trace",
    "answer",
    "source",
    "validated",
    "id",
    "problem_id",
    "sample",
    "subject",
    "level",
    "teacher",
    "backend",
    "temperature",
    "top_p",
    "seed",
    "extracted_answer",
    "answer_rule",
    "n_tokens",
}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_problems(limit=10) -> list[dict]:
    return select_split(data_dir="packaged", limit=limit, seed=0)[0]


def kind(problem_id: str) -> str:
    return ("distinct", "wrong", "no_answer", "truncated")[stable_int("kind", problem_id) % 4]


class ScriptedBackend:
    """Chosen texts: per problem all-correct (two distinct texts, one repeated), all-wrong,
    no answer, or correct but cut off by the token limit."""

    name = "scripted"

    def __init__(self):
        self.calls = []

    def generate(self, problems, k, seed):
        self.calls.append([p["id"] for p in problems])
        return [[self.sample(p, i) for i in range(k)] for p in problems]

    @staticmethod
    def sample(problem, i):
        kind_ = kind(problem["id"])
        boxed = "The final answer is $\\boxed{" + str(problem["answer"]) + "}$."
        text = {
            "distinct": f"Attempt {i % 2}: work.\n{boxed}",
            "wrong": "So $\\boxed{987654321}$.",
            "no_answer": "I am not sure what to do.",
            "truncated": f"Work... {boxed} and then",
        }[kind_]
        return Sample(text, n_tokens=10 + i, truncated=kind_ == "truncated")


@pytest.fixture()
def scripted(monkeypatch):
    backend = ScriptedBackend()
    monkeypatch.setattr(backend_load, "load_backend", lambda name, args: backend)
    monkeypatch.setattr(gen, "check_teacher", lambda args: None)  # the default hf teacher is not downloaded
    return backend


def run(out, *extra) -> int:
    return cli.call("generate", [*BASE, "--out", str(out), *extra])


# ---------------------------------------------------------------- records


def test_seed_command_line_is_accepted_with_the_documented_defaults():
    args = gen.parse(["--teacher", "Qwen/Qwen2.5-7B-Instruct", "--datasets", "gsm8k", "math"])
    assert (args.teacher, args.datasets, args.backend, args.out) == (
        "Qwen/Qwen2.5-7B-Instruct",
        ["gsm8k", "math"],
        "hf",
        "dataset",
    )
    assert (args.temperature, args.top_p, args.max_new_tokens, args.samples_per_problem) == (0.3, 0.95, 1024, 1)
    assert (args.math_subjects, args.math_levels, args.holdout, args.holdout_fraction) == (
        ["algebra", "counting_and_probability"],
        None,
        "random",
        0.2,
    )


def test_scripted_teacher_keeps_distinct_correct_traces_and_rejects_the_rest(tmp_path, scripted):
    out = tmp_path / "ds"
    assert run(out, "--samples-per-problem", "3", "--batch-size", "5", "--api-key", "sk-secret") == 0
    assert {p.name for p in out.iterdir()} == {
        "traces.jsonl",
        "rejected.jsonl",
        "split.json",
        "holdout.jsonl",
        "summary.json",
        "config.json",
    }
    train = train_problems()
    assert len(train) == 24 and [len(c) for c in scripted.calls] == [5, 5, 5, 5, 4]
    traces, rejected = read(out / "traces.jsonl"), read(out / "rejected.jsonl")
    kinds = Counter(kind(p["id"]) for p in train)
    assert len(traces) == 2 * kinds["distinct"] and len(rejected) == 3 * 24 - len(traces)
    for t in traces:
        assert set(t) == TRACE_FIELDS and t["validated"] is True and kind(t["problem_id"]) == "distinct"
        assert t["id"] == f"{t['problem_id']}#s{t['sample']}" and t["sample"] in (0, 1)
        assert is_correct(t["qwen_trace"], t["answer"], t["source"]) and t["answer_rule"] == "boxed"
        assert (t["backend"], t["teacher"], t["temperature"], t["top_p"], t["seed"]) == (
            "hf",
            "Qwen/Qwen2.5-7B-Instruct",
            0.3,
            0.95,
            0,
        )
    expected = {"distinct": "duplicate", "wrong": "wrong_answer", "no_answer": "no_answer", "truncated": "truncated"}
    assert all(r["reason"] == expected[kind(r["problem_id"])] and r["validated"] is False for r in rejected)
    assert [r["sample"] for r in rejected if r["reason"] == "duplicate"] == [2] * kinds["distinct"]
    # Files are in problem order, samples in order within a problem.
    order = {p["id"]: i for i, p in enumerate(train)}
    assert traces == sorted(traces, key=lambda r: (order[r["problem_id"]], r["sample"]))
    # No trace problem is in the holdout, by id or by normalised problem text.
    manifest = read_split(out)
    assert find_leaks(traces, manifest) == [] and len(manifest["holdout"]) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["total"]["validated"] == len(traces)
    assert summary["total"]["problems"] == 24 and summary["total"]["problems_validated"] == kinds["distinct"]
    assert summary["total"]["rejected"] == {expected[k]: n * (1 if k == "distinct" else 3) for k, n in kinds.items()}
    assert summary["total"]["tokens"] == 24 * (10 + 11 + 12)
    config = (out / "config.json").read_text()
    assert "sk-secret" not in config and json.loads(config)["samples_per_problem"] == 3


def test_reference_backend_validates_every_shipped_problem(tmp_path):
    out = tmp_path / "ref"
    assert cli.call("generate", ["--backend", "reference", "--data-dir", "packaged", "--out", str(out)]) == 0
    traces = read(out / "traces.jsonl")
    assert len(traces) == 384 and (out / "rejected.jsonl").read_text() == ""
    assert all("<<" not in t["qwen_trace"] for t in traces)
    assert all(t["qwen_trace"].endswith(f"$\\boxed{{{t['answer']}}}$.") for t in traces if t["source"] == "gsm8k")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"]["gsm8k"]["yield_pct"] == summary["sources"]["math"]["yield_pct"] == 100.0
    assert find_leaks(traces, read_split(out)) == []


def test_reference_traces_over_the_cap_are_rejected_as_truncated(tmp_path):
    """--max-new-tokens on the reference backend keeps the shorter solutions (the demo's use)."""
    out = tmp_path / "cap"
    args = ["--backend", "reference", "--data-dir", "packaged", "--datasets", "gsm8k", "--limit", "40"]
    assert cli.call("generate", [*args, "--max-new-tokens", "50", "--out", str(out)]) == 0
    traces, rejected = read(out / "traces.jsonl"), read(out / "rejected.jsonl")
    assert traces and rejected and len(traces) + len(rejected) == 32  # 40 problems, 8 held out
    assert all(len(t["qwen_trace"].split()) <= 50 for t in traces)
    assert {r["reason"] for r in rejected} == {"truncated"}


def test_official_test_holdout_never_gets_traces(tmp_path):
    out = tmp_path / "off"
    assert (
        cli.call(
            "generate",
            [
                "--backend",
                "reference",
                "--data-dir",
                "packaged",
                "--limit",
                "20",
                "--holdout",
                "official-test",
                "--out",
                str(out),
            ],
        )
        == 0
    )
    manifest, traces = read_split(out), read(out / "traces.jsonl")
    assert all(e["id"].split("/")[1] == "test" or e["id"].startswith("math/test") for e in manifest["holdout"])
    assert len(traces) == 60 and find_leaks(traces, manifest) == []


def test_yaml_config_section_is_read(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("generate:\n  backend: reference\n  data_dir: packaged\n  limit: 3\n  datasets: [gsm8k]\n")
    assert cli.call("generate", ["--config", str(cfg), "--out", str(tmp_path / "y")]) == 0
    assert len(read(tmp_path / "y" / "traces.jsonl")) == 2  # 3 problems, round(0.2 * 3) = 1 held out


# ---------------------------------------------------------------- shards, settings, bad input


def test_shards_are_disjoint_and_merge_into_the_unsharded_run(tmp_path, scripted, capsys):
    assert run(tmp_path / "all", "--samples-per-problem", "2") == 0
    sharded = tmp_path / "sharded"
    assert run(sharded, "--samples-per-problem", "2", "--shard", "0/2") == 0
    assert not (sharded / "traces.jsonl").exists()  # shard 1 not done: nothing merged yet
    assert run(sharded, "--samples-per-problem", "2", "--merge-shards") == 2
    assert "shard(s) 1/2 not complete" in capsys.readouterr().err
    assert run(sharded, "--samples-per-problem", "2", "--shard", "1/2") == 0
    ids = [
        {r["problem_id"] for name in ("traces", "rejected") for r in read(sharded / f"{name}.shard-{i}-of-2.jsonl")}
        for i in (0, 1)
    ]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {p["id"] for p in train_problems()}
    for name in ("traces.jsonl", "rejected.jsonl"):  # merged automatically by the last shard
        assert (sharded / name).read_bytes() == (tmp_path / "all" / name).read_bytes()
    merged = json.loads((sharded / "summary.json").read_text())
    assert merged["merged_shards"] == 2 and merged["total"]["samples"] == 48
    (sharded / "traces.jsonl").unlink()
    assert run(sharded, "--samples-per-problem", "2", "--merge-shards") == 0
    assert (sharded / "traces.jsonl").read_bytes() == (tmp_path / "all" / "traces.jsonl").read_bytes()


def test_other_settings_are_refused_unless_overwrite(tmp_path, scripted, capsys):
    out = tmp_path / "ds"
    assert run(out) == 0
    before = (out / "traces.jsonl").read_bytes()
    calls = len(scripted.calls)
    assert run(out) == 0 and len(scripted.calls) == calls  # same settings, all done: nothing regenerated
    assert run(out, "--temperature", "0.7") == 2
    err = capsys.readouterr().err
    assert "temperature: 0.3 there, 0.7 now" in err and "--overwrite" in err
    assert (out / "traces.jsonl").read_bytes() == before
    assert run(out, "--batch-size", "3") == 0  # how fast, not what: allowed
    assert run(out, "--temperature", "0.7", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["temperature"] == 0.7
    assert {r["temperature"] for r in read(out / "traces.jsonl")} == {0.7}


def test_broken_data_file_names_file_and_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(packaged_data_dir(), data)
    lines = (data / "gsm8k" / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:30]
    (data / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    assert cli.call("generate", ["--backend", "reference", "--data-dir", str(data), "--out", str(out)]) == 2
    assert "gsm8k/train.jsonl:5: not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_openai_backend_end_to_end_and_auth_failure(tmp_path, capsys):
    from test_backends import ChatServer

    gold = {p["problem"]: p["answer"] for p in train_problems(3)}
    answer = lambda body: "\\boxed{" + next(a for q, a in gold.items() if q in body["messages"][1]["content"]) + "}"
    server = ChatServer(script=[(429, {"Retry-After": "0"}, {"error": "rate limited"})], text=answer)
    try:
        args = ["--backend", "openai", "--base-url", server.url, "--data-dir", "packaged", "--limit", "3"]
        assert cli.call("generate", args + ["--out", str(tmp_path / "ok")]) == 0
        traces = read(tmp_path / "ok" / "traces.jsonl")
        assert len(traces) == len(gold) and all(t["n_tokens"] == 7 for t in traces)
        server.script = [(401, {}, {"error": "bad key"})] * 20
        assert cli.call("generate", args + ["--out", str(tmp_path / "denied")]) == 1
        assert "HTTP 401" in capsys.readouterr().err
        assert not (tmp_path / "denied" / "traces.jsonl").exists()
    finally:
        server.close()


# ---------------------------------------------------------------- resume


def test_torn_line_and_half_written_batch_are_repaired_on_rerun(tmp_path, scripted, monkeypatch):
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    assert run(clean, "--samples-per-problem", "2", "--batch-size", "4") == 0
    shutil.copytree(clean, cut)
    traces, rejected = read(cut / "traces.jsonl"), read(cut / "rejected.jsonl")
    # Lose the last trace (as if torn mid-line) and every reject of the problems in batch 2.
    batch2 = {p["id"] for p in train_problems()[4:8]}
    lost = [traces[-1]] + [r for r in rejected if r["problem_id"] in batch2]
    assert len(lost) >= 2
    kept = [r for r in rejected if r["problem_id"] not in batch2]
    (cut / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    body = "".join(json.dumps(r) + "\n" for r in traces[:-1])
    (cut / "traces.jsonl").write_text(body + json.dumps(traces[-1])[:25])
    appended = []
    monkeypatch.setattr(gen, "append_jsonl", lambda path, rows: appended.extend(rows) or gen_append(path, rows))
    scripted.calls.clear()
    with pytest.warns(UserWarning, match="torn last line"):
        assert run(cut, "--samples-per-problem", "2", "--batch-size", "4") == 0
    assert len(scripted.calls) == 2  # batch 2 and the last batch, each regenerated whole
    assert sorted(r["id"] for r in appended) == sorted(r["id"] for r in lost)  # only what was missing
    for name in ("traces.jsonl", "rejected.jsonl"):
        assert (cut / name).read_bytes() == (clean / name).read_bytes()


gen_append = gen.append_jsonl


def record_set(out: Path) -> set:
    return {
        (r["id"], r["qwen_trace"], r.get("reason"))
        for name in ("traces.jsonl", "rejected.jsonl")
        for r in read(out / name)
    }


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    args = [
        "generate",
        "--backend",
        "reference",
        "--data-dir",
        "packaged",
        "--limit",
        "20",
        "--batch-size",
        "4",
        "--samples-per-problem",
        "2",
    ]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert cli.call("generate", args[1:] + ["--out", str(clean)]) == 0
    env = faults_env(tmp_path, delay("q2g.backends.reference", "ReferenceBackend.generate", 0.3))
    for lines in (12, 28):  # killed twice, the second time while resuming
        proc = subprocess.Popen(
            [sys.executable, "-m", "q2g.cli", *args, "--out", str(killed)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        traces, deadline = killed / "traces.jsonl", time.time() + 60
        while time.time() < deadline and (not traces.exists() or len(traces.read_text().splitlines()) < lines):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        partial = record_set(killed)
        assert lines <= len([r for r in partial if r[2] is None]) < 48  # stopped part-way
        assert partial < record_set(clean)
        assert json.loads((killed / "summary.json").read_text())["complete"] is False
    assert cli.call("generate", args[1:] + ["--out", str(killed)]) == 0
    assert record_set(killed) == record_set(clean) and len(record_set(clean)) == 96
    for name in ("traces.jsonl", "rejected.jsonl"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes()


# ---------------------------------------------------------------- a real (tiny, random) model


def test_tiny_random_qwen_teacher_is_all_rejected(tmp_path, tiny_qwen_dir):
    out = tmp_path / "tiny"
    assert (
        cli.call(
            "generate",
            [
                "--backend",
                "hf",
                "--teacher",
                str(tiny_qwen_dir),
                "--data-dir",
                "packaged",
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--samples-per-problem",
                "2",
                "--out",
                str(out),
            ],
        )
        == 0
    )
    assert (out / "traces.jsonl").read_text() == ""
    rejected = read(out / "rejected.jsonl")
    assert len(rejected) == 2 * len(train_problems(2)) == 12  # limit 2 per stratum: none held out
    assert {r["reason"] for r in rejected} <= {"truncated", "no_answer", "wrong_answer"}
    assert all(r["n_tokens"] == 8 for r in rejected if r["reason"] == "truncated")
    assert all(1 <= r["n_tokens"] <= 8 and r["teacher"] == str(tiny_qwen_dir) for r in rejected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["validated"] == 0 and summary["total"]["yield_pct"] == 0.0
    assert summary["total"]["tokens"] == sum(r["n_tokens"] for r in rejected) and summary["total"]["seconds"] > 0


def test_a_corrupt_line_inside_the_outputs_is_an_error_not_a_silent_skip(tmp_path, scripted, capsys):
    out = tmp_path / "ds"
    assert run(out) == 0
    lines = (out / "traces.jsonl").read_text().splitlines(keepends=True)
    (out / "traces.jsonl").write_text(lines[0] + "{broken\n" + "".join(lines[1:]))
    assert run(out) == 2
    assert "traces.jsonl:2: not valid JSON" in capsys.readouterr().err
