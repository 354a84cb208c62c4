"""--distill on-policy, the data of a step: the problems, the student's samples, their chunks.

    examples = tag_problems(tokenizer, rows, examples, max_seq_len)   # each trace example knows its problem
    samples = draw(model, tokenizer, prompts, n, temperature, max_tokens, seed)
    sample = align(student_tokenizer, prompt_ids, ids, end_ids, teacher_spans, teacher_logprobs)
    save_step(folder, step, micro, record) / load_step(folder, step, micro, problem_ids)
    adv, ratio = chunk_advantages(student_lp, chunk, teacher_chunk_lp)

A sample's text is the bytes of its sampled tokens up to its end token (which is no part of the
text), less any token whose bytes cannot be valid UTF-8 where they stand. Its chunks close where a
student token and a teacher token end on the same byte (q2g.finetune.distill.data.aligned_chunks);
a token in no chunk (the end token, a cut tail) has advantage 0. The advantage of every student
token of chunk c is -(log p_student(c) - log p_teacher(c)): minus the chunk's reverse-KL estimate.

Each step's samples (and the teacher's scores of them) are written to
<run>/onpolicy/step-<S>.mb<j>.json before the update; a resumed run reads them back instead of
sampling again, so no step is sampled twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from q2g.alignment import token_bytes
from q2g.errors import DataError
from q2g.examples import IGNORE_INDEX
from q2g.finetune.distill.chunk_kl import NO_CHUNK
from q2g.finetune.distill.data import aligned_chunks
from q2g.io import atomic_write_json

SAMPLES_DIR = "onpolicy"


def tag_problems(tokenizer, rows: list[dict], examples: list[dict], max_seq_len: int) -> list[dict]:
    """The examples (built by examples.build_dataset from `rows`, in order) with their problem text and id."""
    from q2g.prompts import student_prompt_ids

    kept = [r for r in rows if len(student_prompt_ids(tokenizer, r["problem"])) < max_seq_len]
    if len(kept) != len(examples):
        raise RuntimeError(f"tag_problems: {len(kept)} traces fit but {len(examples)} examples were built")
    return [
        {**ex, "problem": r["problem"], "problem_id": str(r.get("id", i))}
        for i, (r, ex) in enumerate(zip(kept, examples))
    ]


@dataclass
class OnPolicyCollator:
    """The SFT batch of `base` plus the problems (None for a rehearsal example) and their ids."""

    base: object

    def __call__(self, batch: list[dict]) -> dict:
        out = self.base([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        out["onpolicy_problem"] = [b.get("problem") for b in batch]
        out["onpolicy_id"] = [b.get("problem_id") for b in batch]
        return out


def draw(model, tokenizer, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int, end_ids):
    """n sampled continuations (token ids, up to and with the first end token) of each prompt, in
    order; the global RNG is left as it was (a resumed run that skips sampling trains the same).
    One batched `generate` for all prompts (left-padded, n rows each): plain sampling from the
    student's own distribution (top_k 0, top_p 1, whatever its generation_config says), with the
    CPU linear layers through oneDNN where that is faster (q2g.cpu_linears)."""
    import torch

    from q2g.cpu_linears import onednn_linears
    from q2g.decoding.rows import left_pad

    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids))
    ids, mask = left_pad(prompts, pad)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), onednn_linears(model, len(prompts) * n):
            torch.manual_seed(seed)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                eos_token_id=list(end_ids),
                pad_token_id=pad,
            )
    finally:
        model.train(was_training)
    return [until_end(row[ids.shape[1] :].tolist(), end_ids) for row in gen]


def until_end(ids: list[int], end_ids) -> list[int]:
    """ids up to and with the first end token (generate pads a finished row after it)."""
    for i, t in enumerate(ids):
        if t in end_ids:
            return ids[: i + 1]
    return ids


def sample_text(tokenizer, ids: list[int], end_ids) -> tuple[str, list]:
    """(the text of the sampled tokens before the end token, each token's byte span in it or None).

    A token whose bytes cannot be part of valid UTF-8 where they stand (a stray byte-fallback
    token, a character left unfinished) is left out of the text: span None, so no chunk."""
    data, spans, pending = b"", [None] * len(ids), []
    for i, t in enumerate(ids):
        if t in end_ids:
            break
        for candidate in ([*pending, i], [i]):
            trial = b"".join(token_bytes(tokenizer, ids[k]) for k in candidate)
            state = utf8_state(trial)
            if state == "ok":
                for k in candidate:
                    n = len(token_bytes(tokenizer, ids[k]))
                    spans[k] = (len(data), len(data) + n)
                    data += token_bytes(tokenizer, ids[k])
                pending = []
                break
            if state == "open":
                pending = candidate
                break
        else:
            pending = []
    return data.decode("utf-8"), spans


def utf8_state(data: bytes) -> str:
    """ "ok" (valid UTF-8), "open" (valid but a character left unfinished at the end), or "bad"."""
    try:
        data.decode("utf-8")
        return "ok"
    except UnicodeDecodeError as e:
        return "open" if e.reason == "unexpected end of data" and len(data) - e.start < 4 else "bad"


def align(student_spans: list, teacher_spans, teacher_logprobs) -> dict:
    """The chunk of each sampled token (NO_CHUNK: none; student_spans[i] None: in no chunk) and the
    teacher's log-prob of each chunk."""
    if len(teacher_spans) != len(teacher_logprobs):
        raise ValueError(f"{len(teacher_spans)} teacher spans for {len(teacher_logprobs)} log-probs")
    in_text = [i for i, sp in enumerate(student_spans) if sp is not None]
    spans_s = [tuple(student_spans[i]) for i in in_text]
    ids_t, ids_s, n = aligned_chunks([tuple(sp) for sp in teacher_spans], spans_s)
    teacher = [0.0] * n
    for c, lp in zip(ids_t, teacher_logprobs):
        if c != NO_CHUNK:
            teacher[c] += float(lp)
    chunk = [NO_CHUNK] * len(student_spans)
    for i, c in zip(in_text, ids_s):
        chunk[i] = c
    return {"chunk": chunk, "teacher_chunk_logprobs": teacher}


def same_vocab_chunks(teacher_logprobs) -> dict:
    """Teacher and student share the tokens: one chunk per sampled token, the end token included."""
    return {
        "chunk": list(range(len(teacher_logprobs))),
        "teacher_chunk_logprobs": [float(x) for x in teacher_logprobs],
    }


def chunk_advantages(student_lp, chunk, teacher_chunk_lp):
    """(advantage of each token [N], the reverse-KL estimate log p_s(c) - log p_t(c) of each chunk [C]).

    student_lp [N]: the student's log-prob of each sampled token; chunk [N]: its chunk (NO_CHUNK: none);
    teacher_chunk_lp [C]. Tokens of chunk c get -ratio[c]; tokens in no chunk get 0. No gradient flows.
    """
    import torch

    student_lp = student_lp.detach().double()
    keep = chunk != NO_CHUNK
    ratio = torch.zeros(teacher_chunk_lp.shape[0], dtype=torch.float64, device=student_lp.device)
    ratio = ratio.index_add(0, chunk[keep], student_lp[keep]) - teacher_chunk_lp.double()
    adv = torch.zeros_like(student_lp)
    adv[keep] = -ratio[chunk[keep]]
    return adv, ratio


def step_file(folder: Path, step: int, micro: int) -> Path:
    return folder / SAMPLES_DIR / f"step-{step:06d}.mb{micro}.json"


def save_step(folder: Path, step: int, micro: int, record: dict) -> Path:
    """Write one micro-batch's samples and scores (atomically) before its update."""
    path = step_file(folder, step, micro)
    atomic_write_json(path, {"step": step, "micro": micro, **record})
    return path


def load_step(folder: Path, step: int, micro: int, problem_ids: list) -> dict | None:
    """The stored samples of (step, micro), or None; stored for other problems: a DataError."""
    path = step_file(folder, step, micro)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable stored samples ({type(e).__name__}: {e}); delete it to sample again"
        ) from None
    if record.get("problem_ids") != list(problem_ids):
        raise DataError(
            f"{path}: stored for problems {record.get('problem_ids')}, but this step trains on {list(problem_ids)} "
            "(the data order changed since): use another --out"
        )
    return record


def memory_shape(cfg, examples: list[dict]) -> tuple[int, int, int]:
    """What an on-policy step holds at its peak, for q2g.memory's plan: (rows, tokens per row,
    teacher parameters). The policy-gradient forward runs on batch_size x distill_samples sampled
    rows, each at most its prompt plus distill_max_tokens (not the traces' max_seq_len), and an HF
    teacher's weights stay in memory beside the student's (a --distill-base-url server's do not)."""
    from transformers import AutoConfig

    from q2g import memory, models

    prompts = [
        next((i for i, x in enumerate(e["labels"]) if x != IGNORE_INDEX), 0) for e in examples if e.get("problem")
    ]
    teacher = 0
    if not cfg.distill_base_url:
        teacher = memory.count_params(AutoConfig.from_pretrained(models.resolve_model_path(cfg.distill_teacher)))
    return cfg.batch_size * cfg.distill_samples, max(prompts, default=0) + cfg.distill_max_tokens, teacher
