"""Teacher backends: reference rewrite, the OpenAI-compatible client (official SDK) against a real
local HTTP server (success, 429 then success, 401, 5xx exhaustion, servers that ignore `n`,
reasoning_content), thinking traces, the hf backend on a tiny random Qwen2, and the vLLM backend's
calls against a stand-in `vllm` module. Faults (hangs, resets, bad bodies): test_openai_faults.py."""

import json
import socket
import struct
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from q2g.answers.check import is_correct
from q2g.backends import BackendError, Sample, split_thinking, stable_seed, thinking_sample
from q2g.backends.load import load_backend
from q2g.backends.openai import AuthError, OpenAIBackend, split_tokens
from q2g.backends.reference import ReferenceBackend, reference_trace
from q2g.data.loaders import load_gsm8k, load_math
from q2g.prompts import FINAL_ANSWER_LINE, teacher_messages

GSM8K = {
    "id": "gsm8k/train/0",
    "source": "gsm8k",
    "subject": None,
    "level": None,
    "problem": "Q?",
    "answer": "1200",
    "reference_solution": "Half is 48/2 = <<48/2=24>>24.\nTotal is 24*50 = <<24*50=1,200>>1,200.\n#### 1,200",
}


# ---------------------------------------------------------------- reference


def test_reference_trace_drops_calculator_notes_and_boxes_the_gsm8k_answer():
    assert reference_trace(GSM8K) == (
        "Half is 48/2 = 24.\nTotal is 24*50 = 1,200.\nThe final answer is $\\boxed{1200}$."
    )
    math = {"source": "math", "reference_solution": "  So $x=\\boxed{3}$.\n", "answer": "3"}
    assert reference_trace(math) == "So $x=\\boxed{3}$."


def test_reference_backend_is_correct_on_every_shipped_problem():
    problems = load_gsm8k("train", "packaged") + load_math("train", data_dir="packaged")
    samples = ReferenceBackend().generate(problems, k=2, seed=0)
    assert len(samples) == len(problems) == 240 + 240
    for problem, (a, b) in zip(problems, samples):
        assert a == b  # one reference per problem: k copies, the generate stage dedups them
        assert "<<" not in a.text and a.n_tokens == len(a.text.split())
        if problem["source"] == "gsm8k":
            assert a.text.endswith(FINAL_ANSWER_LINE.format(answer=problem["answer"]))
        assert is_correct(a.text, problem["answer"], problem["source"]) is True, problem["id"]


