"""The openai backend against a misbehaving 127.0.0.1 server (issue #12): 500s, 429 with
Retry-After, a hang past the timeout, a body that is not JSON, a connection reset mid-body and an
empty `choices` list. Each is retried or fails its problem with a clear error; nothing crashes and
no problem is dropped: a failed problem is written as `failed`, the run exits 1 and the next run
asks for it again. Timeouts are a fraction of a second and max_retries small, so every test is fast."""

import json
import re
import time

import pytest
from test_backends import GSM8K, HANG, RESET, ChatServer, client  # the 127.0.0.1 server and client settings

from q2g import cli
from q2g.backends import BackendError
from q2g.data.splits import select_split

PROBLEMS = [dict(GSM8K, id=f"p{i}", problem=f"Problem {i}") for i in range(3)]
FAULTS = {  # name: (script entry, what the error of a problem that got only that says)
    "500": ((500, {}, {"error": {"message": "engine died"}}), r"gave up after 2 tries: HTTP 500 engine died"),
    "429": ((429, {"Retry-After": "0.01"}, {"error": {"message": "slow down"}}), r"gave up after 2 tries: HTTP 429"),
    "hang": ((200, {}, HANG), r"gave up after 2 tries: APITimeoutError"),
    "reset": ((200, {}, RESET), r"gave up after 2 tries: APIConnectionError"),
    "not_json": ((200, {}, b'{"choices": [{"message": '), r"not a chat completion"),
    "no_choices": ((200, {}, {"choices": [], "usage": {"completion_tokens": 0}}), r"answered without choices"),
}
RETRIED_BY_THE_SDK = ("500", "429", "hang", "reset")


@pytest.fixture()
def chat_server():
    servers = []
    yield lambda *args, **kw: servers.append(ChatServer(*args, **kw)) or servers[-1]
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """The SDK's first retry waits 0.5 s; 10 ms here (private constant: if it moves, tests only slow down)."""
    monkeypatch.setattr("openai._base_client.INITIAL_RETRY_DELAY", 0.01, raising=False)


def backend(url, **kw):
    return client(url, max_retries=1, timeout=0.5, concurrency=1, **kw)


@pytest.mark.parametrize("name", RETRIED_BY_THE_SDK)
def test_a_transient_fault_is_retried_and_the_problem_succeeds(chat_server, name):
    server = chat_server(script=[FAULTS[name][0]])
    [[sample]] = backend(server.url).generate([GSM8K], k=1, seed=0)
    assert sample.error is None and sample.text.startswith("The final answer is")
    assert len(server.requests) == 2  # the fault, then the retry


def test_retry_after_is_honoured(chat_server):
    # The SDK's own backoff is 10 ms here (fast_backoff): only Retry-After explains the wait.
    server = chat_server(script=[(429, {"Retry-After": "0.4"}, {"error": "slow down"})])
    start = time.monotonic()
    [[sample]] = backend(server.url).generate([GSM8K], k=1, seed=0)
    assert time.monotonic() - start >= 0.4 and sample.error is None and len(server.requests) == 2


@pytest.mark.parametrize("name", FAULTS)
def test_a_lasting_fault_fails_only_its_problem_with_a_clear_error(chat_server, name):
    entry, message = FAULTS[name]
    tries = 2 if name in RETRIED_BY_THE_SDK else 1
    server = chat_server(script=[entry] * tries, hang_s=2.0)  # concurrency 1: problem p0 gets them all
    rows = backend(server.url).generate(PROBLEMS, k=2, seed=0)
    assert [len(row) for row in rows] == [2, 2, 2]  # k samples for every problem, none dropped
    assert all(s.error and s.text == "" for s in rows[0])
    assert rows[0][0].error == rows[0][1].error
    assert re.search(message, rows[0][0].error), rows[0][0].error
    assert all(s.error is None and s.text for row in rows[1:] for s in row)
    assert len(server.requests) == tries + 2


def test_a_batch_where_every_problem_fails_stops_the_run(chat_server):
    server = chat_server(script=[FAULTS["500"][0]] * 20)
    with pytest.raises(BackendError, match=r"every request of the batch failed, e\.g\. p0: gave up after 2 tries"):
        backend(server.url).generate(PROBLEMS[:2], k=1, seed=0)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_records_a_failed_problem_and_the_next_run_asks_again(chat_server, tmp_path, capsys):
    gold = {p["problem"]: p["answer"] for p in select_split(data_dir="packaged", limit=3, seed=0)[0]}
    answer = lambda body: "\\boxed{" + next(a for q, a in gold.items() if q in body["messages"][1]["content"]) + "}"
    server = chat_server(script=[FAULTS["not_json"][0]], text=answer)
    argv = [
        "--backend",
        "openai",
        "--base-url",
        server.url,
        "--data-dir",
        "packaged",
        "--limit",
        "3",
        "--concurrency",
        "1",
        "--max-retries",
        "1",
        "--timeout",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert cli.call("generate", argv) == 1
    err = capsys.readouterr().err
    assert "1 problem(s) failed" in err and "not a chat completion" in err and "Rerun the same command" in err
    [failed] = read(tmp_path / "rejected.jsonl")
    assert failed["reason"] == "failed" and "not a chat completion" in failed["error"]
    assert len(read(tmp_path / "traces.jsonl")) == len(gold) - 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] is False and summary["total"]["rejected"] == {"failed": 1}

    assert cli.call("generate", argv) == 0  # the server answers now: only the failed problem is new
    traces = read(tmp_path / "traces.jsonl")
    assert sorted(t["problem_id"] for t in traces) == sorted(
        p["id"] for p in select_split(data_dir="packaged", limit=3, seed=0)[0]
    )
    assert failed["id"] in {t["id"] for t in traces}
    assert read(tmp_path / "rejected.jsonl") == []  # the failed record was replaced, not kept beside it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] is True and summary["total"]["validated"] == len(gold)
    assert summary["total"]["rejected"] == {}
