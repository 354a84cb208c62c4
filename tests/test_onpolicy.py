"""--distill on-policy (issue 29): a Gemma student samples, a teacher of another family (a Qwen2
tokenizer) scores, byte-aligned chunks carry the reverse-KL advantage.

Unit tests check the pieces by hand (advantages, alignment, a server's prompt log-probs, the
sample text); the runs go end to end with an HF teacher in process and with an OpenAI-compatible
fake server, check teacher = student gives a zero update, the forgetting budget, and a SIGKILL
between a step's sampling and its update resuming without sampling again.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, finetune_argv, prefix_sums, reference_dataset

from q2g import cli
from q2g.finetune import train
from q2g.finetune.distill import onpolicy_data
from q2g.finetune.distill.chunk_kl import NO_CHUNK
from q2g.finetune.distill.onpolicy_data import align, chunk_advantages, sample_text
from q2g.finetune.distill.teacher_score import prompt_logprob_spans

# ---------------------------------------------------------------- the pieces, by hand


def test_chunk_advantages_are_minus_the_chunk_log_ratios():
    student = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25])
    chunk = torch.tensor([0, 0, 1, NO_CHUNK, 2])
    teacher = torch.tensor([-2.5, -1.0, -0.75])
    adv, ratio = chunk_advantages(student, chunk, teacher)
    # chunk 0: (-1 - 2) - (-2.5) = -0.5; chunk 1: -0.5 + 1 = 0.5; chunk 2: -0.25 + 0.75 = 0.5
    assert ratio.tolist() == [-0.5, 0.5, 0.5]
    assert adv.tolist() == [0.5, 0.5, -0.5, 0.0, -0.5]


def test_alignment_of_a_fixed_sample_across_two_tokenizers():
    """Gemma's sampled tokens against the Qwen2 tokenizer's own split of the same text: each
    chunk's teacher log-prob is the sum of the teacher tokens inside it, by hand."""
    from transformers import AutoTokenizer

    from q2g.alignment import byte_spans

    gemma = AutoTokenizer.from_pretrained(ASSETS / "tiny-gemma3")
    qwen = AutoTokenizer.from_pretrained(ASSETS / "tiny-qwen2")
    text = "So 12 + 30 = 42 apples."
    ids = gemma(text, add_special_tokens=False)["input_ids"] + [gemma.eos_token_id]
    got_text, spans_s = sample_text(gemma, ids, {gemma.eos_token_id})
    assert got_text == text and spans_s[-1] is None  # the end token is no part of the text
    spans_t = byte_spans(qwen, text)
    lps_t = [-0.1 * (k + 1) for k in range(len(spans_t))]
    out = align(spans_s, spans_t, lps_t)
    ends = sorted({e for _, e in spans_t} & {sp[1] for sp in spans_s if sp})
    assert len(out["teacher_chunk_logprobs"]) == len(ends)
    for c, end in enumerate(ends):
        start = ends[c - 1] if c else 0
        want = sum(lp for (s, e), lp in zip(spans_t, lps_t) if start <= s and e <= end)
        assert out["teacher_chunk_logprobs"][c] == pytest.approx(want, abs=1e-12)
        members = [i for i, sp in enumerate(spans_s) if sp and start <= sp[0] and sp[1] <= end]
        assert [i for i, k in enumerate(out["chunk"]) if k == c] == members
    assert out["chunk"][-1] == NO_CHUNK
    # the advantage of each student token is minus its chunk's log-ratio
    student_lp = torch.tensor([-0.2 * (i + 1) for i in range(len(ids))])
    adv, ratio = chunk_advantages(student_lp, torch.tensor(out["chunk"]), torch.tensor(out["teacher_chunk_logprobs"]))
    for i, c in enumerate(out["chunk"]):
        if c == NO_CHUNK:
            assert adv[i] == 0
            continue
        s_chunk = sum(student_lp[j].item() for j, k in enumerate(out["chunk"]) if k == c)
        assert adv[i].item() == pytest.approx(-(s_chunk - out["teacher_chunk_logprobs"][c]), abs=1e-6)


