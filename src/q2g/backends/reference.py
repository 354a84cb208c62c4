"""The `reference` backend: the datasets' own worked solutions used as traces.

No model is needed, so it is the offline default of `q2g demo` and a baseline against which a
teacher's traces can be compared:

    q2g generate --backend reference --data-dir packaged --out dataset/

- GSM8K: the calculator annotations `<<48/2=24>>` are removed and the final `#### N` line is
  rewritten to the sentence every trace ends with (prompts.FINAL_ANSWER_LINE).
- MATH: the solution is kept as it is (its answer is already in `\\boxed{}`).

There is one reference per problem, so k > 1 gives k identical samples; the generate stage keeps
the first and rejects the others as duplicates. `n_tokens` is the number of whitespace-separated
words, or the number of tokens of `tokenizer` (a model folder or id) when one is given. A reference
longer than `max_new_tokens` (in that unit) is marked truncated, so it is rejected as a teacher's
capped sample would be: the demo trains on the shorter GSM8K solutions this way.
"""

from __future__ import annotations

import re

from q2g.backends import Sample
from q2g.models import load_tokenizer
from q2g.prompts import FINAL_ANSWER_LINE

CALCULATOR = re.compile(r"<<.*?>>")


def reference_trace(problem: dict) -> str:
    """The problem's reference solution in the format of a teacher trace."""
    solution = problem["reference_solution"]
    if problem["source"] != "gsm8k":
        return solution.strip()
    body = solution.rsplit("####", 1)[0]
    lines = [CALCULATOR.sub("", line).rstrip() for line in body.strip().splitlines()]
    # The gold answer is the '#### N' number with commas removed (data.gsm8k_gold).
    return "\n".join(lines + [FINAL_ANSWER_LINE.format(answer=problem["answer"])])


class ReferenceBackend:
    name = "reference"

    def __init__(self, tokenizer=None, max_new_tokens: int | None = None):
        self.tokenizer, self.max_new_tokens = None, max_new_tokens
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, problems: list[dict], k: int, seed: int) -> list[list[Sample]]:
        out = []
        for problem in problems:
            text = reference_trace(problem)
            n = self.count_tokens(text)
            over = self.max_new_tokens is not None and n > self.max_new_tokens
            out.append([Sample(text, n, truncated=over)] * k)
        return out
