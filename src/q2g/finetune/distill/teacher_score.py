"""--distill on-policy, the teacher's side: log-probs of the student's sampled text under the teacher.

    teacher = load_teacher(cfg, device, dtype)            # HFTeacher or OpenAITeacher
    ctx = teacher.context(problem, "teacher")              # the teacher's own prompt for the problem
    spans, logprobs = teacher.score([ctx], [text])[0]      # byte spans in text.encode() + token log-probs

The teacher never sees the student's tokens: it gets the problem (its own prompt format, or the
student's format rendered with the teacher's tokenizer: --distill-teacher-prompt) and the sampled
text, tokenizes both itself and returns its token log-probs over the text with each token's byte
span in `text.encode("utf-8")`. q2g.finetune.distill.onpolicy_data aligns those spans with the student's
tokens (byte-aligned chunks).

- hf: a hub id or folder, loaded in this process with its own tokenizer; one batched forward,
  log-probs through the label-only chunked projection (no [batch, seq, vocab] tensor, as for the
  student). Where the teacher's vocabulary is the student's (`same_vocab`), `score_ids` scores the
  student's very token ids instead of re-tokenizing its text.
- openai: an OpenAI-compatible server that returns prompt log-probs: a completion of
  prompt = context + text with echo=True, logprobs=1, max_tokens=1 (vLLM's way); each returned
  prompt token's text_offset gives its span. The context is the plain (template-free) prompt,
  since the server's chat template is not known here.
"""

from __future__ import annotations

import os

from q2g.alignment import encode_with_spans
from q2g.errors import ConfigError, RunFailed
from q2g.examples import IGNORE_INDEX
from q2g.finetune.loss import decoder_hidden, select_label_positions
from q2g.prompts import student_prompt, student_prompt_ids, teacher_prompt, teacher_prompt_ids
from q2g.scoring import logit_transform, split_causal_lm

Span = tuple[int, int]


def label_token_logprobs(model, unwrapped, inputs: dict, chunk_size: int, drop_mask: bool = True):
    """(log-probs [N] of every label (label != -100, shifted), hidden, batch) through the label-only
    chunked projection; the one function that scores both the student (with grad) and an HF teacher."""
    from q2g.finetune.distill.chunk_kl import label_logprobs

    _, head, config = split_causal_lm(unwrapped)
    hidden, batch = decoder_hidden(model, unwrapped, inputs, drop_mask)
    h, targets = select_label_positions(hidden, inputs["labels"])
    return label_logprobs(h, head.weight, targets, head.bias, chunk_size, *logit_transform(config)), hidden, batch


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask / labels of (context ids, scored ids) rows."""
    import torch

    width = max(len(c) + len(t) for c, t in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (ctx, ids) in enumerate(rows):
        n = len(ctx) + len(ids)
        out["input_ids"][i, :n] = torch.tensor(ctx + ids, dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        out["labels"][i, len(ctx) : n] = torch.tensor(ids, dtype=torch.long)
    return out


def same_vocab(tok_a, tok_b) -> bool:
    """Whether two tokenizers map every token string to the same id (then token ids can be shared)."""
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


class HFTeacher:
    """A causal LM in this process, with its own tokenizer (frozen, eval mode)."""

    kind = "hf"

    def __init__(self, name: str, device: str, dtype, chunk_size: int = 256, student_tokenizer=None):
        from q2g import models

        self.name, self.chunk_size = name, chunk_size
        self.tokenizer = models.load_tokenizer(name, padding_side="right")
        self.model = models.load_model(name, dtype, device).eval()
        self.model.requires_grad_(False)
        self.same_vocab = student_tokenizer is not None and same_vocab(self.tokenizer, student_tokenizer)

    def context(self, problem: str, prompt: str) -> list[int]:
        """The teacher's prompt ids for `problem` (prompt: "teacher" or "student" format)."""
        build = teacher_prompt_ids if prompt == "teacher" else student_prompt_ids
        return build(self.tokenizer, problem)

    def logprobs(self, inputs: dict) -> list[list[float]]:
        """Per row, the log-probs of its labels (no grad), from a right-padded batch."""
        import torch

        with torch.no_grad():
            lp, _, _ = label_token_logprobs(self.model, self.model, inputs, self.chunk_size)
        counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        return [part.tolist() for part in torch.split(lp.float().cpu(), counts)]

    def score(self, contexts: list[list[int]], texts: list[str]) -> list[tuple[list[Span], list[float]]]:
        """(byte spans over each text, the teacher's log-prob of each of its tokens there)."""
        encoded = encode_with_spans(self.tokenizer, texts)
        rows = [(ctx, ids) for ctx, (ids, _) in zip(contexts, encoded)]
        device = self.model.device
        batch = {k: v.to(device) for k, v in pad_rows(rows, self.tokenizer.pad_token_id).items()}
        lps = self.logprobs(batch)
        return [(list(spans), lp) for (_, spans), lp in zip(encoded, lps)]


