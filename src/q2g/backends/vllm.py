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

from dataclasses import replace

from q2g.alignment import token_bytes
from q2g.backends import DEFAULT_REASONING, Sample, stable_seed, thinking_sample
from q2g.data.teacher_logprobs import TokenLogprobs
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
        teacher_logprobs: int = 0,
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
        if teacher_logprobs:  # the sampled token's log-prob and the top K (vLLM returns them anyway)
            self.sampling["logprobs"] = teacher_logprobs

    def prompt(self, problem: str) -> dict:
        return {"prompt_token_ids": teacher_prompt_ids(self.tokenizer, problem)}

    def token_logprobs(self, completion) -> TokenLogprobs | None:
        """A completion's tokens with their log-probs (vLLM: per token {id: Logprob}, top K + the sampled one)."""
        k = self.sampling.get("logprobs")
        if not k or completion.logprobs is None:
            return None
        return self._tokens(list(completion.token_ids), completion.logprobs, k)

    def score(self, pairs: list[tuple[dict, str]], top_k: int = 0) -> list[TokenLogprobs]:
        """Teacher-forced TokenLogprobs of each (problem, trace text): vLLM's prompt log-probs of
        prompt + trace (one token generated and thrown away)."""
        prompts, traces = [], []
        for problem, text in pairs:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": self.prompt(problem["problem"])["prompt_token_ids"] + ids})
            traces.append(ids)
        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(top_k, 0))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for ids, out in zip(traces, outputs):
            rows = out.prompt_logprobs[len(out.prompt_logprobs) - len(ids) :] if ids else []
            result.append(self._tokens(ids, rows, top_k))
        return result

    def _tokens(self, ids: list[int], rows: list[dict], top_k: int) -> TokenLogprobs:
        """TokenLogprobs of `ids` from vLLM's per-position {token id: Logprob} (top K + the chosen one)."""
        top = [
            [
                (token_bytes(self.tokenizer, i), lp.logprob)
                for i, lp in sorted(row.items(), key=lambda kv: kv[1].rank)[:top_k]
            ]
            for row in rows
        ]
        chosen = [row[i].logprob for i, row in zip(ids, rows)]
        return TokenLogprobs([token_bytes(self.tokenizer, i) for i in ids], chosen, top if top_k else None)

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        # Greedy decoding gives k identical samples; ask for one (older vLLM refuses n > 1 there).
        n = 1 if self.sampling["temperature"] == 0 else k
        params = [self.vllm.SamplingParams(n=n, seed=stable_seed(seed, p["id"]), **self.sampling) for p in problems]
        outputs = self.llm.generate([self.prompt(p["problem"]) for p in problems], params, use_tqdm=False)
        result = []
        for out in outputs:
            samples = [
                replace(
                    thinking_sample(c.text, len(c.token_ids), c.finish_reason == "length", mode=self.reasoning),
                    logprobs=self.token_logprobs(c),
                )
                for c in out.outputs
            ]
            result.append((samples * k)[:k] if n == 1 else samples)
        return result
