"""LoRA training-step speed and memory: fp32 vs bf16 autocast, on the real Gemma 3 270M.

    python benchmarks/train_step.py                      # CPU, 3 timed steps per mode
    python benchmarks/train_step.py --device cuda --steps 20
    python benchmarks/train_step.py --device cuda --model FOLDER --random-weights  # config + tokenizer only

One step = forward + backward + AdamW update of a LoRA adapter (r16 on q_proj/v_proj) on a batch of
8 x 256 WikiText tokens, the same work as one Trainer step of `q2g finetune --batch-size 8
--grad-accum 1` (without the Trainer's small bookkeeping). Each mode runs in its own process so
its peak RSS (getrusage) is its own. The last lines turn tokens/s into the cost of one epoch of
the demo data (the packaged train problems' reference solutions, as the student sees them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def batch_ids(tokenizer, batch: int, seq: int):
    import torch

    from q2g.data.loaders import load_wikitext

    ids = tokenizer(load_wikitext("packaged"), add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id] + ids[i * seq : (i + 1) * seq - 1] for i in range(batch)]
    return torch.tensor(rows)


def worker(args) -> dict:
    """Time `args.steps` LoRA steps in one precision mode; returns the measurements."""
    import torch
    from peft import LoraConfig, get_peft_model

    from q2g.models import load_model, load_tokenizer

    torch.manual_seed(0)
    if args.random_weights:  # same architecture and shapes, so the same time per step
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32).to(
            args.device
        )
    else:
        model = load_model(args.model, torch.float32, args.device)
    model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    )
    model.train()
    ids = batch_ids(load_tokenizer(args.model), args.batch, args.seq).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.mode == "bf16")
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    s_step = sum(times) / len(times)
    out = {
        "mode": args.mode,
        "s_per_step": s_step,
        "tokens_per_s": ids.numel() / s_step,
        "loss": loss.item(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def gemm_probe() -> str:
    """fp32 vs bf16 matmul speed on this CPU: shows when bf16 has no native kernels here."""
    import torch

    a, b = torch.randn(128, 640), torch.randn(640, 4096)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        t0 = time.perf_counter()
        x @ y
        rates[dtype] = 2 * 128 * 640 * 4096 / (time.perf_counter() - t0) / 1e9
    return (
        f"CPU {torch.backends.cpu.get_cpu_capability()}: matmul fp32 {rates[torch.float32]:.1f} GFLOP/s, "
        f"bf16 {rates[torch.bfloat16]:.2f} GFLOP/s"
    )


def demo_epoch_tokens(model: str, max_seq_len: int = 1024) -> tuple[int, int]:
    """(examples, tokens) of one epoch of the demo data, built exactly as finetune builds them."""
    from q2g.data.splits import select_split
    from q2g.examples import build_example
    from q2g.models import load_tokenizer

    tok = load_tokenizer(model)
    train, _, _ = select_split(data_dir="packaged", seed=0)
    examples = [build_example(tok, r["problem"], r["reference_solution"], max_seq_len) for r in train]
    examples = [e for e in examples if e]
    return len(examples), sum(len(e["input_ids"]) for e in examples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pypi:gemma3-270m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"])
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model (a folder with config + tokenizer) with random weights: same timings, no 1 GB download",
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds per mode before it is stopped and reported as '>'"
    )
    p.add_argument("--mode", help=argparse.SUPPRESS)  # set in the per-mode child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: over {args.timeout} s, stopped", file=sys.stderr, flush=True)
            results.append({"mode": mode, "timeout": True})
            continue
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{mode}: done ({results[-1]['s_per_step']:.2f} s/step)", file=sys.stderr, flush=True)
    print_table(args, results)
    return 0


def print_table(args, results: list[dict]) -> None:
    """s/step, tokens/s, peak RSS and speed relative to the first mode; a timed-out mode shows
    bounds ('>' s/step) from the time limit, which covered at most warm-up + steps steps."""
    ref = results[0]
    print(
        f"\nLoRA r16 q_proj/v_proj, {args.model} on {args.device}, batch {args.batch} x {args.seq} tokens, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    if args.device == "cpu":
        print(gemm_probe())
    print(f"{'mode':<6} {'s/step':>9} {'tokens/s':>9} {'peak RSS MiB':>13} {'speed vs ' + ref['mode']:>15}")
    for r in results:
        if r.get("timeout"):
            s_step = args.timeout / (args.warmup + args.steps)  # a lower bound
            ratio = ref["s_per_step"] / s_step if "s_per_step" in ref else float("nan")
            print(
                f"{r['mode']:<6} {'>' + format(s_step, '.0f'):>9} {'<' + format(args.batch * args.seq / s_step, '.1f'):>9} "
                f"{'n/a':>13} {'<' + format(ratio, '.3f') + 'x':>15}"
            )
            continue
        ratio = ref["s_per_step"] / r["s_per_step"] if "s_per_step" in ref else float("nan")
        print(
            f"{r['mode']:<6} {r['s_per_step']:9.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_mib']:13.0f} {ratio:14.2f}x"
            + (f"  (GPU peak {r['peak_gpu_mib']:.0f} MiB)" if "peak_gpu_mib" in r else "")
        )
    n, tokens = demo_epoch_tokens(args.model)
    for r in results:
        if "tokens_per_s" in r:
            print(
                f"one demo epoch ({n} examples, {tokens} tokens) at {r['mode']}: ~{tokens / r['tokens_per_s'] / 60:.1f} min"
            )


if __name__ == "__main__":
    sys.exit(main())
