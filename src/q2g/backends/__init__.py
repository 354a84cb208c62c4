"""Teacher backends: where the traces of `q2g generate` come from.

Every backend is a small class with one method (a narrow interface, as in lm-eval):

    generate(problems: list[dict], k: int, seed: int) -> list[list[Sample]]

It returns exactly k samples per problem, in the order of `problems`. `seed` is the run's seed;
a backend derives the seed of a request from it and the problem ids (`stable_seed`), never from a
counter, so a batch regenerated after a crash gives the same samples as the first time.

| name      | what                                              | needs                          |
| --------- | ------------------------------------------------- | ------------------------------ |
| hf        | transformers on this machine (q2g.generation)     | torch (a GPU for a 7B teacher) |
| vllm      | vLLM's offline engine                             | pip install 'q2g[vllm]', a GPU |
| openai    | any OpenAI-compatible /chat/completions server    | nothing (standard library)     |
| reference | the datasets' own worked solutions, no model      | nothing                        |

Heavy imports happen inside the chosen backend's module only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from q2g.errors import RunFailed

BACKENDS = ("hf", "vllm", "openai", "reference")
# Problems per batch (the unit of one write and of resume) when --batch-size is not given.
DEFAULT_BATCH_SIZE = {"hf": 32, "vllm": 512, "openai": 64, "reference": 64}
API_KEY_ENVS = ("OPENAI_API_KEY", "Q2G_API_KEY")


@dataclass(frozen=True)
class Sample:
    text: str
    n_tokens: int  # tokens the teacher generated for it (see each backend for how counted)
    truncated: bool = False  # stopped by the token limit, not by the model


class BackendError(RunFailed):
    """The backend failed in a way a retry will not fix; the message says what to do."""


def stable_int(*parts) -> int:
    """A hash of `parts` that is the same in every process (Python's hash() of str is not)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def stable_seed(*parts) -> int:
    return stable_int(*parts) % 2**31


def api_key(args) -> str | None:
    """--api-key, else $OPENAI_API_KEY, else $Q2G_API_KEY (a local server needs none)."""
    if getattr(args, "api_key", None):
        return args.api_key
    return next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)


def load_backend(name: str, args):
    """The backend `name`, built from the parsed `q2g generate` options."""
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    if name == "reference":
        from q2g.backends.reference import ReferenceBackend

        # Token counts come from the teacher's tokenizer when --teacher is a local folder.
        tokenizer = args.teacher if Path(args.teacher).is_dir() else None
        return ReferenceBackend(tokenizer=tokenizer)
    if name == "hf":
        from q2g.backends.hf import HFBackend

        return HFBackend(args.teacher, batch_size=args.batch_size, precision=args.precision,
                         device=args.device, **sampling)
    if name == "vllm":
        from q2g.backends.vllm import VLLMBackend

        return VLLMBackend(args.teacher, tensor_parallel_size=args.tensor_parallel_size,
                           precision=args.precision, seed=args.seed, **sampling)
    if name == "openai":
        from q2g.backends.openai import OpenAIBackend

        return OpenAIBackend(args.teacher, base_url=args.base_url, api_key=api_key(args),
                             concurrency=args.concurrency, timeout=args.timeout,
                             max_retries=args.max_retries, **sampling)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
