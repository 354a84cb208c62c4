"""The sweep's report: DIR/trials.jsonl, DIR/pareto.md (the table of trials, the best within the
forgetting budget, failed trials with their reasons) and DIR/pareto.png (accuracy vs forgetting).

Written from the study alone, so every worker writes the same files.
"""

from __future__ import annotations

from pathlib import Path

from q2g.io import atomic_write_text, write_jsonl
from q2g.sweep.settings import OBJECTIVES, Sweep
from q2g.sweep.space import shown_settings


def best_within_budget(rows: list[dict], objectives: list[str]) -> dict | None:
    """The best first objective among trials within the forgetting budget (ties: less forgetting)."""
    sign = -1 if OBJECTIVES[objectives[0]] == "maximize" else 1
    within = [r for r in rows if not r["over_budget"]]
    return min(within, key=lambda r: (sign * r["values"][objectives[0]], r["ppl_change"]), default=None)


def failed_rows(study, sweep: Sweep) -> list[dict]:
    """The trials that failed with an error (not duplicates, not trials lost with their worker)."""
    from optuna.trial import TrialState

    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]
    return [
        {
            "trial": t.user_attrs.get("trial", t.number),
            "settings": shown_settings(sweep.dims, t.params, sweep.finetune),
            "failed": t.user_attrs["error"],
        }
        for t in failed
    ]


def write_outputs(study, sweep: Sweep) -> dict:
    """trials.jsonl, pareto.md and pareto.png from the study (so every worker writes the same)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "row" in t.user_attrs]
    best_trials = {t.number for t in study.best_trials}
    rows = sorted(
        ({**t.user_attrs["row"], "on_front": t.number in best_trials} for t in done), key=lambda r: r["trial"]
    )
    front = {r["trial"] for r in rows if r["on_front"]}
    failed = failed_rows(study, sweep)
    best = best_within_budget(rows, sweep.cfg.objectives)
    write_jsonl(sweep.out / "trials.jsonl", rows)
    if rows:
        plot_front(sweep.out / "pareto.png", rows, sweep.cfg.objectives[0], sweep.finetune.forgetting_budget)
    atomic_write_text(sweep.out / "pareto.md", "\n".join(pareto_lines(sweep, rows, best, failed)) + "\n")
    return {"rows": rows, "front": front, "best": best, "failed": failed}


def _fmt(key: str, v) -> str:
    if v is None:
        return "n/a"
    if key == "pass@1":
        return f"{v:.1%}"
    if key == "ppl_change":
        return f"{v:+.2%}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return f"{v:.4f}" if key == "heldout_loss" else f"{v:g}" if isinstance(v, float) else str(v)


def _md(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table_lines(rows: list[dict], failed: list[dict] = ()) -> list[str]:
    """One line per trial: its settings, final pass@1 (overall, per source), forgetting; front in
    bold; a failed trial's line gives its reason in the last column."""
    every = sorted([*rows, *failed], key=lambda r: r["trial"])
    keys = list(dict.fromkeys(k for r in every for k in r["settings"]))
    sources = sorted({s for r in rows for s in (r.get("pass@1_by_source") or {})})
    loss = any(r.get("heldout_loss") is not None for r in rows)
    metrics = ["pass@1", *(f"pass@1 {s}" for s in sources), *(["heldout loss"] if loss else []), "ppl change"]
    head = ["trial", "front", *keys, *metrics, "over budget", "train s", "adapter"]
    align = ["---:", ":---:", *("---" for _ in keys), *("---:" for _ in metrics), ":---:", "---:", "---"]
    lines = [_md(head), _md(align)]
    for r in every:
        settings = [_fmt(k, r["settings"].get(k)) for k in keys]
        if "failed" in r:
            lines.append(
                _md([str(r["trial"]), "", *settings, *("-" for _ in metrics), "-", "-", f"FAILED: {r['failed']}"])
            )
            continue
        b = "**" if r["on_front"] else ""
        by_source = r.get("pass@1_by_source") or {}
        cells = [
            f"{b}{r['trial']}{b}",
            "yes" if r["on_front"] else "",
            *settings,
            _fmt("pass@1", r["pass@1"]),
            *(_fmt("pass@1", by_source.get(s)) for s in sources),
            *([_fmt("heldout_loss", r.get("heldout_loss"))] if loss else []),
            _fmt("ppl_change", r["ppl_change"]),
            "**yes**" if r["over_budget"] else "no",
            f"{r['train_s']:.{0 if r['train_s'] >= 10 else 1}f}",
            r["adapter"] or "none (base model)",
        ]
        lines.append(_md(cells))
    return lines


