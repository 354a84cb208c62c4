"""--teacher-logprobs K: the side file teacher_logprobs.jsonl (fitting tokens to the trace text, the
checked loader), written and resumed by stage 1 for hf (forward pass, checked against an independent
one), openai (the fake server with logprobs), a stand-in vLLM, shards; --score-traces; reference refused."""

import importlib.machinery
import json
import re
import shutil
import sys
import types

import pytest
from helpers import reference_dataset
from test_backends import GSM8K, ChatServer

import q2g.generate.stage as gen
from q2g import cli
from q2g.backends import Sample
from q2g.backends import load as backend_load
from q2g.data.splits import select_split
from q2g.data.teacher_logprobs import (
    TokenLogprobs,
    load_teacher_logprobs,
    side_entry,
    text_sha256,
)
from q2g.errors import DataError

BASE = ["--data-dir", "packaged", "--limit", "6", "--seed", "0"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def correct(problem) -> str:
    return "Work: 1+1 = 2.\nThe final answer is $\\boxed{" + str(problem["answer"]) + "}$. ünï"


def pieces_of(text: str) -> list[bytes]:
    data = text.encode()
    return [data[i : i + 3] for i in range(0, len(data), 3)]  # cuts ü and ï inside their bytes


def fake_tokens(text: str, k: int = 2) -> TokenLogprobs:
    pieces = pieces_of(text)
    lps = [-0.1 * (i % 7) for i in range(len(pieces))]
    return TokenLogprobs(pieces, lps, [[(p, lp), (b"x", lp - 1)][:k] for p, lp in zip(pieces, lps)])


# ---------------------------------------------------------------- the side file


def test_side_entry_fits_tokens_to_the_trace_text():
    text = "A ünï 42."
    row = side_entry("p#s0", "tok", text, fake_tokens(text))
    data = text.encode()
    assert [data[s:e] for s, e in row["spans"]] == pieces_of(text)
    assert row["text_sha256"] == text_sha256(text) and row["logprobs"][:3] == [0.0, -0.1, -0.2]
    # stripped whitespace that is whole tokens, and a stop token after the text, are dropped
    padded = TokenLogprobs([b"\n", *pieces_of(text), b"<|im_end|>"], [-9, *row["logprobs"], -8])
    assert side_entry("p#s0", "tok", text, padded)["spans"] == row["spans"]
    # a trace that starts inside a token (" A" stripped to "A") or was reformatted gets no line
    assert side_entry("p#s0", "tok", text, TokenLogprobs([b" A", text[1:].encode()], [-1, -2])) is None
    assert side_entry("p#s0", "tok", "<think>\nx\n</think>", TokenLogprobs([b"x"], [-1])) is None


def test_loader_checks_the_text_and_names_the_trace_and_line(tmp_path):
    text = "Half is 24. ünï"
    rows = [side_entry(f"p{i}#s0", "tok", text, fake_tokens(text)) for i in range(3)]
    path = tmp_path / "teacher_logprobs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    got = load_teacher_logprobs(path, {"p0#s0": text, "p2#s0": text})  # p1 not asked for: left out
    assert sorted(got) == ["p0#s0", "p2#s0"]
    entry = got["p0#s0"]
    assert b"".join(text.encode()[s:e] for s, e in entry.spans) == text.encode()
    assert [alts[0][0] for alts in entry.top] == pieces_of(text)  # partial UTF-8 bytes survive the JSON
    with pytest.raises(DataError, match=r"teacher_logprobs\.jsonl:3: trace 'p2#s0': text_sha256 does not match"):
        load_teacher_logprobs(path, {"p2#s0": text + "!"})
    rows[0]["spans"][1][0] += 1
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=r":1: trace 'p0#s0': the spans do not cover"):
        load_teacher_logprobs(path, {"p0#s0": text})


# ---------------------------------------------------------------- stage 1 with a scripted teacher


class LogprobBackend:
    """Correct traces, each with fake tokens (3-byte pieces) as vllm / openai hand them back."""

    name = "scripted"

    def generate(self, problems, k, seed):
        return [[Sample(correct(p), 10, logprobs=fake_tokens(correct(p))) for _ in range(k)] for p in problems]


@pytest.fixture()
def scripted(monkeypatch):
    monkeypatch.setattr(backend_load, "load_backend", lambda name, args: LogprobBackend())
    monkeypatch.setattr(gen, "check_teacher", lambda args: None)


def run(out, *extra) -> int:
    return cli.call("generate", [*BASE, "--out", str(out), "--teacher-logprobs", "2", *extra])


