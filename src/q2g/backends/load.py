"""Build the teacher backend a `q2g generate` run chose. Apart from the package (`q2g.backends`,
whose shared types each backend imports), so that the package never imports its backends: the
chosen one is imported here, when chosen (vLLM, torch and the OpenAI SDK stay unloaded otherwise).
"""

from __future__ import annotations

from pathlib import Path

from q2g.backends import BACKENDS, DEFAULT_REASONING, api_key


def load_backend(name: str, args):
    """The backend `name`, built from the parsed `q2g generate` options (only the chosen backend's
    module, and so its heavy package, is imported)."""
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    reasoning = getattr(args, "reasoning", None) or DEFAULT_REASONING
    if name == "reference":
        from q2g.backends.reference import ReferenceBackend

        # Token counts come from the teacher's tokenizer when --teacher is a local folder (else words);
        # a reference over --max-new-tokens is rejected as truncated.
        tokenizer = args.teacher if Path(args.teacher).is_dir() else None
        return ReferenceBackend(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens)
    if name == "hf":
        from q2g.backends.hf import HFBackend

        return HFBackend(
            args.teacher,
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            reasoning=reasoning,
            **sampling,
        )
    if name == "vllm":
        from q2g.backends.vllm import VLLMBackend

        return VLLMBackend(
            args.teacher,
            tensor_parallel_size=args.tensor_parallel_size,
            precision=args.precision,
            seed=args.seed,
            reasoning=reasoning,
            teacher_logprobs=getattr(args, "teacher_logprobs", 0),
            **sampling,
        )
    if name == "openai":
        from q2g.backends.openai import OpenAIBackend

        return OpenAIBackend(
            args.teacher,
            base_url=args.base_url,
            api_key=api_key(args),
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            reasoning=reasoning,
            teacher_logprobs=getattr(args, "teacher_logprobs", 0),
            **sampling,
        )
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
