"""Forward-only NLL without the [batch, seq, vocab] logits, for held-out loss and perplexity.

    total, count = aligned_nll(model, input_ids, attention_mask, targets)  # under torch.inference_mode()

`model(...).logits` projects every position through the LM head and the callers then upcast it to
fp32: for Gemma 3 270M (262k vocabulary, 640 hidden) the head is ~63% of a token's forward FLOPs,
and 8 rows x 300 positions of fp32 logits are 2.5 GB written and read back. Here the decoder
returns hidden states, only the positions that predict a target go through the head, a
`chunk` of them at a time (at most one [chunk, vocab] fp32 block alive), and the sum stays on the
device until the end (one host sync per call). The held-out loss skips the prompt's positions this
way; perplexity needs every scored position, so there it saves the logits' memory traffic only.

Same numbers as the logits path up to float rounding (tests/test_forward_nll.py): the head and the
final-logit transform (softcap, scale) are the model's own, taken as loss.py takes them.
"""

from __future__ import annotations

IGNORE_INDEX = -100
CHUNK = 256  # positions per head projection: a [256, 262144] fp32 block is 268 MB


def shift_labels(labels):
    """Causal-LM labels [B, T] (labels[t] is the token at t) -> targets aligned with the logits:
    targets[t] = labels[t + 1], the last position predicts nothing (-100)."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def hidden_nll(head, hidden, targets, softcap: float | None = None, scale: float = 1.0, chunk: int = CHUNK):
    """Summed NLL (a 0-dim fp32 tensor) of `targets` [N] under `head(hidden)` [N, H] -> [N, V],
    projected `chunk` rows at a time."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for a in range(0, len(targets), chunk):
        z = head(hidden[a : a + chunk]).float()
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        total += F.cross_entropy(z, targets[a : a + chunk], reduction="sum")
    return total


def aligned_nll(model, input_ids, attention_mask, targets, chunk: int = CHUNK) -> tuple[float, int]:
    """(summed NLL, count) of `targets` [B, T]: targets[b, t] is the token that position t of row b
    predicts (-100: not scored). Call it under `torch.inference_mode()` (and the eval's autocast)."""
    # q2g.finetune.loss imports transformers at its top: kept lazy so importing evaluation stays light.
    from q2g.finetune.loss import logit_transform, split_causal_lm

    decoder, head, config = split_causal_lm(model)
    softcap, scale = logit_transform(config.get_text_config())
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = targets != IGNORE_INDEX
    total = hidden_nll(head, hidden[keep], targets[keep], softcap, scale, chunk)
    return float(total), int(keep.sum())


def labels_nll(model, input_ids, attention_mask, labels, chunk: int = CHUNK) -> tuple[float, int]:
    """`aligned_nll` for causal-LM `labels` (sft_data.Collator's: -100 on prompt and padding)."""
    return aligned_nll(model, input_ids, attention_mask, shift_labels(labels), chunk)


def windows_targets(batch, width: int, device):
    """Targets [B, width] of perplexity windows (input ids, target ids, tail): the len(targets)
    positions that end `tail` positions before the input's end predict the targets."""
    import torch

    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (_, target, tail) in enumerate(batch):
        end = width - tail
        targets[row, end - len(target) : end] = torch.tensor(target, dtype=torch.long)
    return targets.to(device)


def windows_nll(model, batch, chunk: int = CHUNK) -> float:
    """Summed NLL of a batch of equal-length perplexity windows (as evaluate's `_batch_nll`)."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([inp for inp, _, _ in batch], device=device)
    targets = windows_targets(batch, inputs.shape[1], device)
    return aligned_nll(model, inputs, None, targets, chunk)[0]
