"""q2g's LoRA training against TRL's SFTTrainer on the same traces, one after the other.

    python benchmarks/train_vs_trl.py --device cuda --steps 20           # the real Gemma 3 270M
    python benchmarks/train_vs_trl.py --tiny --steps 2                   # tiny random Gemma 3: a smoke test
    python benchmarks/train_vs_trl.py --device cuda --random-shape gemma-7b --batch-size 8 --grad-accum 4 \
        --seq-len 1024 --json out.json                                   # a Gemma-7B-shaped random bf16 model

Both train a LoRA adapter (r16, alpha 32, dropout 0.05, q_proj/v_proj) on the packaged train
problems' reference solutions (what the `reference` teacher writes), with the same batch size,
accumulation, max length, learning rate and precision (bf16 on a GPU that has it, else fp32):
    q2g  LabelOnlyLossTrainer (label-only chunked loss) + finetune's Collator and build_dataset
         (--packing: tests/helpers.py's PackedCollator instead, padding-free)
    TRL  SFTTrainer with its defaults on prompt/completion rows (completion-only loss; note that
         its default is gradient checkpointing ON, q2g's is off: --gradient-checkpointing on|off
         sets both)
Each runs in its own process, so the peaks are its own: peak RSS (getrusage) on the CPU,
torch.cuda.max_memory_allocated on a GPU. Real tokens = non-padding tokens (the Trainer's
num_input_tokens_seen); the first --warmup optimizer steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])


def load(args):
    import torch

    from q2g.models import load_model, load_tokenizer

    path = args.model
    if args.random_shape:
        return random_model(args)
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import build_tiny

        path = str(build_tiny("gemma3", Path(tempfile.mkdtemp()) / "tiny-gemma3"))
    bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
    model = load_model(path, torch.bfloat16 if bf16 else torch.float32, args.device)
    return model, load_tokenizer(path, padding_side="right"), bf16


GEMMA_7B = dict(  # google/gemma-7b's config.json
    vocab_size=256000,
    hidden_size=3072,
    intermediate_size=24576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=256,
    max_position_embeddings=8192,
)


def random_model(args):
    """A Gemma-7B-shaped model with random weights, built on the device in bf16 (no download);
    the tokenizer is the packaged tiny one's vocabulary-compatible stand-in (ids < its vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny

    from q2g.models import load_tokenizer

    tiny = build_tiny("gemma3", Path(tempfile.mkdtemp()) / "tiny-gemma3")
    bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
    config = GemmaConfig(**GEMMA_7B, attn_implementation="sdpa")
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
    return model, load_tokenizer(str(tiny), padding_side="right"), bf16


def plan_estimate(args, model, bf16) -> float:
    """q2g's memory plan's estimate (GB) for this model and shape (q2g.memory.estimate)."""
    from q2g.memory import GB, TrainShape, estimate

    shape = TrainShape(
        args.batch_size,
        args.seq_len,
        2 if bf16 else 4,
        16,
        tuple(LORA["target_modules"]),
        args.gradient_checkpointing == "on",
    )
    return estimate(model.config.get_text_config(), shape)["total"] / GB


