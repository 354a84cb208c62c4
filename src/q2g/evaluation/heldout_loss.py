"""Held-out loss: mean NLL per target token of the holdout problems' reference solutions, built
by `examples.build_example` (the training format and masking), teacher-forced: the training loss
on problems the model never trains on. It moves with every update, where pass@1 on a few dozen
problems moves in steps of 1/n.
"""

from __future__ import annotations

from q2g.evaluation.config import EvalConfig
from q2g.examples import Collator, build_example
from q2g.scoring import (
    LOGITS_BUDGET_BYTES,
    autocast,
    bytes_per_position,
    device_of,
    eval_mode,
    guarded_attention,
    labels_nll,
    progress_bar,
)


def heldout_examples(tokenizer, records: list[dict], max_seq_len: int) -> tuple[list[dict], int]:
    """(training-format examples of the records' reference solutions, records skipped: no
    solution, or a prompt that leaves no room for one)."""
    examples = []
    for r in records:
        solution = r.get("reference_solution")
        ex = build_example(tokenizer, r["problem"], solution, max_seq_len) if solution and solution.strip() else None
        if ex is not None:
            examples.append(ex)
    return examples, len(records) - len(examples)


def _example_batches(examples: list[dict], max_rows: int, per_position: int):
    """Examples longest first, in batches whose logits fit the budget (one always goes)."""
    batch: list = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        width = len(batch[0]["input_ids"]) if batch else len(ex["input_ids"])
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * width * per_position > LOGITS_BUDGET_BYTES):
            yield batch
            batch = []
        batch.append(ex)
    if batch:
        yield batch


def _examples_nll(model, batch, pad_id) -> tuple[float, int]:
    """Summed NLL and count of the labelled tokens of a batch (teacher-forced, shifted by one);
    only the labelled positions go through the LM head (q2g.scoring: no [B, T, V] logits)."""
    cols = {k: v.to(device_of(model)) for k, v in Collator(pad_id)(batch).items()}
    return labels_nll(model, cols["input_ids"], cols["attention_mask"], cols["labels"])


def heldout_loss(model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True, precision=None) -> dict | None:
    """Mean NLL per target token of the records' reference solutions in the training format
    (None: no record has a solution that fits)."""
    import torch

    examples, skipped = heldout_examples(tokenizer, records, cfg.heldout_max_seq_len)
    if not examples:
        return None
    per_position = bytes_per_position(model, precision)
    nll, n = 0.0, 0
    with (
        eval_mode(model),
        guarded_attention(model),
        autocast(model, precision),
        torch.inference_mode(),
        progress_bar(progress, total=len(examples), desc="heldout loss", unit="solution") as bar,
    ):
        for batch in _example_batches(examples, cfg.eval_batch_size, per_position):
            total, count = _examples_nll(model, batch, tokenizer.pad_token_id)
            nll, n = nll + total, n + count
            bar.update(len(batch))
    return {
        "heldout_loss": nll / n,
        "heldout_tokens": n,
        "heldout_n": len(examples),
        "heldout_skipped": skipped,
        "nll_sum": nll,
        "max_seq_len": cfg.heldout_max_seq_len,
    }