def test_reference_backend_counts_tokens_with_a_tokenizer(tiny_qwen_dir):
    backend = ReferenceBackend(tokenizer=str(tiny_qwen_dir))
    [[sample]] = backend.generate([GSM8K], k=1, seed=0)
    assert sample.n_tokens == len(backend.tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    assert sample.n_tokens != len(sample.text.split())


def test_a_reference_over_the_token_cap_is_marked_truncated():
    [[short]] = ReferenceBackend(max_new_tokens=15).generate([GSM8K], k=1, seed=0)
    [[long]] = ReferenceBackend(max_new_tokens=14).generate([GSM8K], k=1, seed=0)
    assert short.n_tokens == long.n_tokens == 15  # words: "Half is 48/2 = 24." ... "$\\boxed{1200}$."
    assert short.truncated is False and long.truncated is True


def test_load_backend_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        load_backend("nope", types.SimpleNamespace(temperature=0.3, top_p=0.9, max_new_tokens=8))


# ---------------------------------------------------------------- openai: a real HTTP server

HANG, RESET = "hang", "reset"  # script bodies: answer after `hang_s` seconds / cut the connection mid-body


class ChatServer:
    """A chat-completions server on 127.0.0.1; `script` is a list of (status, headers, body) answers
    used in order, then normal completions. body: None = a normal completion, bytes = sent as is,
    HANG = a normal completion after `hang_s` seconds, RESET = half a body, then a TCP reset;
    anything else is sent as JSON. `message` adds fields to every completion's message."""

    def __init__(
        self, script=(), choices_per_request=None, text="The final answer is $\\boxed{42}$.", message=None, hang_s=3.0
    ):
        self.script, self.requests, self.text = list(script), [], text
        self.choices_per_request, self.message, self.hang_s = choices_per_request, message or {}, hang_s
        self.lock, self.released = threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    status, headers, payload = server.script.pop(0) if server.script else (200, {}, None)
                if payload == HANG:
                    server.released.wait(server.hang_s)  # bounded; close() releases it at once
                    payload = None
                data = (
                    payload
                    if isinstance(payload, bytes)
                    else json.dumps(server.completion(body) if payload in (None, RESET) else payload).encode()
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if payload == RESET:  # SO_LINGER 0: close() sends RST, not FIN
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        return
                    self.wfile.write(data)
                except OSError:  # the client gave up on a hang: nothing to answer
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def completion(self, body):
        n = body["n"] if self.choices_per_request is None else self.choices_per_request
        text = self.text(body) if callable(self.text) else self.text
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": f"{text} ({i})", **self.message},
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        return {"choices": choices, "usage": {"prompt_tokens": 30, "completion_tokens": 7 * n}}

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def chat_server():
    servers = []

    def start(*args, **kwargs):
        servers.append(ChatServer(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """The SDK's first retry waits 0.5 s (then 1, 2, ...); 10 ms here. Private: if it moves, tests only slow down."""
    monkeypatch.setattr("openai._base_client.INITIAL_RETRY_DELAY", 0.01, raising=False)


def client(url, **kw):
    kw = {"temperature": 0.3, "top_p": 0.95, "max_new_tokens": 64, "api_key": "sk-test", **kw}
    return OpenAIBackend("teacher-model", base_url=url, **kw)


def test_openai_posts_chat_completions_with_the_sampling_settings(chat_server):
    server = chat_server()
    problems = [dict(GSM8K, id=f"p{i}", problem=f"Problem {i}") for i in range(3)]
    samples = client(server.url, concurrency=2).generate(problems, k=2, seed=5)
    assert [[s.text for s in row] for row in samples] == [
        ["The final answer is $\\boxed{42}$. (0)", "The final answer is $\\boxed{42}$. (1)"]
    ] * 3
    assert all(s.n_tokens == 7 and not s.truncated for row in samples for s in row)
    assert len(server.requests) == 3
    request = next(r for r in server.requests if r["body"]["messages"] == teacher_messages("Problem 1"))
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert (body["model"], body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        "teacher-model",
        2,
        0.3,
        0.95,
        64,
    )
    assert body["seed"] == stable_seed(5, "p1", 0)


def test_openai_retries_a_429_and_honours_retry_after(chat_server):
    server = chat_server(script=[(429, {"Retry-After": "0"}, {"error": "slow down"}), (503, {}, {"error": "busy"})])
    [[sample]] = client(server.url).generate([GSM8K], k=1, seed=0)
    assert sample.text.startswith("The final answer is") and len(server.requests) == 3


def test_openai_401_is_an_auth_error_without_retries(chat_server):
    server = chat_server(script=[(401, {}, {"error": {"message": "invalid api key"}})] * 5)
    with pytest.raises(AuthError, match=r"HTTP 401.*invalid api key.*--api-key"):
        client(server.url).generate([GSM8K], k=1, seed=0)
    assert len(server.requests) == 1


def test_openai_gives_up_after_max_retries(chat_server):
    server = chat_server(script=[(500, {}, {"error": "down"})] * 10)
    with pytest.raises(BackendError, match="gave up after 3 tries"):
        client(server.url, max_retries=2).generate([GSM8K], k=1, seed=0)
    assert len(server.requests) == 3


def test_openai_connection_refused_is_retried_then_reported():
    with pytest.raises(BackendError, match="gave up after 2 tries"):
        client("http://127.0.0.1:9/v1", max_retries=1, timeout=2).generate([GSM8K], k=1, seed=0)


def test_openai_asks_again_when_the_server_ignores_n(chat_server):
    server = chat_server(choices_per_request=1)  # llama.cpp / Ollama answer one choice
    [row] = client(server.url).generate([GSM8K], k=3, seed=0)
    assert len(row) == 3 and [r["body"]["n"] for r in server.requests] == [3, 2, 1]
    assert len({r["body"]["seed"] for r in server.requests}) == 3


def test_split_tokens():
    assert split_tokens(10, ["aaaa", "a"]) == [8, 2]
    assert sum(split_tokens(7, ["ab", "abc", "a"])) == 7
    assert split_tokens(None, ["a b c", ""]) == [3, 0]


def test_openai_without_the_sdk_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'q2g\[openai\]'"):
        client("http://127.0.0.1:9/v1")


def test_openai_403_is_an_auth_error_with_the_server_message(chat_server):
    server = chat_server(script=[(403, {}, {"error": {"message": "model not allowed for this key"}})])
    with pytest.raises(AuthError, match=r"HTTP 403: model not allowed for this key.*--api-key"):
        client(server.url, max_retries=3).generate([GSM8K], k=1, seed=0)
    assert len(server.requests) == 1


def test_openai_404_stops_the_run_naming_the_teacher(chat_server):
    server = chat_server(script=[(404, {}, {"error": {"message": "The model `x` does not exist."}})])
    with pytest.raises(BackendError, match=r"HTTP 404.*does not exist.*--teacher 'teacher-model'"):
        client(server.url).generate([GSM8K, dict(GSM8K, id="p2")], k=1, seed=0)


# ---------------------------------------------------------------- thinking teachers

THOUGHT, ANSWER = "Let x be the number. 2x = 84, so x = 42.", "So the final answer is $\\boxed{42}$."


def test_split_thinking_handles_inline_open_missing_and_unclosed_tags():
    assert split_thinking(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}") == (THOUGHT, ANSWER)
    assert split_thinking(f"{THOUGHT}</think>{ANSWER}") == (THOUGHT, ANSWER)  # <think> was in the prompt
    assert split_thinking(f"<think>{THOUGHT}") == (THOUGHT, "")  # cut off while thinking: no answer
    assert split_thinking(ANSWER) == (None, ANSWER)


@pytest.mark.parametrize("source", ["reasoning_content", "reasoning", "inline"])
def test_every_source_of_reasoning_gives_the_same_trace_in_both_modes(source):
    content = f"<think>{THOUGHT}</think>\n{ANSWER}" if source == "inline" else ANSWER
    reasoning = None if source == "inline" else THOUGHT
    kept = thinking_sample(content, 9, False, reasoning=reasoning, mode="reasoning+answer")
    assert kept == Sample(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", 9, False, answer=ANSWER)
    assert kept.answer_text == ANSWER
    dropped = thinking_sample(content, 9, False, reasoning=reasoning, mode="answer")
    assert dropped.text == ANSWER and dropped.answer_text == ANSWER
    assert thinking_sample(ANSWER, 3, False) == Sample(ANSWER, 3, False)  # no thinking: unchanged
    with pytest.raises(ValueError, match="--reasoning must be one of"):
        thinking_sample(ANSWER, 3, False, mode="both")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("mode", ["reasoning+answer", "answer"])
def test_openai_keeps_the_servers_reasoning_field_per_mode(chat_server, field, mode):
    server = chat_server(text=ANSWER, message={field: THOUGHT})
    [[sample]] = client(server.url, reasoning=mode).generate([GSM8K], k=1, seed=0)
    final = f"{ANSWER} (0)"
    assert sample.answer_text == final
    assert sample.text == (final if mode == "answer" else f"<think>\n{THOUGHT}\n</think>\n\n{final}")
    assert sample.n_tokens == 7  # usage.completion_tokens, the thinking included


def test_load_backend_passes_the_reasoning_mode():
    args = types.SimpleNamespace(
        temperature=0.3,
        top_p=0.9,
        max_new_tokens=8,
        teacher="t",
        base_url="http://x/v1",
        api_key=None,
        concurrency=2,
        timeout=1.0,
        max_retries=0,
        reasoning="answer",
    )
    assert load_backend("openai", args).reasoning == "answer"
    del args.reasoning  # a config without the option: the default
    assert load_backend("openai", args).reasoning == "reasoning+answer"


def test_the_answer_is_read_from_the_final_content_not_the_thinking(tmp_path):
    """A teacher that found 42 while thinking but answered 41 is wrong, whatever the mode."""
    from q2g.generate.records import judge

    problem = dict(GSM8K, answer="42")
    wrong = thinking_sample("The final answer is $\\boxed{41}$.", 5, False, reasoning="\\boxed{42}")
    silent = thinking_sample("", 5, False, reasoning="so \\boxed{42}")  # all thinking, no final content
    right = thinking_sample(f"<think>\\boxed{{41}}?</think>{ANSWER}", 5, False)
    records = judge(problem, [wrong, silent, right], {})
    assert [(r["validated"], r.get("reason"), r["extracted_answer"]) for r in records] == [
        (False, "wrong_answer", "41"),
        (False, "no_answer", None),
        (True, None, "42"),
    ]
    assert records[2]["qwen_trace"].startswith("<think>\n\\boxed{41}?\n</think>")


# ---------------------------------------------------------------- hf on a tiny random Qwen2


def test_hf_backend_k_samples_per_problem_and_seeded(tiny_qwen_dir):
    from q2g.backends.hf import HFBackend

    backend = HFBackend(str(tiny_qwen_dir), temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=4)
    assert "<|im_start|>" in backend.tokenizer.decode(backend.prompt_ids("What is 2+2?"))  # chat template
    problems = [dict(GSM8K, id=f"p{i}", problem=f"What is {i}+{i}?") for i in range(3)]
    first = backend.generate(problems, k=2, seed=1)
    assert [len(row) for row in first] == [2, 2, 2]
    assert all(isinstance(s, Sample) and 1 <= s.n_tokens <= 6 for row in first for s in row)
    assert all(s.n_tokens == 6 for row in first for s in row if s.truncated)  # hit the limit
    assert backend.generate(problems, k=2, seed=1) == first  # same batch, same seed: same samples


# ---------------------------------------------------------------- vllm (stand-in module)


def test_vllm_backend_without_vllm_names_the_pip_command(monkeypatch):
    from q2g.backends import vllm as vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'q2g\[vllm\]'"):
        vllm_backend.VLLMBackend("m", temperature=0.3, top_p=0.9, max_new_tokens=8)


def test_vllm_backend_builds_requests_per_vllm_api(monkeypatch, tiny_qwen_dir):
    from q2g.backends.vllm import VLLMBackend
    from q2g.models import load_tokenizer

    calls = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def get_tokenizer(self):
            return load_tokenizer(str(tiny_qwen_dir))

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, [p.kw for p in params]
            out = types.SimpleNamespace
            return [
                out(
                    outputs=[
                        out(text=f"t{j}", token_ids=[1] * (j + 2), finish_reason="length" if j else "stop")
                        for j in range(p.kw["n"])
                    ]
                )
                for p in params
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    backend = VLLMBackend(
        "teacher", temperature=0.3, top_p=0.9, max_new_tokens=8, tensor_parallel_size=2, precision="bf16", seed=3
    )
    assert calls["llm"] == {
        "model": "teacher",
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "seed": 3,
        "trust_remote_code": False,
    }
    rows = backend.generate([GSM8K, dict(GSM8K, id="other")], k=2, seed=3)
    assert rows[0] == [Sample("t0", 2, False), Sample("t1", 3, True)]
    assert calls["params"][0] == {
        "n": 2,
        "seed": stable_seed(3, GSM8K["id"]),
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 8,
    }
    assert calls["params"][0]["seed"] != calls["params"][1]["seed"]
    text = backend.tokenizer.decode(calls["prompts"][0]["prompt_token_ids"])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