def test_sample_text_leaves_out_bytes_that_are_no_utf8():
    from transformers import AutoTokenizer

    from q2g.alignment import token_bytes

    gemma = AutoTokenizer.from_pretrained(ASSETS / "tiny-gemma3")
    lone = [
        i for i in range(len(gemma)) if len(token_bytes(gemma, i)) == 1 and 0x80 <= token_bytes(gemma, i)[0] < 0xC0
    ]
    stray = lone[0]  # a lone UTF-8 continuation byte
    ids = gemma("ab", add_special_tokens=False)["input_ids"]
    text, spans = sample_text(gemma, [stray, *ids, stray], set())
    assert text == "ab" and spans[0] is None and spans[-1] is None
    assert [sp for sp in spans if sp][-1][1] == 2


def test_prompt_logprobs_of_an_echoed_completion():
    context, text = "Q: é?\n", "A: 4ü"  # 'é' and 'ü' are 2 bytes in UTF-8
    full = context + text
    # tokens: "Q: ", "é?\n" | "A", ": 4", "ü" split in two zero-width-then-whole pieces, and a generated one
    offsets = [0, 3, 6, 7, 10, 10, len(full)]
    logprobs = [None, -1.0, -0.5, -0.25, -0.125, -0.0625, -9.0]
    spans, lps = prompt_logprob_spans(offsets, logprobs, context, text)
    assert spans == [(0, 1), (1, 4), (4, 6)]  # bytes of "A", ": 4", "ü"
    assert lps == [-0.5, -0.25, -0.125 - 0.0625]  # the zero-width piece's log-prob goes to the next


def test_a_token_across_the_prompt_border_is_in_no_chunk():
    spans, lps = prompt_logprob_spans([0, 2, 5], [None, -1.0, -2.0], "abc", "def")
    assert spans == [(-1, 2), (2, 3)]  # "cde" straddles: it starts before the text
    out = align([(0, 1), (1, 2), (2, 3)], spans, lps)
    assert out["chunk"] == [NO_CHUNK, NO_CHUNK, 0] and out["teacher_chunk_logprobs"] == [-2.0]


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=3, teacher="reference", backend="reference")


ONPOLICY = ("--distill", "on-policy", "--distill-samples", "2", "--distill-max-tokens", "8", "--optim", "adamw")


def run_argv(student, ds, out, teacher, *extra, **settings):
    settings = {"epochs": 1, "batch_size": 2, **settings}
    return finetune_argv(student, ds, out, *ONPOLICY, "--distill-teacher", str(teacher), *extra, **settings)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "onpolicy").glob("step-*.json"))]


