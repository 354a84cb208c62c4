"""The `openai` backend: any OpenAI-compatible chat completions endpoint.

    vllm serve Qwen/Qwen2.5-7B-Instruct          # or SGLang, llama.cpp, Ollama, a hosted API
    q2g generate --backend openai --base-url http://localhost:8000/v1 --teacher Qwen/Qwen2.5-7B-Instruct

Standard library only (urllib + a thread pool), so it adds no dependency. Each problem is one
POST {base_url}/chat/completions with messages = prompts.teacher_messages(problem), temperature,
top_p, max_tokens, n=k and a seed derived from the run seed and the problem id. Servers that
ignore `n` (llama.cpp, Ollama) answer one choice; the rest is asked for in further requests.

Reliability: at most --concurrency requests in flight; 408/429/5xx and connection errors or
timeouts are retried with exponential backoff (the server's Retry-After wins when it sends one);
401/403 raise AuthError at once, other 4xx a BackendError with the server's message. A failed
request fails its whole batch, so nothing partial is written.

`n_tokens` comes from usage.completion_tokens; with several choices in one answer that total is
shared out in proportion to their text lengths (exact for k = 1). Without usage: word count.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from q2g.backends import BackendError, Sample, stable_seed
from q2g.prompts import teacher_messages

DEFAULT_BASE_URL = "http://localhost:8000/v1"  # vLLM's server; --base-url or $OPENAI_BASE_URL else


class AuthError(BackendError):
    pass


class RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def split_tokens(total: int | None, texts: list[str]) -> list[int]:
    """Share a reply's completion_tokens out over its choices, by text length."""
    if total is None:
        return [len(t.split()) for t in texts]
    weights = [max(len(t), 1) for t in texts]
    shares = [total * w // sum(weights) for w in weights]
    shares[-1] += total - sum(shares)
    return shares


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, *, temperature: float, top_p: float, max_new_tokens: int,
                 base_url: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0, max_retries: int = 6, backoff: float = 1.0):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.max_retries, self.backoff = max_retries, backoff

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self.samples, p, k, seed) for p in problems]
            return [f.result() for f in futures]
        finally:
            # On an error, requests not yet started are dropped instead of sent.
            pool.shutdown(wait=True, cancel_futures=True)

    def samples(self, problem: dict, k: int, seed: int) -> list[Sample]:
        out: list[Sample] = []
        while len(out) < k:
            body = {"model": self.model, "messages": teacher_messages(problem["problem"]),
                    "n": k - len(out), "seed": stable_seed(seed, problem["id"], len(out)), **self.sampling}
            reply = self.post(body)
            choices = reply.get("choices") or []
            if not choices:
                raise BackendError(f"{self.url} answered without choices: {json.dumps(reply)[:300]}")
            texts = [(c.get("message") or {}).get("content") or "" for c in choices]
            tokens = split_tokens((reply.get("usage") or {}).get("completion_tokens"), texts)
            out += [Sample(t, n, truncated=c.get("finish_reason") == "length")
                    for t, n, c in zip(texts, tokens, choices)]
        return out[:k]

    def post(self, body: dict) -> dict:
        """POST with retries; exponential backoff (1, 2, 4, ... s, capped at 60, with jitter)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self.post_once(body)
            except RetryableError as e:
                if attempt == self.max_retries:
                    raise BackendError(f"{self.url}: gave up after {attempt + 1} tries: {e}") from None
                delay = e.retry_after
                if delay is None:
                    delay = min(60.0, self.backoff * 2**attempt) * random.uniform(0.8, 1.2)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def post_once(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise self.http_error(e) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                http.client.HTTPException) as e:
            raise RetryableError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise BackendError(f"{self.url} answered something that is not JSON: {raw[:200]!r}") from None

    def http_error(self, e: urllib.error.HTTPError) -> Exception:
        detail = e.read()[:500].decode("utf-8", "replace").strip()
        if e.code in (401, 403):
            return AuthError(f"{self.url} refused the request (HTTP {e.code}: {detail or e.reason}). "
                             "Check --api-key, $OPENAI_API_KEY or $Q2G_API_KEY.")
        if e.code in (408, 429) or e.code >= 500:
            return RetryableError(f"HTTP {e.code} {detail[:200]}", parse_retry_after(e.headers.get("Retry-After")))
        return BackendError(f"{self.url} answered HTTP {e.code}: {detail or e.reason}")
