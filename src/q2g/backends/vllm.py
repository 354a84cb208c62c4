"""The `vllm` backend: vLLM's offline engine, for fast generation on one or more GPUs.

    pip install 'q2g[vllm]'
    q2g generate --backend vllm --teacher Qwen/Qwen2.5-7B-Instruct --tensor-parallel-size 1

vLLM is imported only here, when this backend is chosen. Prompts are the teacher's chat template
(prompts.teacher_prompt on vLLM's own tokenizer), passed as token ids with the same BOS rule as
the hf backend so no second BOS is added. Each problem is one request with
`SamplingParams(n=k, ..., seed=...)`, its seed derived from the run seed and the problem id, so a
problem's samples do not depend on which other problems share its batch.
`n_tokens` is the length of each completion's token ids; `truncated` is finish_reason == 'length'.
Inline `<think>...</think>` of a thinking teacher is kept or dropped per --reasoning (backends).
"""

from __future__ import annotations

from q2g.backends import DEFAULT_REASONING, Sample, stable_seed, thinking_sample
from q2g.models import PRECISIONS, resolve_model_path, resolve_precision, vllm_dtype
from q2g.optional import install_hint
from q2g.prompts import teacher_prompt_ids


def import_vllm(needed_by: str = "the vllm backend"):
    """The vllm module; without it an ImportError that gives the pip command. The one place q2g
    imports vLLM (generation's --backend vllm and evaluation's --eval-backend vllm both call it)."""
    try:
        import vllm
    except ImportError:
        raise ImportError(f"{needed_by} needs vLLM: {install_hint('vllm')}") from None
    return vllm


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        teacher: str,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        tensor_parallel_size: int = 1,
        precision: str = "auto",
        seed: int = 0,
        reasoning: str = DEFAULT_REASONING,
    ):
        vllm = import_vllm()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=resolve_model_path(teacher),
            tensor_parallel_size=tensor_parallel_size,
            dtype=vllm_dtype(resolve_precision(precision, "cuda")),  # the teacher runs on the GPU
            seed=seed,
            trust_remote_code=False,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        self.reasoning = reasoning

    def prompt(self, problem: str) -> dict:
        return {"prompt_token_ids": teacher_prompt_ids(self.tokenizer, problem)}

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        # Greedy decoding gives k identical samples; ask for one (older vLLM refuses n > 1 there).
        n = 1 if self.sampling["temperature"] == 0 else k
        params = [self.vllm.SamplingParams(n=n, seed=stable_seed(seed, p["id"]), **self.sampling) for p in problems]
        outputs = self.llm.generate([self.prompt(p["problem"]) for p in problems], params, use_tqdm=False)
        result = []
        for out in outputs:
            samples = [
                thinking_sample(c.text, len(c.token_ids), c.finish_reason == "length", mode=self.reasoning)
                for c in out.outputs
            ]
            result.append((samples * k)[:k] if n == 1 else samples)
        return result
