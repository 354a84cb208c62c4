"""The `hf` backend: the teacher run with transformers on this machine.

    q2g generate --backend hf --teacher Qwen/Qwen2.5-7B-Instruct --batch-size 32

Prompts come from prompts.teacher_prompt (the chat template of an instruct teacher, the plain
format for a base model). Generation is q2g.decoding.generate: length-grouped batches, left
padding, KV cache, stop at end-of-turn / EOS; bf16 on a GPU (models.resolve_precision). k samples of a
problem are k copies of its prompt. `n_tokens` counts generated tokens including the stop token.
Inline `<think>...</think>` of a thinking teacher is kept or dropped per --reasoning (backends).
"""

from __future__ import annotations

from q2g.backends import DEFAULT_REASONING, Sample, stable_seed, thinking_sample
from q2g.decoding import generate
from q2g.models import load_model, load_tokenizer, pick_device, resolve_precision
from q2g.prompts import end_token_ids, teacher_prompt_ids


def teacher_end_ids(tokenizer, model) -> list[int]:
    """Ids that end a teacher answer: end-of-turn / EOS of the tokenizer and of the model's
    generation config (Qwen instruct lists both <|im_end|> and <|endoftext|> there)."""
    ids = list(end_token_ids(tokenizer))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


class HFBackend:
    name = "hf"

    def __init__(
        self,
        teacher: str,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
        reasoning: str = DEFAULT_REASONING,
    ):
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(teacher, padding_side="left")
        self.model = load_model(teacher, resolve_precision(precision, self.device).dtype, self.device).eval()
        self.end_ids = teacher_end_ids(self.tokenizer, self.model)
        self.sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.batch_size = batch_size or 32  # sequences per forward pass
        self.reasoning = reasoning

    def prompt_ids(self, problem: str) -> list[int]:
        return teacher_prompt_ids(self.tokenizer, problem)

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        prompts = [self.prompt_ids(p["problem"]) for p in problems for _ in range(k)]
        # The torch seed of a batch depends only on the run seed and the batch's problems.
        outs = generate(
            self.model,
            self.tokenizer,
            prompts,
            end_ids=self.end_ids,
            batch_size=self.batch_size,
            seed=stable_seed(seed, *(p["id"] for p in problems)),
            **self.sampling,
        )
        samples = [thinking_sample(o.text, o.n_tokens, not o.stopped, mode=self.reasoning) for o in outs]
        return [samples[i * k : (i + 1) * k] for i in range(len(problems))]
