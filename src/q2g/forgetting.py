"""The forgetting budget: how much WikiText perplexity may rise before a fine-tune is flagged.

Pure functions, used by `finetune.py` after every epoch and by `report.py`:

- `relative_change(baseline, current)`: (current - baseline) / baseline of token perplexity.
- `over_budget(change, budget)`: True when the rise is larger than the budget (0.05 = +5 %).
  A fall in perplexity is never forgetting, whatever the budget.
- A perplexity that is not a finite number (NaN/inf: the model's logits went non-finite) is no
  measurement to compare: both functions raise RunFailed (exit 1), as a non-finite loss does,
  instead of "within budget: +nan%".
- `next_rank(r, min_rank)`: the LoRA rank to retrain with under `--on-forgetting reduce-rank`.
- `choose_final(rows, policy)`: which evaluated epoch becomes `checkpoints/final/`.

Policies (`--on-forgetting`): `flag` marks the epoch and carries on; `stop` ends training and
keeps the last epoch that was within budget; `reduce-rank` stops the run and retrains from
scratch at half the rank (same alpha/rank ratio) until a run stays within budget or the rank
would fall below `--min-rank`.
"""

from __future__ import annotations

import math

from q2g.errors import RunFailed

POLICIES = ("flag", "stop", "reduce-rank")
DEFAULT_BUDGET = 0.05  # +5 % WikiText perplexity: the one default (finetune, report, sweep)


def relative_change(baseline: float, current: float) -> float:
    """Relative change of a perplexity: +0.05 means 5 % higher than the baseline."""
    if not _finite(baseline):
        raise RunFailed(
            f"the baseline WikiText perplexity is {baseline}, not a number: the base model's logits are not "
            f"finite (a broken checkpoint, or fp16 overflow: try --precision bf16 or fp32); nothing to compare against"
        )
    if not baseline > 0:
        raise ValueError(f"baseline perplexity must be positive, got {baseline}")
    if not _finite(current):
        raise RunFailed(
            f"WikiText perplexity is {current} after training (baseline {baseline:.4g}): the model's logits are "
            f"not finite, so forgetting cannot be measured; the run stops (try a lower --lr or --precision fp32)"
        )
    return (current - baseline) / baseline


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def over_budget(change: float | None, budget: float) -> bool:
    """True when perplexity rose by more than `budget` (a fraction). None (not measured) is False;
    a NaN/inf change raises RunFailed (never False-and-continue)."""
    if budget < 0:
        raise ValueError(f"the forgetting budget is a fraction >= 0, got {budget}")
    if change is not None and not _finite(change):
        raise RunFailed(f"the WikiText perplexity change is {change}, not a number: the run stops")
    return change is not None and change > budget


def next_rank(r: int, min_rank: int) -> int | None:
    """Half the rank, or None when that would fall below `min_rank` (no retrain left to try)."""
    half = r // 2
    return half if half >= max(1, min_rank) else None


def scaled_alpha(alpha: float, r: int, new_r: int) -> float:
    """LoRA alpha for `new_r` that keeps alpha / r (the adapter's scale) unchanged."""
    return alpha * new_r / r


def choose_final(rows: list[dict], policy: str) -> dict | None:
    """The metrics row whose adapter becomes `final/`; None means no adapter qualifies.

    `rows` are the evaluated epochs (epoch >= 1) in the order they were trained. Under `flag`
    the last trained epoch wins, flagged or not; otherwise the last one within budget.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    trained = [r for r in rows if r.get("epoch", 0) >= 1]
    if policy != "flag":
        trained = [r for r in trained if not r.get("flagged")]
    return trained[-1] if trained else None


def verdict(change: float | None, budget: float) -> str:
    """A one-line human verdict for the console and the report."""
    if change is None:
        return "not measured (evaluation skipped)"
    allowed = f"{budget * 100:g}%"
    if over_budget(change, budget):
        return f"OVER BUDGET: WikiText perplexity {change:+.1%} > {allowed} allowed"
    return f"within budget: WikiText perplexity {change:+.1%} (<= {allowed} allowed)"
