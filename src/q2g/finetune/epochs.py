"""One epoch's outputs: epoch-N/ (the adapter), its evaluation, and its metrics row.

    callback = make_callback(run, lora_r, lora_alpha, run_dir, guard)   # a TrainerCallback

Save first, then evaluate: at the end of an epoch the callback saves epoch-N/ with the training
half of the row (train_row.json); the Trainer then writes checkpoint-<step>; only after that
(`on_save`) is the epoch evaluated and its row appended to metrics.jsonl. A run killed during
the evaluation resumes from that checkpoint and evaluates the finished epoch without training
it again (`on_train_begin`); a row already in metrics.jsonl is never written twice.

Mid-epoch forgetting checks (`--forgetting-check-steps N`): a cheap WikiText perplexity probe
every N optimizer steps, so a run that forgets is stopped at once, not at the end of its epoch.

    q2g finetune ... --forgetting-check-steps 50 --forgetting-check-tokens 1024 --on-forgetting stop

The probe scores the first --forgetting-check-tokens tokens of the evaluation's WikiText text
(the same protocol and windows as evaluate.perplexity) on the in-memory model. Its reference is the
same probe at step 0 of the run (the adapter then adds nothing, whatever its init), kept in
metrics.jsonl so a resumed run compares against the same number. A probe over
--forgetting-budget under `stop` or `reduce-rank` ends the run: the epoch callback then evaluates
the partial epoch as usual, and that full evaluation stays the number of record (it flags the row,
picks final/ and triggers the retrain at a lower rank exactly as at an epoch end).

Probe rows go to metrics.jsonl with `"probe": true` (and a fractional epoch); `without_probes`
keeps them out of the rows the stage reasons about (final/, the report, resume).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from q2g import distributed, forgetting
from q2g.evaluation.core import evaluate_model, sharded_pass_at_1
from q2g.evaluation.perplexity import perplexity
from q2g.finetune.lora import save_adapter_files
from q2g.io import append_jsonl, atomic_write_json, read_jsonl_tolerant, write_jsonl

ADAPTER_CONFIG_NAME = "q2g_config.json"
TRAIN_ROW_NAME = "train_row.json"  # the training half of an epoch's row, saved before its evaluation
TRACKED = ("pass@1", "token_perplexity", "word_perplexity", "bits_per_byte", "ppl_change", "heldout_loss")


def tracker_scalars(row: dict) -> dict:
    """The evaluation fields of a metrics row, as scalars for TensorBoard / W&B / MLflow / Trackio
    (the `eval_` prefix is what the Trainer integrations file under eval/)."""
    keys = (*TRACKED, "answer_format_rate")
    out = {f"eval_{k}": float(row[k]) for k in keys if isinstance(row.get(k), (int, float))}
    out.update({f"eval_pass@1/{k}": float(v) for k, v in (row.get("pass@1_by_source") or {}).items()})
    if row.get("pass@1") is not None:
        out["eval_over_budget"] = float(bool(row.get("flagged")))
    return out


def save_adapter(model, tokenizer, folder: Path, config: dict, train_row: dict | None = None) -> None:
    """Adapter + tokenizer + q2g_config.json (+ train_row.json), written beside and renamed."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter_files(model, tmp)  # PiSSA/OLoRA: saved as a plain LoRA
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / ADAPTER_CONFIG_NAME, config)
    if train_row is not None:
        atomic_write_json(tmp / TRAIN_ROW_NAME, train_row)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def evaluate(run, model, gen_path: Path, adapter_dir: Path | None = None, decoded=None) -> dict:
    """pass@1 + perplexity of the in-memory model -> the evaluation fields of a metrics row.
    `decoded`: pass@1 decoded across the processes (q2g.evaluation.core), or None."""
    if run.records is None:
        return {"pass@1": None, "token_perplexity": None, "ppl_change": None, "flagged": False}
    s = run.settings
    result = evaluate_model(
        model,
        run.tokenizer,
        run.records,
        run.wikitext,
        s.eval,
        precision=run.precision,
        adapter_dir=adapter_dir,
        decoded=decoded,
    )
    write_jsonl(gen_path, result["math"]["generations"])
    row = result["row"]
    change = forgetting.relative_change(run.baseline_ppl() or row["token_perplexity"], row["token_perplexity"])
    return {
        **row,
        "ppl_change": change,
        "flagged": forgetting.over_budget(change, s.asked.forgetting_budget),
        "generations": str(gen_path.relative_to(run.out)),
    }


def describe(row: dict, budget: float) -> str:
    if row.get("pass@1") is None:
        return "not evaluated (--no-eval)"
    by = ", ".join(f"{k} {v:.1%}" for k, v in row["pass@1_by_source"].items())
    extra = "".join(
        f" | {label} {row[k]:{fmt}}"
        for k, label, fmt in (("heldout_loss", "held-out loss", ".4f"), ("answer_format_rate", "answer format", ".0%"))
        if row.get(k) is not None
    )
    return (
        f"pass@1 {row['pass@1']:.1%} ({by}){extra} | WikiText ppl {row['token_perplexity']:.3f}: "
        f"{forgetting.verdict(row['ppl_change'], budget)} | eval {row['eval_s']:.0f} s "
        f"({row['eval_problems_per_s']:.2f} problems/s, {row['eval_ppl_tokens_per_s']:.0f} ppl tok/s)"
    )


