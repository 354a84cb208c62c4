"""The `openai` backend: any OpenAI-compatible chat completions endpoint, through the official SDK.

    pip install 'q2g[openai]'
    vllm serve Qwen/Qwen3-8B --reasoning-parser qwen3      # or SGLang, llama.cpp, Ollama, a hosted API
    q2g generate --backend openai --base-url http://localhost:8000/v1 --teacher Qwen/Qwen3-8B

Each problem is one `chat.completions.create` with messages = prompts.teacher_messages(problem),
temperature, top_p, max_tokens, n=k and a seed derived from the run seed and the problem id; at
most --concurrency in flight. Servers that ignore `n` (llama.cpp, Ollama) answer one choice; the
rest is asked for in further requests.

--teacher-logprobs K adds `logprobs=True, top_logprobs=K` and keeps each choice's tokens
(Sample.logprobs); --score-traces asks /completions with `echo` + `logprobs` for the log-probs
of prompt + trace (`score`), where the server supports it (vLLM's and llama.cpp's servers do).

Retries and timeouts are the SDK's: --timeout seconds per attempt, --max-retries retries of
408/409/429/5xx, timeouts and connection errors (a connection reset mid-body included), with
exponential backoff and the server's Retry-After honoured. What is left after them:
- 401/403 (AuthError) and 404 (wrong --base-url or --teacher) stop the run: every request would fail;
- anything else (retries used up, a 400, a body that is not JSON, no choices) fails that problem
  only: it comes back as k samples with `error` set, which generate records as `failed` and asks
  for again on the next run. When every problem of a batch fails the server is down or
  misconfigured, and the batch raises BackendError instead of recording a whole dataset of failures.

Thinking teachers: the reasoning is message.reasoning_content (vLLM's reasoning parser), else
message.reasoning, else inline <think>...</think>; --reasoning keeps it or not (see q2g.backends).
`n_tokens` comes from usage.completion_tokens (reasoning included); with several choices in one
answer that total is shared out in proportion to their text lengths (exact for k = 1). Without
usage: word count.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from q2g.backends import DEFAULT_REASONING, BackendError, Sample, stable_seed, thinking_sample
from q2g.data.teacher_logprobs import TokenLogprobs
from q2g.errors import BadInput
from q2g.models import load_tokenizer
from q2g.prompts import teacher_messages, teacher_prompt

DEFAULT_BASE_URL = "http://localhost:8000/v1"  # vLLM's server; --base-url or $OPENAI_BASE_URL else
NO_KEY = "EMPTY"  # the SDK insists on a key; a local server ignores it (vLLM's own examples use this)


class AuthError(BackendError):
    pass


class ProblemError(Exception):
    """One problem could not be generated; the others of its batch go on."""


def import_openai():
    try:
        import openai
    except ImportError:
        raise ImportError("the openai backend needs the OpenAI SDK: pip install 'q2g[openai]'") from None
    return openai


def split_tokens(total: int | None, texts: list[str]) -> list[int]:
    """Share a reply's completion_tokens out over its choices, by text length."""
    if total is None:
        return [len(t.split()) for t in texts]
    weights = [max(len(t), 1) for t in texts]
    shares = [total * w // sum(weights) for w in weights]
    shares[-1] += total - sum(shares)
    return shares


def detail(error) -> str:
    """The server's own words from an SDK error: body.message when it sent one."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("message") or body
    return str(body or error)[:300]


def tries(error, max_retries: int) -> int:
    """Attempts behind an SDK error (its retry-count header), max_retries + 1 if unknown."""
    request = getattr(getattr(error, "response", None), "request", None) or getattr(error, "request", None)
    try:
        return int(request.headers["x-stainless-retry-count"]) + 1
    except (AttributeError, KeyError, TypeError, ValueError):
        return max_retries + 1


def _piece(item) -> bytes:
    raw = getattr(item, "bytes", None)
    return bytes(raw) if raw is not None else (item.token or "").encode("utf-8")


def choice_logprobs(choice) -> TokenLogprobs | None:
    """A choice's `logprobs.content` (token, bytes, logprob, top_logprobs) as TokenLogprobs; None without."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    top = [[(_piece(t), t.logprob) for t in (c.top_logprobs or [])] for c in content]
    return TokenLogprobs([_piece(c) for c in content], [c.logprob for c in content], top)


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 6,
        reasoning: str = DEFAULT_REASONING,
        teacher_logprobs: int = 0,
    ):
        self.openai = import_openai()
        base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.client = self.openai.OpenAI(
            base_url=base_url, api_key=api_key or NO_KEY, timeout=timeout, max_retries=max_retries
        )
        self.url = base_url + "/chat/completions"
        self.model, self.reasoning = model, reasoning
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        self.concurrency, self.max_retries = max(1, concurrency), max_retries
        self.prompt_tokenizer = None  # --score-traces: the teacher's chat template, loaded when first needed
        if teacher_logprobs:  # the sampled token's log-prob and the top K alternatives
            self.sampling.update(logprobs=True, top_logprobs=teacher_logprobs)

    def score(self, pairs: list[tuple[dict, str]], top_k: int = 0) -> list[TokenLogprobs | None]:
        """Teacher-forced TokenLogprobs of each (problem, trace text): /completions with `echo` and
        `logprobs` gives the server's log-probs of prompt + trace. The prompt is the teacher's chat
        template applied here, so --teacher must also load as a tokenizer on this machine."""
        if self.prompt_tokenizer is None:
            try:
                self.prompt_tokenizer = load_tokenizer(self.model)
            except (OSError, ValueError) as e:
                raise BadInput(
                    f"scoring traces through {self.url} needs the teacher's chat template here: --teacher "
                    f"{self.model!r} must be a local folder or a cached hub id ({str(e)[:120]})"
                ) from None
        return [self.echo(teacher_prompt(self.prompt_tokenizer, p["problem"]), text, top_k) for p, text in pairs]

    def echo(self, prompt: str, text: str, top_k: int) -> TokenLogprobs | None:
        """The trace's tokens from an echoed completion of prompt + text (None: the server sent no log-probs)."""
        try:
            reply = self.client.completions.create(
                model=self.model,
                prompt=prompt + text,
                max_tokens=1,
                temperature=0.0,
                echo=True,
                logprobs=max(top_k, 1),
            )
        except self.openai.APIError as e:
            raise BackendError(f"{self.url.rsplit('/', 2)[0]}/completions (echo, logprobs): {detail(e)}") from None
        lp = getattr(reply.choices[0], "logprobs", None) if reply.choices else None
        if lp is None or not lp.tokens:
            return None
        keep = [i for i, off in enumerate(lp.text_offset) if len(prompt) <= off < len(prompt) + len(text)]
        top = [sorted((lp.top_logprobs[i] or {}).items(), key=lambda kv: -kv[1])[:top_k] for i in keep]
        return TokenLogprobs(
            [lp.tokens[i].encode("utf-8") for i in keep],
            [lp.token_logprobs[i] for i in keep],
            [[(t.encode("utf-8"), x) for t, x in row] for row in top] if top_k else None,
        )

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self.samples, p, k, seed) for p in problems]
            rows, failures = [], []
            for problem, future in zip(problems, futures):
                try:
                    rows.append(future.result())
                except ProblemError as e:
                    failures.append(f"{problem['id']}: {e}")
                    rows.append([Sample("", 0, error=str(e))] * k)
        finally:
            # On an AuthError, requests not yet started are dropped instead of sent.
            pool.shutdown(wait=True, cancel_futures=True)
        if problems and len(failures) == len(problems):
            raise BackendError(f"{self.url}: every request of the batch failed, e.g. {failures[0]}")
        return rows

    def samples(self, problem: dict, k: int, seed: int) -> list[Sample]:
        out: list[Sample] = []
        while len(out) < k:
            reply = self.create(
                teacher_messages(problem["problem"]), k - len(out), stable_seed(seed, problem["id"], len(out))
            )
            if not getattr(reply, "choices", None):
                raise ProblemError(f"{self.url} answered without choices: {str(reply)[:300]}")
            out += self.parse(reply)
        return out[:k]

    def parse(self, reply) -> list[Sample]:
        messages = [c.message for c in reply.choices]
        texts = [getattr(m, "content", None) or "" for m in messages]
        reasoning = [getattr(m, "reasoning_content", None) or getattr(m, "reasoning", None) for m in messages]
        tokens = split_tokens(
            getattr(reply.usage, "completion_tokens", None), [(r or "") + t for r, t in zip(reasoning, texts)]
        )
        return [
            replace(
                thinking_sample(t, n, c.finish_reason == "length", reasoning=r, mode=self.reasoning),
                logprobs=choice_logprobs(c),
            )
            for t, r, n, c in zip(texts, reasoning, tokens, reply.choices)
        ]

    def create(self, messages: list[dict], n: int, seed: int):
        """One chat completion (the SDK retries); errors turned into AuthError / BackendError / ProblemError."""
        openai = self.openai
        try:
            return self.client.chat.completions.create(
                model=self.model, messages=messages, n=n, seed=seed, **self.sampling
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise AuthError(
                f"{self.url} refused the request (HTTP {e.status_code}: {detail(e)}). "
                "Check --api-key, $OPENAI_API_KEY or $Q2G_API_KEY."
            ) from None
        except openai.NotFoundError as e:
            raise BackendError(
                f"{self.url} answered HTTP 404 ({detail(e)}): check --base-url, and that "
                f"--teacher {self.model!r} is the model's name on that server"
            ) from None
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            # APITimeoutError is an APIConnectionError; 408/409 arrive as APIStatusError below.
            what = f"HTTP {e.status_code} {detail(e)}" if hasattr(e, "status_code") else f"{type(e).__name__}: {e}"
            n = tries(e, self.max_retries)
            raise ProblemError(f"gave up after {n} {'try' if n == 1 else 'tries'}: {what}") from None
        except openai.APIStatusError as e:  # 400 (e.g. prompt + max_tokens over the context) and other 4xx
            raise ProblemError(f"HTTP {e.status_code}: {detail(e)}") from None
        except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: json.JSONDecodeError
            raise ProblemError(f"{self.url} answered something that is not a chat completion: {e}") from None