def test_hf_teacher_of_another_family_end_to_end(tiny_gemma_dir, tiny_qwen_dir, dataset, tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli.call("finetune", run_argv(tiny_gemma_dir, dataset, out, tiny_qwen_dir)) == 0
    printed = capsys.readouterr().out
    report_at = printed.index("Tokenizer compatibility over")
    assert report_at < printed.index("training rank 16")  # the report comes before the first step
    assert "digit splitting differs" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["distill"] == "on-policy" and config["distill_info"]["compat"]["chunks"] > 0
    # the memory plan counts the sampled rows (batch 2 x 2 samples) and the teacher beside the student
    assert "on-policy: 4 sampled rows of <= " in config["memory_plan"]["message"]
    assert "the teacher's 0.00B parameters beside the student's" in config["memory_plan"]["message"]
    metrics = rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [0, 1]
    assert metrics[1]["pass@1"] is not None and metrics[1]["ppl_change"] is not None  # evaluated as SFT is
    assert metrics[1]["train_reverse_kl"] == pytest.approx(
        sum(r["reverse_kl"] for r in rows(out / "onpolicy" / "steps.jsonl")) / 2
    )
    records = stored(out)
    assert [(r["step"], r["micro"]) for r in records] == [(1, 0), (2, 0)]
    for r in records:
        assert len(r["samples"]) == 2 * len(r["problem_ids"])
        for s in r["samples"]:
            assert len(s["chunk"]) == len(s["ids"]) <= 8
            assert len(s["teacher_spans"]) == len(s["teacher_logprobs"])
            n = len(s["teacher_chunk_logprobs"])
            assert sorted({c for c in s["chunk"] if c != NO_CHUNK}) == list(range(n))
            assert len(s["student_logprobs"]) == len(s["ids"])
    # each step's reverse KL is the chunk log-ratios of its stored samples, by hand
    by_step = {r["step"]: r for r in rows(out / "onpolicy" / "steps.jsonl")}
    for r in records:
        ratio, tokens = 0.0, 0
        for s in r["samples"]:
            for c, t in enumerate(s["teacher_chunk_logprobs"]):
                members = [lp for lp, k in zip(s["student_logprobs"], s["chunk"]) if k == c]
                ratio += sum(members) - t
                tokens += len(members)
        assert by_step[r["step"]]["reverse_kl"] == pytest.approx(ratio / tokens, rel=1e-9)
        assert by_step[r["step"]]["chunk_tokens"] == tokens
    assert (out / "onpolicy.png").exists() and "--distill on-policy" in (out / "report.md").read_text()
    assert (out / "final" / "adapter_model.safetensors").exists()


class CharServer:
    """An OpenAI-compatible completions server that tokenizes by character and gives each token
    log-prob -0.1 x its UTF-8 bytes, echoing the prompt (as vLLM does with echo + logprobs)."""

    def reply(self, prompt: str) -> dict:
        """One token per character, each -0.1 x its bytes, and a generated "!" at the end."""
        tokens = [*prompt, "!"]
        lps = [None] + [-0.1 * len(c.encode()) for c in tokens[1:]]
        return {"tokens": tokens, "token_logprobs": lps, "text_offset": list(range(len(tokens))), "top_logprobs": None}

    def __init__(self, logprobs: bool = True):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                prompt = body["prompt"]
                logprobs = server.reply(prompt)
                logprobs = logprobs if server.logprobs else None
                choice = {"index": 0, "text": prompt + "!", "logprobs": logprobs, "finish_reason": "length"}
                data = json.dumps(
                    {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.logprobs = logprobs
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_a_server_without_prompt_logprobs_is_said_so():
    from q2g.errors import RunFailed
    from q2g.finetune.distill.teacher_score import OpenAITeacher

    server = CharServer(logprobs=False)
    try:
        teacher = OpenAITeacher("qwen-teacher", server.url)
        assert teacher.score(["Q: 1+1?\n"], [""]) == [([], [])]  # an empty sample costs no request
        with pytest.raises(RunFailed, match="returned no prompt log-probs"):
            teacher.score(["Q: 1+1?\n"], ["2"])
    finally:
        server.httpd.shutdown()
    assert len(server.requests) == 1 and server.requests[0]["prompt"] == "Q: 1+1?\n2"


def test_stored_samples_of_other_problems_are_refused(tmp_path):
    from q2g.errors import DataError

    onpolicy_data.save_step(tmp_path, 3, 1, {"problem_ids": ["a", "b"], "samples": []})
    assert onpolicy_data.load_step(tmp_path, 3, 1, ["a", "b"])["step"] == 3
    assert onpolicy_data.load_step(tmp_path, 3, 0, ["a", "b"]) is None  # never stored: sample
    with pytest.raises(DataError, match="stored for problems"):
        onpolicy_data.load_step(tmp_path, 3, 1, ["a", "c"])


def test_openai_compatible_teacher_end_to_end(tiny_gemma_dir, dataset, tmp_path):
    server = CharServer()
    out = tmp_path / "ck"
    args = run_argv(tiny_gemma_dir, dataset, out, "qwen-teacher", "--distill-base-url", server.url, "--no-eval")
    try:
        assert cli.call("finetune", args) == 0
    finally:
        server.httpd.shutdown()
    samples = [s for r in stored(out) for s in r["samples"]]
    scored = [s for s in samples if s["text"]]
    assert len(server.requests) == len(scored) > 0
    for body in server.requests:
        assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1
    for s in scored:
        assert any(b["prompt"].endswith(s["text"]) for b in server.requests)
        # one teacher token per character: a chunk closes at every character boundary where a student
        # token ends, and its teacher log-prob is -0.1 x its bytes
        width = [0] * len(s["teacher_chunk_logprobs"])
        for c, span in zip(s["chunk"], s["student_spans"]):
            if c != NO_CHUNK:
                width[c] += span[1] - span[0]
        assert s["teacher_chunk_logprobs"] == pytest.approx([-0.1 * w for w in width])
        assert sum(width) == len(s["text"].encode())  # the whole text is in chunks
    steps = rows(out / "onpolicy" / "steps.jsonl")
    assert all(r["reused"] is False and r["samples"] > 0 for r in steps)


def test_teacher_equal_to_student_gives_zero_advantage_and_no_update(tiny_gemma_dir, dataset, tmp_path, monkeypatch):
    captured = {}
    real = train.build_lora_model

    def capture(*a, **k):
        model = real(*a, **k)
        captured["model"], captured["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(train, "build_lora_model", capture)
    out = tmp_path / "ck"
    args = run_argv(
        tiny_gemma_dir,
        dataset,
        out,
        tiny_gemma_dir,
        "--distill-teacher-prompt",
        "student",
        "--no-eval",
        "--lora-dropout",
        "0",
    )
    assert cli.call("finetune", args) == 0
    steps = rows(out / "onpolicy" / "steps.jsonl")
    assert steps and all(r["adv_abs_mean"] == 0.0 and r["reverse_kl"] == 0.0 for r in steps)
    model = captured["model"]
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(p.detach(), captured["before"][name], atol=1e-7, rtol=0), name


KILL_AFTER_STEP_2_SAMPLES = """
import os, signal, sys
from q2g import cli
from q2g.finetune.distill import onpolicy_data
real = onpolicy_data.save_step
def save_step(folder, step, micro, record):
    path = real(folder, step, micro, record)
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the samples are stored; the update never happens
    return path
onpolicy_data.save_step = save_step
sys.exit(cli.call("finetune", sys.argv[1:]))
"""


def test_kill_between_sampling_and_update_resumes_without_sampling_again(
    tiny_gemma_dir, tiny_qwen_dir, dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "ck"
    args = run_argv(tiny_gemma_dir, dataset, out, tiny_qwen_dir, "--no-eval", epochs=2)
    script = tmp_path / "killed_run.py"
    script.write_text(KILL_AFTER_STEP_2_SAMPLES)
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in (out / "onpolicy").glob("step-*.json")}
    assert sorted(before) == ["step-000001.mb0.json", "step-000002.mb0.json"]
    assert not (out / "epoch-1").exists()  # killed inside epoch 1, after step 2's sampling

    drawn = []
    real_draw = onpolicy_data.draw
    monkeypatch.setattr(onpolicy_data, "draw", lambda *a, **k: drawn.append(len(a[2])) or real_draw(*a, **k))
    assert cli.call("finetune", [*args, "--resume"]) == 0
    steps = rows(out / "onpolicy" / "steps.jsonl")
    last = {(r["step"], r["micro"]): r for r in steps}
    assert [k for k, r in last.items() if r["reused"]] == [(1, 0), (2, 0)]  # replayed from the stored samples
    assert [k for k, r in last.items() if not r["reused"]] == [(3, 0), (4, 0)]
    assert drawn == [2, 1]  # steps 3 and 4 only (epoch 2: 3 problems, batch 2)
    for name, data in before.items():
        assert (out / "onpolicy" / name).read_bytes() == data  # never rewritten
    assert [r["epoch"] for r in rows(out / "metrics.jsonl")] == [1, 2]  # --no-eval: no baseline row


def test_forgetting_budget_stops_an_onpolicy_run(tiny_gemma_dir, tiny_qwen_dir, dataset, tmp_path, monkeypatch):
    from q2g.evaluation import core

    values = iter([100.0, 150.0, 150.0])
    monkeypatch.setattr(
        core,
        "perplexity",
        lambda *a, **k: {
            "token_perplexity": next(values),
            "word_perplexity": 1.0,
            "bits_per_byte": 1.0,
            "n_tokens_scored": 8,
        },
    )
    out = tmp_path / "ck"
    args = run_argv(
        tiny_gemma_dir, dataset, out, tiny_qwen_dir, "--forgetting-budget", "0.1", "--on-forgetting", "stop", epochs=2
    )
    assert cli.call("finetune", args) == 0
    assert [(r["epoch"], r["flagged"]) for r in rows(out / "metrics.jsonl")] == [(0, False), (1, True)]
    assert {r["step"] for r in rows(out / "onpolicy" / "steps.jsonl")} == {1, 2}  # epoch 2 never sampled


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "--distill on-policy needs --distill-teacher"),
        (("--distill-teacher", "x", "--distill-samples", "0"), "--distill-samples"),
        (("--distill-teacher", "x", "--distill-temperature", "0"), "--distill-temperature"),
    ],
)
def test_bad_onpolicy_settings_exit_2(tiny_gemma_dir, dataset, tmp_path, capsys, extra, message):
    args = finetune_argv(tiny_gemma_dir, dataset, tmp_path / "ck", "--distill", "on-policy", *extra)
    assert cli.call("finetune", args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_several_processes_are_refused(tiny_gemma_dir, tiny_qwen_dir, dataset, tmp_path, monkeypatch, capsys):
    from q2g import distributed

    monkeypatch.setattr(distributed, "num_processes", lambda: 2)
    args = run_argv(tiny_gemma_dir, dataset, tmp_path / "ck", tiny_qwen_dir, "--no-eval")
    assert cli.call("finetune", args) == 2
    assert "--distill runs in one process" in capsys.readouterr().err


def saved_adapter(model_dir: Path, folder: Path, r: int = 16) -> dict:
    """A LoRA adapter with random (non-zero) A and B, saved as an SFT run saves one."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_init_adapter_starts_from_a_saved_adapter(tiny_gemma_dir, dataset, tmp_path):
    from safetensors.torch import load_file

    saved = saved_adapter(tiny_gemma_dir, tmp_path / "sft")
    out = tmp_path / "ck"
    args = finetune_argv(
        tiny_gemma_dir,
        dataset,
        out,
        "--init-adapter",
        str(tmp_path / "sft"),
        "--no-eval",
        "--optim",
        "adamw",
        epochs=1,
        lr="1e-12",
    )
    assert cli.call("finetune", args) == 0
    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert final.keys() == saved.keys()
    for name, tensor in saved.items():  # trained at lr 1e-12: still the loaded adapter
        assert torch.allclose(final[name], tensor, atol=1e-7, rtol=0), name


def test_init_adapter_of_another_rank_is_refused(tiny_gemma_dir, dataset, tmp_path, capsys):
    saved_adapter(tiny_gemma_dir, tmp_path / "sft", r=8)
    args = finetune_argv(
        tiny_gemma_dir, dataset, tmp_path / "ck", "--init-adapter", str(tmp_path / "sft"), "--no-eval"
    )
    assert cli.call("finetune", args) == 2
    assert "rank 8" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()  # refused before anything is written


def test_kl_anchor_and_rehearsal_with_onpolicy(tiny_gemma_dir, tiny_qwen_dir, dataset, tmp_path):
    out = tmp_path / "ck"
    extra = ("--kl-to-base", "0.1", "--rehearsal-fraction", "0.5", "--rehearsal-max-tokens", "8", "--no-eval")
    assert cli.call("finetune", run_argv(tiny_gemma_dir, dataset, out, tiny_qwen_dir, *extra)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["n_rehearsal_examples"] > 0
    steps = rows(out / "onpolicy" / "steps.jsonl")
    n_examples = config["n_train_examples"]
    assert len(steps) == -(-n_examples // 2)  # one row per micro-batch (batch 2, grad-accum 1)
    # rehearsal examples carry their cross-entropy (weight 1) beside the policy gradient
    assert any("sft_loss" in r for r in steps)


class ModelServer(CharServer):
    """An OpenAI-compatible completions server that scores the echoed prompt with a real causal LM
    (its tokenizer's offsets and its log-softmax), as vLLM does with echo + logprobs."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        super().__init__()

    def reply(self, prompt: str) -> dict:
        enc = self.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(self.model(ids).logits[0].float(), -1)
        token_lps = [None] + [lp[i - 1, t].item() for i, t in enumerate(enc["input_ids"]) if i > 0]
        tokens = self.tok.convert_ids_to_tokens(enc["input_ids"])
        return {"tokens": tokens, "token_logprobs": token_lps, "text_offset": [s for s, _ in enc["offset_mapping"]]}


def test_server_prompt_logprobs_equal_the_in_process_teacher(tiny_qwen_dir, monkeypatch):
    """The same model behind a server (echo + logprobs) and in process: the same spans and log-probs."""
    from q2g.finetune.distill.teacher_score import HFTeacher, OpenAITeacher

    server = ModelServer(tiny_qwen_dir)
    context, texts = "Problem:\nWhat is 12 + 30?\nSolution:\n", ["So 12 + 30 = 42.", "Answer: 42 apples, é ü"]
    try:
        remote = OpenAITeacher("tiny-qwen", server.url).score([context] * 2, texts)
    finally:
        server.httpd.shutdown()
    local = HFTeacher(str(tiny_qwen_dir), "cpu", torch.float32)
    ctx_ids = local.tokenizer(context, add_special_tokens=False)["input_ids"]
    for text, (spans_r, lps_r), (spans_l, lps_l) in zip(texts, remote, local.score([ctx_ids] * 2, texts)):
        # a character split over two byte tokens has one offset on the server: its two log-probs come
        # as one token there; at every byte where both sides end a token, the prefix sums agree
        ends_r, ends_l = prefix_sums(spans_r, lps_r), prefix_sums(spans_l, lps_l)
        assert set(ends_r) <= set(ends_l) and len(ends_l) - len(ends_r) == (2 if "é" in text else 0)
        for end, total in ends_r.items():
            assert total == pytest.approx(ends_l[end], abs=1e-5)


def test_memory_plan_counts_the_sampled_rows_and_an_in_process_teacher(tiny_qwen_dir):
    """An on-policy step holds batch x samples rows of prompt + distill_max_tokens, and an HF
    teacher's weights; a server teacher's weights are not here."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from q2g import memory

    cfg = SimpleNamespace(batch_size=2, distill_samples=3, distill_max_tokens=50, distill_base_url=None)
    cfg.distill_teacher = str(tiny_qwen_dir)
    examples = [
        {"labels": [-100] * 7 + [5, 6], "problem": "a"},
        {"labels": [-100] * 11 + [5], "problem": "b"},
        {"labels": [1, 2, 3], "problem": None},  # a rehearsal text: no prompt, never sampled from
    ]
    rows_, seq_len, teacher = onpolicy_data.memory_shape(cfg, examples)
    assert (rows_, seq_len) == (6, 11 + 50)
    assert teacher == memory.count_params(AutoConfig.from_pretrained(tiny_qwen_dir)) > 0
    cfg.distill_base_url = "http://127.0.0.1:9/v1"
    assert onpolicy_data.memory_shape(cfg, examples) == (6, 61, 0)
    config = AutoConfig.from_pretrained(tiny_qwen_dir)
    shape = memory.TrainShape(rows_, seq_len, 4)
    alone = memory.estimate(config, shape)["total"]
    both = memory.estimate(config, shape, memory.count_params(config) + teacher)["total"]
    assert both - alone == teacher * 4