def best_lines(sweep: Sweep, best: dict | None) -> list[str]:
    """The best trial within the budget, and the commands that load its adapter."""
    budget, first = sweep.finetune.forgetting_budget, sweep.cfg.objectives[0]
    lines = [f"Forgetting budget: WikiText perplexity may rise by at most {budget * 100:g}%.", ""]
    if best is None:
        return lines + ["**No trial stayed within the forgetting budget.**"]
    shown = ", ".join(f"{k}={_fmt(k, v)}" for k, v in best["settings"].items())
    lines.append(
        f"Best within the budget: **trial {best['trial']}** ({first} {_fmt(first, best['values'][first])}, "
        f"perplexity {_fmt('ppl_change', best['ppl_change'])}; {shown})."
    )
    if best["adapter"]:
        model = best["settings"].get("base_model", sweep.finetune.base_model)
        data_dir = best["settings"].get("data_dir", sweep.finetune.data_dir)
        split = sweep.out / "dataset" / "split.json"
        lines += [
            "Load its adapter (or merge it):",
            "",
            "```",
            f"q2g evaluate --model {model} --adapter {best['adapter']} --split {split}"
            + (f" --data-dir {data_dir}" if data_dir else ""),
            f"q2g merge --adapter {best['adapter']} --out {sweep.out / 'merged'}",
            "```",
        ]
    return lines


def pareto_lines(sweep: Sweep, rows: list[dict], best: dict | None, failed: list) -> list[str]:
    first, second = sweep.cfg.objectives
    summary = (
        f"{len(rows)} of {sweep.target} trials finished ({sweep.cfg.sampler} sampler over "
        f"{', '.join(sweep.dims)}); objectives: {OBJECTIVES[first]} {first}, minimize {second} "
        "(WikiText perplexity change vs. the base model). Front rows are in bold."
    )
    if failed:
        summary += f" {len(failed)} trial(s) failed (reasons in the table); rerun the command to retry them."
    lines = [f"# q2g sweep: {sweep.cfg.study_name}", "", summary, ""]
    lines += table_lines(rows, failed) + [""] + best_lines(sweep, best)
    return lines + ["", "![accuracy vs forgetting](pareto.png)"]


def plot_front(path: Path, rows: list[dict], metric: str, budget: float) -> None:
    """Every trial a point (metric vs perplexity change), the front joined, the budget line drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if metric == "pass@1" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for over, style in (
        (False, {"color": "tab:blue", "marker": "o", "label": "within budget"}),
        (True, {"color": "tab:red", "marker": "x", "label": "over budget"}),
    ):
        pts = [
            (r["ppl_change"] * 100, r["values"][metric] * scale, r["trial"]) for r in rows if r["over_budget"] == over
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], **style)
            for x, y, n in pts:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r["ppl_change"] * 100, r["values"][metric] * scale) for r in rows if r["on_front"])
    ax.plot(
        [p[0] for p in front],
        [p[1] for p in front],
        color="black",
        linewidth=1,
        marker="s",
        markersize=11,
        markerfacecolor="none",
        label="Pareto front",
    )
    ax.axvline(budget * 100, color="red", linestyle="--", label=f"budget (+{budget * 100:g}%)")
    ax.set(
        xlabel="WikiText perplexity change vs. base (%)",
        ylabel="pass@1 on the holdout (%)" if metric == "pass@1" else "held-out loss",
        title="q2g sweep: accuracy vs forgetting",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
