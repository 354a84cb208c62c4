"""What one `--distill on-policy` step costs against one SFT step, side by side in one run (CPU or GPU).

- SFT: q2g's label-only cross-entropy on a batch of `--batch` traces (forward + backward);
- on-policy: the same problems, the student samples `--samples` solutions of each (`--max-tokens`,
  temperature 1), the teacher scores the text with its own tokenizer, the chunks are aligned, and
  the policy-gradient loss goes forward + backward: OnPolicyTrainer.compute_loss itself, with the
  time of the sampling and of the teacher taken apart.

The student is a LoRA (r16, q_proj/v_proj) on --student; --teacher is an HF model (default: the
student's base, so the same-tokenizer path; give a Qwen2-tokenizer model for the cross-tokenizer
one). Steps alternate `--reps` times; the best of each is kept. The CPU model is printed.

    PYTHONPATH=src python benchmarks/onpolicy_cost.py                       # demo model, 4 problems x 4 samples x 128 tokens
    PYTHONPATH=src python benchmarks/onpolicy_cost.py --teacher <qwen2 folder> --reps 3
    PYTHONPATH=src python benchmarks/onpolicy_cost.py --tiny               # tiny random Gemma student, Qwen2 teacher (< 1 min)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from q2g.cpu_info import cpu_line  # the one CPU description (model, flags, bf16 units)

REPO = Path(__file__).resolve().parents[1]


def tiny_models(tmp: Path) -> tuple[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny

    return str(build_tiny("gemma3", tmp / "student")), str(build_tiny("qwen2", tmp / "teacher", seed=1))


def traces(n: int, data_dir: str) -> list[dict]:
    from q2g.data.splits import select_split

    train, _, _ = select_split(data_dir=data_dir, limit=max(4 * n, 8), seed=0)
    return train[:n]


class Timer:
    """Wraps a function; adds the seconds of its calls to `total`."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.real, self.total = owner, name, getattr(owner, name), 0.0
        setattr(owner, name, self)

    def __call__(self, *a, **k):
        start = time.perf_counter()
        try:
            return self.real(*a, **k)
        finally:
            self.total += time.perf_counter() - start


def build(args, tmp: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from q2g import models
    from q2g.finetune.distill.onpolicy import OnPolicyTrainer
    from q2g.finetune.distill.teacher_score import HFTeacher

    tok = models.load_tokenizer(args.student)
    base = models.load_model(args.student, torch.float32, args.device)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(base, lora)
    teacher = HFTeacher(args.teacher or args.student, args.device, torch.float32, 256, tok)
    opts = SimpleNamespace(
        distill_samples=args.samples,
        distill_temperature=1.0,
        distill_max_tokens=args.max_tokens,
        distill_sft_weight=0.0,
        distill_teacher_prompt="teacher",
        distill_teacher=args.teacher or args.student,
        seed=0,
    )
    targs = TrainingArguments(
        output_dir=str(tmp / "run"), use_cpu=args.device == "cpu", report_to="none", remove_unused_columns=False
    )
    trainer = OnPolicyTrainer(
        model=model,
        args=targs,
        processing_class=tok,
        teacher=teacher,
        options=opts,
        loss_chunk_size=256,
        fused="never",
    )
    return tok, model, teacher, trainer


def batch_of(tok, rows, max_seq_len: int, device: str) -> dict:
    from q2g.examples import Collator, build_example
    from q2g.finetune.distill.onpolicy_data import OnPolicyCollator

    examples = []
    for i, r in enumerate(rows):
        ex = build_example(tok, r["problem"], r["reference_solution"], max_seq_len)
        if ex is not None:
            examples.append({**ex, "problem": r["problem"], "problem_id": str(i)})
    out = OnPolicyCollator(Collator(tok.pad_token_id))(examples)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in out.items()}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="pypi:gemma3-270m")
    p.add_argument("--teacher", default=None, help="HF model folder or id (default: the student's base)")
    p.add_argument("--batch", type=int, default=4, help="problems per step")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=512, help="SFT: prompt + trace tokens")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default="packaged")
    p.add_argument("--tiny", action="store_true", help="tiny random models, 2 problems x 2 samples x 16 tokens")
    args = p.parse_args()
    import torch

    from q2g.finetune.distill import onpolicy_data
    from q2g.finetune.loss import LabelOnlyLossTrainer
    from q2g.prompts import student_prompt_ids

    tmp = Path(tempfile.mkdtemp(prefix="onpolicy_cost_"))
    try:
        if args.tiny:
            args.student, args.teacher = tiny_models(tmp)
            args.batch, args.samples, args.max_tokens, args.max_seq_len, args.reps = 2, 2, 16, 128, 1
        torch.manual_seed(0)
        tok, model, teacher, trainer = build(args, tmp)
        rows = traces(args.batch, args.data_dir)
        draw, score = Timer(onpolicy_data, "draw"), Timer(trainer, "score")
        warm = [student_prompt_ids(tok, rows[0]["problem"])]
        draw.real(model, tok, warm, 1, 1.0, 2, 0, trainer.end_ids)  # generate's first-call set-up, untimed
        best = {"sft": float("inf"), "onpolicy": float("inf"), "sample": 0.0, "teacher": 0.0}
        for _ in range(args.reps):
            batch = batch_of(tok, rows, args.max_seq_len, args.device)
            sft_inputs = {k: v for k, v in batch.items() if not k.startswith("onpolicy_")}

            def sft(sft_inputs=sft_inputs):
                LabelOnlyLossTrainer.compute_loss(trainer, model, dict(sft_inputs)).backward()

            def onpolicy(batch=batch):
                trainer.compute_loss(model, dict(batch)).backward()

            model.zero_grad()
            best["sft"] = min(best["sft"], timed(sft))
            model.zero_grad()
            shutil.rmtree(tmp / "run", ignore_errors=True)
            trainer.micro = (None, -1)
            draw.total = score.total = 0.0
            t = timed(onpolicy)
            if t < best["onpolicy"]:
                best.update(onpolicy=t, sample=draw.total, teacher=score.total)
        report(args, best, tok, teacher, batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args, best: dict, tok, teacher, batch) -> None:
    import torch

    sft_tokens = int((batch["labels"] != -100).sum())
    rest = best["onpolicy"] - best["sample"] - best["teacher"]
    print(f"device {args.device}: {cpu_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"student {args.student}; teacher {args.teacher or args.student} (same vocabulary: {teacher.same_vocab})")
    print(
        f"{args.batch} problems; SFT on {sft_tokens} trace tokens; on-policy {args.samples} samples x "
        f"<= {args.max_tokens} tokens each; best of {args.reps}\n"
    )
    print("| step | seconds | x SFT | of which: sampling | teacher scoring | rest: student lp, align, PG fwd+bwd |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| SFT (label-only CE) | {best['sft']:.2f} | 1.0 | | | |")
    print(
        f"| on-policy | {best['onpolicy']:.2f} | {best['onpolicy'] / best['sft']:.1f} | {best['sample']:.2f} | "
        f"{best['teacher']:.2f} | {rest:.2f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