def test_side_file_resumes_and_merges_like_the_traces(tmp_path, scripted, monkeypatch):
    clean = tmp_path / "clean"
    assert run(clean, "--batch-size", "2") == 0
    traces, side = read(clean / "traces.jsonl"), read(clean / "teacher_logprobs.jsonl")
    assert [r["id"] for r in side] == [t["id"] for t in traces] and len(traces) >= 4
    assert load_teacher_logprobs(clean / "teacher_logprobs.jsonl", {t["id"]: t["qwen_trace"] for t in traces})

    # killed after batch 2's side-file lines and before its traces: the rerun regenerates batch 2
    cut, calls = tmp_path / "cut", []

    def append(path, rows):
        calls.append(path.name)
        if calls.count("traces.jsonl") == 2:
            raise OSError(28, "No space left on device")
        gen_append(path, rows)

    monkeypatch.setattr(gen, "append_jsonl", append)
    assert run(cut, "--batch-size", "2") != 0
    assert calls[:3] == ["teacher_logprobs.jsonl", "traces.jsonl", "rejected.jsonl"]  # side file first
    monkeypatch.setattr(gen, "append_jsonl", gen_append)
    assert run(cut, "--batch-size", "2") == 0
    assert (cut / "teacher_logprobs.jsonl").read_bytes() == (clean / "teacher_logprobs.jsonl").read_bytes()

    sharded = tmp_path / "sharded"
    assert run(sharded, "--shard", "0/2") == 0 and run(sharded, "--shard", "1/2") == 0
    assert (sharded / "teacher_logprobs.shard-0-of-2.jsonl").exists()
    assert (sharded / "teacher_logprobs.jsonl").read_bytes() == (clean / "teacher_logprobs.jsonl").read_bytes()

    assert run(clean, "--batch-size", "2", "--teacher-logprobs", "3") == 2  # another K: another dataset
    plain = tmp_path / "plain"  # off: not in config.json, like a folder written before the option
    assert cli.call("generate", [*BASE, "--out", str(plain)]) == 0
    assert "teacher_logprobs" not in json.loads((plain / "config.json").read_text())
    assert not (plain / "teacher_logprobs.jsonl").exists() and run(plain) == 2


gen_append = gen.append_jsonl


def test_reference_backend_refuses_teacher_logprobs(tmp_path, capsys):
    assert (
        cli.call("generate", [*BASE, "--backend", "reference", "--teacher-logprobs", "1", "--out", str(tmp_path)]) == 2
    )
    assert "the reference backend has no model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- hf: a forward pass, checked