def rows(n: int) -> list[dict]:
    from q2g.data.splits import select_split

    train, _, _ = select_split(data_dir="packaged", seed=0)
    return [
        {"problem": r["problem"], "qwen_trace": r["reference_solution"]} for r in (train * (n // len(train) + 1))[:n]
    ]


def common_args(args, bf16: bool) -> dict:
    return dict(
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.warmup + args.steps,
        learning_rate=2e-4,
        optim="adamw_torch",
        seed=0,
        bf16=bf16,
        fp16=False,
        use_cpu=args.device == "cpu",
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
    )


def q2g_trainer(args, model, tok, bf16, out):
    """q2g's own path: finetune's config -> finetune.trainer.training_arguments / build_lora_model, the
    label-only loss trainer, length-grouped batches (its default)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import PackedCollator

    from q2g.examples import Collator, build_dataset
    from q2g.finetune.config import FinetuneConfig
    from q2g.finetune.loss import LabelOnlyLossTrainer
    from q2g.finetune.train import build_lora_model, training_arguments

    ckpt = args.gradient_checkpointing == "on"
    cfg = FinetuneConfig(
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.seq_len,
        lr=2e-4,
        warmup_ratio=0.0,
        max_steps=args.warmup + args.steps,
        gradient_checkpointing=ckpt,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["target_modules"],
        trainer={"logging_steps": 10**6},
    )
    examples, _ = build_dataset(tok, rows(args.n_examples), args.seq_len)
    peft_model = build_lora_model(model, cfg, cfg.gradient_checkpointing)
    targs = training_arguments(cfg, Path(out), "bf16" if bf16 else None, "adamw_torch", 10**6, args.device)
    targs.save_strategy = "no"  # no checkpoints in a benchmark (q2g's own setting, per epoch, is for --resume)
    collator = PackedCollator() if args.packing else Collator(tok.pad_token_id)
    return LabelOnlyLossTrainer(
        model=peft_model,
        args=targs,
        train_dataset=examples,
        data_collator=collator,
        processing_class=tok,
        loss_chunk_size=cfg.loss_chunk_size,
    ), ckpt


def trl_trainer(args, model, tok, bf16, out):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from q2g.prompts import student_prompt

    data = Dataset.from_list(
        [
            {"prompt": student_prompt(tok, r["problem"]), "completion": r["qwen_trace"].strip()}
            for r in rows(args.n_examples)
        ]
    )
    extra = (
        {}
        if args.gradient_checkpointing == "default"
        else {"gradient_checkpointing": args.gradient_checkpointing == "on"}
    )
    cfg = SFTConfig(output_dir=out, max_length=args.seq_len, **common_args(args, bf16), **extra)
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    return trainer, cfg.gradient_checkpointing


def worker(args) -> dict:
    import torch
    from transformers import TrainerCallback

    model, tok, bf16 = load(args)
    with tempfile.TemporaryDirectory() as out:
        make = q2g_trainer if args.worker == "q2g" else trl_trainer
        trainer, ckpt = make(args, model, tok, bf16, out)
        marks = []

        class Clock(TrainerCallback):  # (time, real tokens seen) at the start and after every step
            def mark(self, state):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_train_begin(self, targs, state, control, **kw):
                self.mark(state)

            def on_step_end(self, targs, state, control, **kw):
                self.mark(state)

        trainer.add_callback(Clock())
        trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup], marks[-1]
    timed = len(marks) - 1 - args.warmup
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    out = {
        "trainer": args.worker,
        "s_per_step": (t1 - t0) / max(timed, 1),
        "tokens_per_s": (n1 - n0) / max(t1 - t0, 1e-9),
        "gradient_checkpointing": bool(ckpt),
        "precision": "bf16" if bf16 else "fp32",
        "train_loss": losses[-1] if losses else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.worker == "q2g":
        out["plan_gb"] = plan_estimate(args, model, bf16)
        out.update(trainer.loss_info())
    return out


def print_table(args, results: dict) -> None:
    mem = "peak_gpu_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    label = "GPU peak MiB" if mem == "peak_gpu_mib" else "peak RSS MiB"
    packed = " (q2g packed)" if args.packing else ""
    print(
        f"\nLoRA r16 q_proj/v_proj{packed}, {'tiny random Gemma 3' if args.tiny else args.model} on {args.device}, batch "
        f"{args.batch_size} x accum {args.grad_accum}, max length {args.seq_len}, {args.steps} timed steps after "
        f"{args.warmup} warm-up"
    )
    print(
        f"{'trainer':<8} {'s/step':>9} {'real tok/s':>11} {label:>13} {'grad ckpt':>10} {'precision':>10} {'loss':>8}"
    )
    for r in results.values():
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "n/a"
        print(
            f"{r['trainer']:<8} {r['s_per_step']:9.3f} {r['tokens_per_s']:11.0f} {r[mem]:13.0f} "
            f"{str(r['gradient_checkpointing']):>10} {r['precision']:>10} {loss:>8}"
        )
    q, t = results["q2g"], results["trl"]
    print(
        f"q2g/TRL: s/step {q['s_per_step'] / t['s_per_step']:.2f}x, real tok/s {q['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
        f"peak memory {q[mem] / t[mem]:.2f}x"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pypi:gemma3-270m", help="student: hub id, folder, or pypi:gemma3-270m")
    p.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 (tests/helpers.py) instead of --model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="max length (prompt + trace)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument(
        "--gradient-checkpointing",
        default="default",
        choices=["default", "on", "off"],
        help="default: each trainer's own (q2g off, TRL on)",
    )
    p.add_argument(
        "--packing", action="store_true", help="q2g packs each batch into one row (tests/helpers.py's PackedCollator)"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per trainer")
    p.add_argument("--random-shape", choices=["gemma-7b"], help="a random bf16 model of this shape, built on --device")
    p.add_argument("--json", help="also write both trainers' numbers to this JSON file")
    p.add_argument("--worker", choices=["q2g", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.n_examples = args.batch_size * args.grad_accum * (args.warmup + args.steps)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for name in ("q2g", "trl"):
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name] + sys.argv[1:],
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: done ({results[name]['s_per_step']:.3f} s/step)", file=sys.stderr, flush=True)
    print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