def record(run, row: dict) -> None:
    """Append a metrics row (the file is written by the main process only)."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    if distributed.is_main():
        append_jsonl(run.out / "metrics.jsonl", [row])
    run.rows.append(row)


def train_half(run, state, model, lora_r: int, alpha: float, run_dir: Path, since: tuple) -> dict:
    """Save epoch-N/ and return the training fields of its row (`since`: (t0, tokens0, step0))."""
    t0, tokens0, step0 = since
    train_s, epoch = time.time() - t0, math.ceil(state.epoch - 1e-6)
    name = f"epoch-{epoch}"
    losses = [h["loss"] for h in state.log_history if "loss" in h and h["step"] > step0]
    tokens = state.num_input_tokens_seen - tokens0
    rkl = [
        h["reverse_kl"] for h in state.log_history if "reverse_kl" in h and h["step"] > step0
    ]  # --distill on-policy
    row = {
        "epoch": epoch,
        "step": state.global_step,
        "lora_r": lora_r,
        "lora_alpha": alpha,
        "adapter": str((run_dir / name).relative_to(run.out)),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / max(train_s, 1e-9),
        "train_s": train_s,
        **({"train_reverse_kl": sum(rkl) / len(rkl)} if rkl else {}),
    }
    adapter_config = {**run.settings.to_dict(), "lora_r": lora_r, "lora_alpha": alpha, "epoch": epoch}
    save_adapter(model, run.tokenizer, run_dir / name, {**adapter_config, "step": state.global_step}, row)
    return row


def saved_train_half(run_dir: Path, epoch: int, step: int) -> dict | None:
    """The train_row.json of epoch-N/ if it belongs to the checkpoint at `step` (else None)."""
    try:
        row = json.loads((run_dir / f"epoch-{epoch}" / TRAIN_ROW_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("step") == step else None


def last_adapter(run, lora_r: int) -> str | None:
    """The newest saved epoch-N/ of this rank (what a NaN stop points the user to)."""
    rows = [r for r in run.rows if r.get("lora_r") == lora_r and r.get("adapter")]
    return str(run.out / rows[-1]["adapter"]) if rows else None


def make_callback(run, lora_r: int, alpha: float, run_dir: Path, guard=None):
    from transformers import TrainerCallback

    cfg = run.settings.asked

    class EpochEval(TrainerCallback):
        """epoch end: save epoch-N/; after the Trainer's checkpoint: evaluate, write the row, apply
        the policy. With several processes the main one evaluates and broadcasts the row."""

        trainer = None  # set by train_run: rows are logged to the trackers through it
        pending: dict | None = None  # the training half of an epoch saved but not yet evaluated

        def log(self, row: dict) -> None:
            if self.trainer is not None and (scalars := tracker_scalars(row)):
                self.trainer.log(scalars)

        def on_train_begin(self, args, state, control, model=None, **kw):
            base = run.find(None, 0)
            if base is not None and state.global_step == 0 and lora_r == cfg.lora_r:
                self.log(base)  # the baseline, at step 0
            epoch = math.ceil(state.epoch - 1e-6) if state.epoch else 0
            if epoch >= 1 and run.find(lora_r, epoch) is None:  # resumed from a checkpoint not yet evaluated
                self.pending = saved_train_half(run_dir, epoch, state.global_step)
                if self.pending is not None:
                    print(f"[finetune] epoch {epoch} (rank {lora_r}): trained, not evaluated: evaluating", flush=True)
                    return self.finish_epoch(state, control, model)
            return control

        def on_epoch_begin(self, args, state, control, **kw):
            self.since = (time.time(), state.num_input_tokens_seen, state.global_step)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = math.ceil(state.epoch - 1e-6)
            if run.find(lora_r, epoch) is not None:  # evaluated before a kill that came before its checkpoint
                print(f"[finetune] epoch {epoch} (rank {lora_r}): kept the row already in metrics.jsonl", flush=True)
                return control
            half = train_half(run, state, model, lora_r, alpha, run_dir, self.since) if distributed.is_main() else None
            self.pending = distributed.share(half)
            return control

        def on_save(self, args, state, control, model=None, **kw):
            return self.finish_epoch(state, control, model) if self.pending is not None else control

        def finish_epoch(self, state, control, model):
            half, self.pending = self.pending, None
            name = Path(half["adapter"]).name
            if run.records is not None:
                print(f"[finetune] epoch {half['epoch']} (rank {lora_r}): evaluating...", flush=True)
            scores = None
            decoded = sharded_pass_at_1(model, run.tokenizer, run.records, run.settings.eval, precision=run.precision)
            if distributed.is_main():
                gen_path = run_dir / "evals" / f"{name}.generations.jsonl"
                scores = evaluate(run, model, gen_path, run.out / half["adapter"], decoded)
            row = {**half, **distributed.share(scores)}
            if guard is not None:
                row = {**row, **guard.metrics()}
                guard.last_good_adapter = str(run.out / row["adapter"])
            record(run, row)
            self.log(row)
            report_epoch(run, row, lora_r, control)
            return control

    return EpochEval()


def report_epoch(run, row: dict, lora_r: int, control) -> None:
    """Print the epoch's line; an epoch over budget ends the run unless the policy is `flag`."""
    cfg = run.settings.asked
    loss = f"loss {row['train_loss']:.4f}, " if row.get("train_loss") is not None else ""
    print(
        f"[finetune] epoch {row['epoch']} (rank {lora_r}): {loss}{row['train_tokens_per_s']:.0f} train tok/s | "
        f"{describe(row, cfg.forgetting_budget)}",
        flush=True,
    )
    if row["flagged"] and cfg.on_forgetting != "flag":
        print(f"[finetune] forgetting budget exceeded: --on-forgetting {cfg.on_forgetting} ends this run", flush=True)
        control.should_training_stop = True