def independent_logprobs(folder, problem: str, trace: str) -> list[float]:
    import torch

    from q2g.models import load_model, load_tokenizer
    from q2g.prompts import teacher_prompt_ids

    tok, model = load_tokenizer(str(folder)), load_model(str(folder), torch.float32, "cpu")
    prompt, ids = teacher_prompt_ids(tok, problem), tok(trace, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_hf_scores_its_kept_traces_by_a_forward_pass(tmp_path, tiny_qwen_dir, monkeypatch):
    from q2g.backends.hf import HFBackend

    class Scripted(HFBackend):  # the tiny random model's own samples are never correct
        def generate(self, problems, k, seed):
            return [[Sample(correct(p), 10)] * k for p in problems]

    made = []
    monkeypatch.setattr(
        backend_load, "load_backend", lambda name, args: made.append(1) or Scripted(args.teacher, **SAMPLING)
    )
    argv = ["--backend", "hf", "--teacher", str(tiny_qwen_dir), "--limit", "2", "--teacher-logprobs", "3"]
    assert cli.call("generate", [*BASE[:2], *argv, "--out", str(tmp_path)]) == 0
    traces, side = read(tmp_path / "traces.jsonl"), read(tmp_path / "teacher_logprobs.jsonl")
    assert len(side) == len(traces) >= 2 and side[0]["tokenizer"] == str(tiny_qwen_dir)
    expected = independent_logprobs(tiny_qwen_dir, traces[0]["problem"], traces[0]["qwen_trace"])
    assert side[0]["logprobs"] == pytest.approx(expected, abs=2e-5)
    for lp, alts in zip(side[0]["logprobs"], side[0]["top"]):
        assert len(alts) == 3 and alts[0][1] >= alts[1][1] >= alts[2][1] and lp <= alts[0][1] + 1e-5
    assert cli.call("generate", [*BASE[:2], *argv, "--out", str(tmp_path)]) == 0 and len(made) == 1  # done


SAMPLING = dict(temperature=0.0, top_p=1.0, max_new_tokens=8)


def test_score_traces_writes_the_side_file_for_traces_it_did_not_write(tmp_path, tiny_qwen_dir):
    ds = reference_dataset(tmp_path / "ref", limit=2)
    before = (ds / "traces.jsonl").read_bytes()
    argv = ["--backend", "hf", "--teacher", str(tiny_qwen_dir), "--score-traces", str(ds / "traces.jsonl")]
    assert cli.call("generate", [*argv, "--out", str(tmp_path / "scored")]) == 0
    traces = read(ds / "traces.jsonl")
    side = load_teacher_logprobs(
        tmp_path / "scored" / "teacher_logprobs.jsonl", {t["id"]: t["qwen_trace"] for t in traces}
    )
    assert len(side) == len(traces) and all(e.top is None for e in side.values())
    t = traces[-1]
    assert side[t["id"]].logprobs == pytest.approx(
        independent_logprobs(tiny_qwen_dir, t["problem"], t["qwen_trace"]), abs=2e-5
    )
    assert (ds / "traces.jsonl").read_bytes() == before  # its input untouched
    argv[1] = "reference"
    assert cli.call("generate", [*argv, "--out", str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- openai: the fake server with logprobs


WORDS = re.compile(r"\s+|\S+")


class LogprobServer(ChatServer):
    """Chat completions with `logprobs.content` (3-byte pieces); /completions with echo: the prompt's
    whitespace-separated words, each -0.75, then one generated token."""

    def completion(self, body):
        if "prompt" in body:
            words = WORDS.findall(body["prompt"]) + ["X"]
            offsets = [0]
            for w in words[:-1]:
                offsets.append(offsets[-1] + len(w))
            top = [{w: -0.75, "zz": -2.0} for w in words]
            logprobs = {
                "tokens": words,
                "token_logprobs": [None] + [-0.75] * (len(words) - 1),
                "top_logprobs": top,
                "text_offset": offsets,
            }
            choice = {"index": 0, "text": body["prompt"] + "X", "logprobs": logprobs, "finish_reason": "length"}
            return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}
        reply = super().completion(body)
        for choice in reply["choices"]:
            text = choice["message"]["content"]
            k = body.get("top_logprobs", 0)
            content = [
                {
                    "token": p.decode("utf-8", "replace"),
                    "bytes": list(p),
                    "logprob": -0.5,
                    "top_logprobs": [{"token": "t", "bytes": [116], "logprob": -0.5 - j} for j in range(k)],
                }
                for p in pieces_of(text)
            ]
            choice["logprobs"] = {"content": content} if body.get("logprobs") else None
        return reply


def test_openai_keeps_the_servers_token_logprobs(tmp_path):
    gold = {p["problem"]: p for p in select_split(data_dir="packaged", limit=3, seed=0)[0]}
    server = LogprobServer(
        text=lambda body: correct(next(p for q, p in gold.items() if q in body["messages"][1]["content"]))
    )
    try:
        argv = ["--backend", "openai", "--base-url", server.url, "--data-dir", "packaged", "--limit", "3"]
        assert cli.call("generate", [*argv, "--teacher-logprobs", "2", "--out", str(tmp_path)]) == 0
    finally:
        server.close()
    assert all(r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 2 for r in server.requests)
    traces = {t["id"]: t["qwen_trace"] for t in read(tmp_path / "traces.jsonl")}
    side = load_teacher_logprobs(tmp_path / "teacher_logprobs.jsonl", traces)
    assert sorted(side) == sorted(traces)
    for trace_id, entry in side.items():
        assert [traces[trace_id].encode()[s:e] for s, e in entry.spans] == pieces_of(traces[trace_id])
        assert set(entry.logprobs) == {-0.5} and entry.top[0] == [(b"t", -0.5), (b"t", -1.5)]


# ---------------------------------------------------------------- vllm: a stand-in module


def stand_in_vllm(tokenizer_dir, requests):
    from q2g.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    gold = {p["problem"]: p for p in select_split(data_dir="packaged", limit=6, seed=0)[0]}
    out = types.SimpleNamespace

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            pass

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, params, use_tqdm=True):
            if not isinstance(params, list):  # scoring: prompt log-probs of prompt + trace
                requests.append(params.kw)
                return [out(prompt_logprobs=prompt_logprobs(p["prompt_token_ids"])) for p in prompts]
            requests.extend(p.kw for p in params)
            rows = []
            for prompt, p in zip(prompts, params):
                problem = next(v for q, v in gold.items() if q in tok.decode(prompt["prompt_token_ids"]))
                ids = tok(correct(problem), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                lps = [{i: out(logprob=-0.25, rank=1), 7: out(logprob=-3.0, rank=2)} for i in ids]
                completion = out(text=correct(problem), token_ids=ids, finish_reason="stop", logprobs=lps)
                rows.append(out(outputs=[completion] * p.kw["n"]))
            return rows

    def prompt_logprobs(ids):
        return [None] + [{i: out(logprob=-0.125, rank=1), 7: out(logprob=-3.0, rank=2)} for i in ids[1:]]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module, tok


def test_vllm_stand_in_writes_and_resumes_the_side_file(tmp_path, tiny_qwen_dir, monkeypatch):
    requests = []
    module, tok = stand_in_vllm(tiny_qwen_dir, requests)
    monkeypatch.setitem(sys.modules, "vllm", module)
    argv = [
        *BASE,
        "--backend",
        "vllm",
        "--teacher",
        str(tiny_qwen_dir),
        "--teacher-logprobs",
        "2",
        "--batch-size",
        "3",
    ]
    assert cli.call("generate", [*argv, "--out", str(tmp_path / "a")]) == 0
    assert requests and all(r["logprobs"] == 2 for r in requests)
    traces = {t["id"]: t["qwen_trace"] for t in read(tmp_path / "a" / "traces.jsonl")}
    side = load_teacher_logprobs(tmp_path / "a" / "teacher_logprobs.jsonl", traces)
    assert sorted(side) == sorted(traces) and len(traces) >= 4
    entry = side[next(iter(traces))]
    assert len(entry.spans) == len(tok(traces[entry.id], add_special_tokens=False)["input_ids"])  # EOS dropped
    assert set(entry.logprobs) == {-0.25} and [x for _, x in entry.top[0]] == [-0.25, -3.0]
    # resume: lose the last batch's lines of both files, rerun, get the same bytes
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("traces.jsonl", "teacher_logprobs.jsonl"):
        lines = (tmp_path / "b" / name).read_text().splitlines(keepends=True)
        (tmp_path / "b" / name).write_text("".join(lines[:-1]))
    requests.clear()
    assert cli.call("generate", [*argv, "--out", str(tmp_path / "b")]) == 0
    assert len(requests) == 3  # only the last batch again
    for name in ("traces.jsonl", "teacher_logprobs.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_vllm_backend_without_k_asks_for_no_logprobs(tiny_qwen_dir, monkeypatch):
    from q2g.backends.vllm import VLLMBackend

    requests = []
    module, _ = stand_in_vllm(tiny_qwen_dir, requests)
    monkeypatch.setitem(sys.modules, "vllm", module)
    problem = dict(GSM8K, problem=next(iter(select_split(data_dir="packaged", limit=6, seed=0)[0]))["problem"])
    [[sample]] = VLLMBackend("t", temperature=0.0, top_p=1.0, max_new_tokens=8).generate([problem], 1, 0)
    assert "logprobs" not in requests[0] and sample.logprobs is None


def test_openai_scores_traces_by_an_echoed_completion(tmp_path, tiny_qwen_dir):
    ds = reference_dataset(tmp_path / "ref", limit=2)
    server = LogprobServer()
    try:
        argv = ["--backend", "openai", "--base-url", server.url, "--teacher", str(tiny_qwen_dir)]
        argv += ["--score-traces", str(ds / "traces.jsonl"), "--teacher-logprobs", "2", "--out", str(tmp_path / "s")]
        assert cli.call("generate", argv) == 0
    finally:
        server.close()
    assert all(r["path"] == "/v1/completions" and r["body"]["echo"] is True for r in server.requests)
    assert "<|im_start|>assistant" in server.requests[0]["body"]["prompt"]  # the teacher's chat template
    traces = {t["id"]: t["qwen_trace"] for t in read(ds / "traces.jsonl")}
    side = load_teacher_logprobs(tmp_path / "s" / "teacher_logprobs.jsonl", traces)
    assert sorted(side) == sorted(traces)
    for trace_id, entry in side.items():
        assert [traces[trace_id][s:e] for s, e in entry.spans] == WORDS.findall(traces[trace_id])  # ASCII traces
        assert set(entry.logprobs) == {-0.75} and entry.top[1][1] == (b"zz", -2.0)


def test_vllm_scores_traces_by_prompt_logprobs(tmp_path, tiny_qwen_dir, monkeypatch):
    requests = []
    module, tok = stand_in_vllm(tiny_qwen_dir, requests)
    monkeypatch.setitem(sys.modules, "vllm", module)
    ds = reference_dataset(tmp_path / "ref", limit=2)
    argv = ["--backend", "vllm", "--teacher", str(tiny_qwen_dir), "--score-traces", str(ds / "traces.jsonl")]
    assert cli.call("generate", [*argv, "--out", str(tmp_path / "s")]) == 0
    assert requests[0]["prompt_logprobs"] == 0 and requests[0]["max_tokens"] == 1
    traces = {t["id"]: t["qwen_trace"] for t in read(ds / "traces.jsonl")}
    side = load_teacher_logprobs(tmp_path / "s" / "teacher_logprobs.jsonl", traces)
    assert sorted(side) == sorted(traces)
    for trace_id, entry in side.items():
        assert len(entry.spans) == len(tok(traces[trace_id], add_special_tokens=False)["input_ids"])
        assert set(entry.logprobs) == {-0.125} and entry.top is None
