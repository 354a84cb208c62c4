"""Teacher-forced log-probs of a trace under a local (transformers) teacher: one forward pass.

    from q2g.backends.hf_score import trace_logprobs
    tokens = trace_logprobs(model, tokenizer, prompt_ids, trace_text, top_k=5)   # TokenLogprobs

The trace is tokenized on its own (q2g.alignment.encode_with_spans, no special tokens) and
appended to the prompt ids; each trace token's log-prob is read from the logits of the position
before it (log-softmax in float32, temperature 1: the model's own distribution, not the sampling
one). The hf backend uses this for the traces it kept (its decode loop keeps no scores) and
`q2g generate --score-traces` for traces it did not write.
"""

from __future__ import annotations

from q2g.alignment import encode_with_spans, token_bytes
from q2g.data.teacher_logprobs import TokenLogprobs


def trace_logprobs(model, tokenizer, prompt_ids: list[int], text: str, top_k: int = 0) -> TokenLogprobs:
    import torch

    ids, _ = encode_with_spans(tokenizer, [text])[0]
    if not ids:
        return TokenLogprobs([], [], [] if top_k else None)
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids) + ids], device=device)
    with torch.no_grad():
        # logits of the positions that predict the trace tokens only (no [seq, vocab] for the prompt)
        logits = model(input_ids=input_ids, logits_to_keep=len(ids) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ids, device=device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    top = None
    if top_k:
        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        top = [
            [(token_bytes(tokenizer, i), v) for i, v in zip(row_i, row_v)]
            for row_i, row_v in zip(indices.tolist(), values.tolist())
        ]
    return TokenLogprobs([token_bytes(tokenizer, i) for i in ids], chosen, top)