def without_probes(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("probe")]


def probe_sample(run) -> tuple[str, int]:
    """(text, tokens): the fixed probe sample, the first --forgetting-check-tokens tokens of the
    WikiText text (never more than the evaluation scores), cut once so no probe re-tokenizes it all."""
    cap = run.settings.asked.forgetting_check_tokens
    if run.settings.eval.ppl_max_tokens:
        cap = min(cap, run.settings.eval.ppl_max_tokens)
    ids = run.tokenizer(run.wikitext, add_special_tokens=False)["input_ids"][:cap]
    return run.tokenizer.decode(ids), cap


def probe_perplexity(model, run, sample: tuple[str, int]) -> float:
    """Token perplexity of the probe sample by the evaluation's protocol (evaluate.perplexity)."""
    cfg = run.settings.eval.replace(ppl_max_tokens=sample[1])
    result = perplexity(model, run.tokenizer, sample[0], cfg, progress=False, precision=run.precision)
    return result["token_perplexity"]


def stored_reference(run, lora_r: int) -> float | None:
    """The step-0 probe of this rank already in metrics.jsonl (a resumed run)."""
    rows = read_jsonl_tolerant(run.out / "metrics.jsonl") if (run.out / "metrics.jsonl").exists() else []
    return next(
        (r["token_perplexity"] for r in rows if r.get("probe") and r["lora_r"] == lora_r and r["step"] == 0), None
    )


def probe_row(run, lora_r: int, state, ppl: float, reference: float, tokens: int, seconds: float) -> dict:
    change = forgetting.relative_change(reference, ppl)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "probe": True,
        "epoch": round(state.epoch or 0.0, 4),
        "step": state.global_step,
        "lora_r": lora_r,
        "token_perplexity": ppl,
        "ppl_change": change,
        "flagged": forgetting.over_budget(change, run.settings.asked.forgetting_budget),
        "probe_tokens": tokens,
        "probe_s": seconds,
    }


def make_probe(run, lora_r: int):
    from transformers import TrainerCallback

    class ForgettingProbe(TrainerCallback):
        """Every N optimizer steps: probe perplexity, write a probe row, stop a run over budget."""

        reference: float | None = None
        sample = probe_sample(run)

        def check(self, state, model) -> dict:
            t0 = time.time()
            ppl = probe_perplexity(model, run, self.sample)
            if self.reference is None:
                self.reference = ppl
            row = probe_row(run, lora_r, state, ppl, self.reference, self.sample[1], time.time() - t0)
            if distributed.is_main():
                append_jsonl(run.out / "metrics.jsonl", [row])
            return row

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.reference = stored_reference(run, lora_r)
            if self.reference is None and state.global_step == 0:
                self.check(state, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if self.reference is None or state.global_step % run.settings.asked.forgetting_check_steps:
                return control
            row = self.check(state, model)
            verdict = forgetting.verdict(row["ppl_change"], run.settings.asked.forgetting_budget)
            print(f"[finetune] probe at step {state.global_step} (rank {lora_r}): {verdict}", flush=True)
            if row["flagged"] and run.settings.asked.on_forgetting != "flag":
                print(
                    f"[finetune] probe over the forgetting budget: --on-forgetting {run.settings.asked.on_forgetting} "
                    f"ends this run at step {state.global_step} (the partial epoch is evaluated as usual)",
                    flush=True,
                )
                control.should_training_stop = True
            return control

    return ForgettingProbe()


def probe_callbacks(run, lora_r: int) -> list:
    """The probe callback when --forgetting-check-steps is on (and WikiText is loaded), else none."""
    if not run.settings.asked.forgetting_check_steps or run.wikitext is None:
        return []
    return [make_probe(run, lora_r)]