def prompt_logprob_spans(offsets, logprobs, context: str, text: str) -> tuple[list[Span], list[float]]:
    """The tokens of `text` in an echoed completion of context + text: (byte spans in text, log-probs).

    offsets: each token's character offset into context + text (a generated token past the end is
    dropped); a token that straddles the context/text border keeps its real span (it starts before
    0, so no chunk takes it); a token of zero width (part of a character) gives its log-prob to the next.
    """
    full = context + text
    at = [0]
    for ch in full:
        at.append(at[-1] + len(ch.encode("utf-8")))
    total, base = at[-1], at[len(context)]
    starts = [at[min(int(o), len(full))] for o in offsets]
    n = sum(1 for s in starts if s < total)
    spans, lps, carry = [], [], 0.0
    for i in range(n):
        end = starts[i + 1] if i + 1 < n else total
        if end <= base:
            continue
        lp = logprobs[i]
        if lp is None:
            raise RunFailed("the teacher server gave no log-prob for a token of the scored text")
        if end == starts[i]:
            carry += float(lp)
            continue
        spans.append((starts[i] - base, end - base))
        lps.append(float(lp) + carry)
        carry = 0.0
    return spans, lps


class OpenAITeacher:
    """A model on an OpenAI-compatible server that returns prompt log-probs (e.g. vLLM)."""

    kind = "openai"
    same_vocab = False
    tokenizer = None

    def __init__(self, name: str, base_url: str, api_key: str | None = None):
        from q2g.backends.openai import import_openai

        self.openai = import_openai()
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("Q2G_API_KEY") or "none"
        self.name, self.url = name, base_url
        self.client = self.openai.OpenAI(base_url=base_url, api_key=key, max_retries=3, timeout=600)

    def context(self, problem: str, prompt: str) -> str:
        """The plain (template-free) prompt text: the server's chat template is not known here."""
        return teacher_prompt(None, problem) if prompt == "teacher" else student_prompt(None, problem)

    def score(self, contexts: list[str], texts: list[str]) -> list[tuple[list[Span], list[float]]]:
        return [self.score_one(c, t) for c, t in zip(contexts, texts)]

    def score_one(self, context: str, text: str) -> tuple[list[Span], list[float]]:
        if not text:
            return [], []
        try:
            reply = self.client.completions.create(
                model=self.name, prompt=context + text, echo=True, logprobs=1, max_tokens=1, temperature=0.0
            )
        except self.openai.NotFoundError as e:
            raise ConfigError(
                f"--distill-base-url {self.url}: HTTP 404 ({e.message}); is --distill-teacher {self.name!r} "
                "the model's name on that server?"
            ) from None
        except self.openai.APIError as e:
            raise RunFailed(f"--distill-base-url {self.url}: the teacher could not score a sample: {e}") from None
        lp = reply.choices[0].logprobs if reply.choices else None
        if lp is None or not lp.text_offset or lp.token_logprobs is None:
            raise RunFailed(
                f"--distill-base-url {self.url}: the server returned no prompt log-probs (completions with "
                "echo=True and logprobs=1 must return them, as vLLM does)"
            )
        return prompt_logprob_spans(lp.text_offset, lp.token_logprobs, context, text)


def load_teacher(cfg, device: str, dtype, student_tokenizer=None):
    """The --distill-teacher of an on-policy run: a server's model or an HF model in this process."""
    if cfg.distill_base_url:
        return OpenAITeacher(cfg.distill_teacher, cfg.distill_base_url)
    return HFTeacher(cfg.distill_teacher, device, dtype, cfg.loss_chunk_size, student_tokenizer)
