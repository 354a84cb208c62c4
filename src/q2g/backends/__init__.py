"""Teacher backends: where the traces of `q2g generate` come from.

Every backend is a small class with one method (a narrow interface, as in lm-eval):

    generate(problems: list[dict], k: int, seed: int) -> list[list[Sample]]

It returns exactly k samples per problem, in the order of `problems`. `seed` is the run's seed;
a backend derives the seed of a request from it and the problem ids (`stable_seed`), never from a
counter, so a batch regenerated after a crash gives the same samples as the first time.

| name      | what                                              | needs                          |
| --------- | ------------------------------------------------- | ------------------------------ |
| hf        | transformers on this machine (evaluation/decoding) | torch (a GPU for a 7B teacher) |
| vllm      | vLLM's offline engine                             | pip install 'q2g[vllm]', a GPU |
| openai    | any OpenAI-compatible /chat/completions server    | pip install 'q2g[openai]'      |
| reference | the datasets' own worked solutions, no model      | nothing                        |

Heavy imports happen inside the chosen backend's module only.

Thinking teachers (Qwen3, DeepSeek-R1, QwQ) write a chain of thought before their answer: in the
message's `reasoning_content` (vLLM's reasoning parser; `reasoning` on some servers) or inline as
`<think>...</think>`. `--reasoning` decides what becomes the trace, the same way for every source:
`reasoning+answer` (default) keeps it as `<think>\n{reasoning}\n</think>\n\n{answer}`, `answer` keeps
the final content only. Either way the final answer is read from the final content alone
(Sample.answer), never from the thinking.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from q2g.errors import RunFailed
from q2g.optional import require

BACKENDS = ("hf", "vllm", "openai", "reference")
# Problems per batch (the unit of one write and of resume) when --batch-size is not given.
DEFAULT_BATCH_SIZE = {"hf": 32, "vllm": 512, "openai": 64, "reference": 64}
API_KEY_ENVS = ("OPENAI_API_KEY", "Q2G_API_KEY")
REASONING_MODES = ("reasoning+answer", "answer")  # --reasoning: what of a thinking teacher's output is the trace
DEFAULT_REASONING = "reasoning+answer"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# backend -> (the package it imports, the command that installs it); the others need only q2g's own.
EXTRAS = {
    "vllm": "vllm",
    "openai": "openai",
}


@dataclass(frozen=True)
class Sample:
    text: str
    n_tokens: int  # tokens the teacher generated for it (see each backend for how counted)
    truncated: bool = False  # stopped by the token limit, not by the model
    answer: str | None = None  # where the final answer is read from, when not all of `text` (thinking teachers)
    error: str | None = None  # the backend could not get this sample: recorded as failed, asked again next run

    @property
    def answer_text(self) -> str:
        return self.text if self.answer is None else self.answer


class BackendError(RunFailed):
    """The backend failed in a way a retry will not fix; the message says what to do."""


def stable_int(*parts) -> int:
    """A hash of `parts` that is the same in every process (Python's hash() of str is not)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def stable_seed(*parts) -> int:
    return stable_int(*parts) % 2**31


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, final content) of a text that may inline `<think>...</think>`.

    A chat template that opens `<think>` in the prompt (Qwen3, DeepSeek-R1) leaves only the
    closing tag in the output; a `<think>` never closed (cut off by the token limit) is all
    reasoning and no answer. No tags: (None, text).
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    if sep:
        return head.split(THINK_OPEN, 1)[-1].strip(), tail.strip()
    before, sep, after = text.partition(THINK_OPEN)
    if sep and not before.strip():
        return after.strip(), ""
    return None, text


def thinking_sample(
    content: str, n_tokens: int, truncated: bool, *, reasoning: str | None = None, mode: str = DEFAULT_REASONING
) -> Sample:
    """A Sample from a teacher's final content and its reasoning (given apart, or inline in `content`)."""
    if mode not in REASONING_MODES:
        raise ValueError(f"--reasoning must be one of {', '.join(REASONING_MODES)}, got {mode!r}")
    inline, content = split_thinking(content or "")
    reasoning = "\n\n".join(r.strip() for r in (reasoning, inline) if r and r.strip()) or None
    if reasoning is None:
        return Sample(content, n_tokens, truncated)
    content = content.strip()
    text = content if mode == "answer" else f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"
    return Sample(text, n_tokens, truncated, answer=content)


def api_key(args) -> str | None:
    """--api-key, else $OPENAI_API_KEY, else $Q2G_API_KEY (a local server needs none)."""
    if getattr(args, "api_key", None):
        return args.api_key
    return next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)


def check_available(name: str) -> None:
    """Refuse (BadInput, exit 2, with the pip command) a backend whose package is not installed."""
    if name in EXTRAS:
        require(EXTRAS[name], f"--backend {name}")
