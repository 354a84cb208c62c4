"""Mid-epoch forgetting checks (`--forgetting-check-steps N`): a cheap WikiText perplexity probe
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

import time

from q2g import distributed, forgetting
from q2g.evaluation.perplexity import perplexity
from q2g.io import append_jsonl, read_jsonl_tolerant


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


def stored_reference(run, rank: int) -> float | None:
    """The step-0 probe of this rank already in metrics.jsonl (a resumed run)."""
    rows = read_jsonl_tolerant(run.out / "metrics.jsonl") if (run.out / "metrics.jsonl").exists() else []
    return next(
        (r["token_perplexity"] for r in rows if r.get("probe") and r["lora_r"] == rank and r["step"] == 0), None
    )


def probe_row(run, rank: int, state, ppl: float, reference: float, tokens: int, seconds: float) -> dict:
    change = forgetting.relative_change(reference, ppl)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "probe": True,
        "epoch": round(state.epoch or 0.0, 4),
        "step": state.global_step,
        "lora_r": rank,
        "token_perplexity": ppl,
        "ppl_change": change,
        "flagged": forgetting.over_budget(change, run.settings.asked.forgetting_budget),
        "probe_tokens": tokens,
        "probe_s": seconds,
    }


def make_probe(run, rank: int):
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
            row = probe_row(run, rank, state, ppl, self.reference, self.sample[1], time.time() - t0)
            if distributed.is_main():
                append_jsonl(run.out / "metrics.jsonl", [row])
            return row

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.reference = stored_reference(run, rank)
            if self.reference is None and state.global_step == 0:
                self.check(state, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if self.reference is None or state.global_step % run.settings.asked.forgetting_check_steps:
                return control
            row = self.check(state, model)
            verdict = forgetting.verdict(row["ppl_change"], run.settings.asked.forgetting_budget)
            print(f"[finetune] probe at step {state.global_step} (rank {rank}): {verdict}", flush=True)
            if row["flagged"] and run.settings.asked.on_forgetting != "flag":
                print(
                    f"[finetune] probe over the forgetting budget: --on-forgetting {run.settings.asked.on_forgetting} "
                    f"ends this run at step {state.global_step} (the partial epoch is evaluated as usual)",
                    flush=True,
                )
                control.should_training_stop = True
            return control

    return ForgettingProbe()


def callbacks(run, rank: int) -> list:
    """The probe callback when --forgetting-check-steps is on (and WikiText is loaded), else none."""
    if not run.settings.asked.forgetting_check_steps or run.wikitext is None:
        return []
    return [make_probe(run, rank)]
