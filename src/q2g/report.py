"""The fine-tuning report: the seed's before/after table, the forgetting verdict, and plots.

    from q2g.report import write_report
    write_report("checkpoints", metrics_rows, info)   # -> checkpoints/report.md (+ its PNGs)

`metrics_rows` are the rows of metrics.jsonl (epoch 0 = the base model); `info` describes the run
(keys used, all optional: base_model, teachers [{teacher, backend, n}], budget, policy, final
{adapter, ...}, n_train_examples, n_train_tokens, epochs, lora_r, lora_alpha, target_modules, optim,
precision, device, wall_s). `finetune.py` writes it at the end of a run; `q2g run` prints it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from q2g import forgetting
from q2g.io import atomic_write_text


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _pp(a, b) -> str:
    return "n/a" if a is None or b is None else f"{(b - a) * 100:+.1f} pp"


def after_row(rows: list[dict], final: dict | None) -> tuple[dict | None, str]:
    """The row of the adapter kept in final/, else the last trained epoch (said so in its label)."""
    trained = [r for r in rows if r.get("epoch", 0) >= 1]
    adapter = (final or {}).get("adapter")
    kept = [r for r in trained if adapter and r.get("adapter") == adapter]
    if kept:
        return kept[-1], f"after fine-tune ({adapter})"
    if trained:
        return trained[-1], f"last epoch ({trained[-1].get('adapter')}, not kept)"
    return None, "after fine-tune"


def _num(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def results_table(base: dict | None, after: dict | None, label: str) -> list[str]:
    """metric | baseline | after | change: pass@1 per source, overall, answer format rate,
    held-out solution loss, WikiText perplexity."""
    base, after = base or {}, after or {}
    lines = [f"| metric | baseline | {label} | change |", "| --- | ---: | ---: | ---: |"]
    sources = sorted(set(base.get("pass@1_by_source") or {}) | set(after.get("pass@1_by_source") or {}))
    for key in sources:
        a, b = (base.get("pass@1_by_source") or {}).get(key), (after.get("pass@1_by_source") or {}).get(key)
        n = (after.get("n_by_source") or base.get("n_by_source") or {}).get(key)
        lines.append(f"| pass@1 {key}" + (f" (n={n})" if n else "") + f" | {_pct(a)} | {_pct(b)} | {_pp(a, b)} |")
    a, b = base.get("pass@1"), after.get("pass@1")
    lines.append(f"| pass@1 overall | {_pct(a)} | {_pct(b)} | {_pp(a, b)} |")
    a, b = base.get("answer_format_rate"), after.get("answer_format_rate")
    if a is not None or b is not None:
        lines.append(f"| answer format rate (final answer stated) | {_pct(a)} | {_pct(b)} | {_pp(a, b)} |")
    a, b = base.get("heldout_loss"), after.get("heldout_loss")
    if a is not None or b is not None:
        diff = "n/a" if a is None or b is None else f"{b - a:+.3f}"
        lines.append(f"| held-out solution loss (nats/token) | {_num(a)} | {_num(b)} | {diff} |")
    a, b = base.get("token_perplexity"), after.get("token_perplexity")
    measured = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b)) and a > 0
    change = forgetting.relative_change(a, b) if measured else None  # a NaN row reads n/a, never +nan%
    lines.append(
        f"| WikiText perplexity (token) | {_num(a)} | {_num(b)} | {'n/a' if change is None else f'{change:+.1%}'} |"
    )
    return lines


def teacher_line(teachers: list[dict] | None) -> str:
    if not teachers:
        return "unknown (the traces carry no `teacher`/`backend` fields)"
    parts = []
    for t in teachers:
        if t.get("backend") == "reference":
            parts.append(
                f"the datasets' own reference solutions (backend `reference`: no teacher model was run; "
                f"{t.get('n')} traces)"
            )
        else:
            parts.append(f"`{t.get('teacher')}` via `{t.get('backend')}` ({t.get('n')} traces)")
    return "; ".join(parts)


def epochs_table(rows: list[dict]) -> list[str]:
    lines = [
        "| epoch | rank | step | train loss | train tok/s | pass@1 | answer format | held-out loss | "
        "WikiText ppl | change | over budget |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in rows:
        loss, tps, ppl, ch = (
            r.get("train_loss"),
            r.get("train_tokens_per_s"),
            r.get("token_perplexity"),
            r.get("ppl_change"),
        )
        lines.append(
            f"| {r['epoch']} | {r.get('lora_r') or 'base'} | {r.get('step', 0)} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {'' if tps is None else f'{tps:.0f}'} | "
            f"{_pct(r.get('pass@1'))} | {_pct(r.get('answer_format_rate'))} | "
            f"{_num(r.get('heldout_loss'), 4)} | {_num(ppl)} | "
            f"{'' if ch is None else f'{ch:+.1%}'} | {'**yes**' if r.get('flagged') else 'no'} |"
        )
    return lines


def verdict_lines(rows: list[dict], after: dict | None, info: dict) -> list[str]:
    budget, policy = info.get("budget", forgetting.DEFAULT_BUDGET), info.get("policy", "flag")
    flagged = [r for r in rows if r.get("epoch", 0) >= 1 and r.get("flagged")]
    trained = [r for r in rows if r.get("epoch", 0) >= 1]
    lines = [
        f"- Budget: WikiText perplexity may rise by at most {budget * 100:g}% over the base model "
        f"(policy `--on-forgetting {policy}`)."
    ]
    lines.append(f"- Kept adapter: {forgetting.verdict(after.get('ppl_change') if after else None, budget)}.")
    lines.append(
        f"- Epochs over budget: {len(flagged)} of {len(trained)}"
        + (": " + ", ".join(f"{r.get('adapter')} ({r['ppl_change']:+.1%})" for r in flagged) if flagged else "")
        + "."
    )
    final = info.get("final") or {}
    if "final" in info and not final.get("adapter"):
        lines.append("- **No adapter stayed within budget: the base model is the result** (final/README.md).")
    return lines


# (metrics key, file, title): one plot per epoch-wise metric that the rows hold.
PLOTS = (
    ("pass@1", "pass_at_1.png", "pass@1 on the holdout"),
    ("answer_format_rate", "answer_format.png", "answer format rate (final answer stated)"),
    ("heldout_loss", "heldout_loss.png", "held-out solution loss (nats/token)"),
    ("token_perplexity", "perplexity.png", "WikiText token perplexity"),
)


def plot(out_dir: Path, rows: list[dict], budget: float) -> list[Path]:
    """One PNG per metric of PLOTS that some row has: per epoch, one line per LoRA rank, the
    base model's level, and on perplexity the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    base = next((r for r in rows if r.get("epoch") == 0), None)
    ranks = sorted({r["lora_r"] for r in rows if r.get("lora_r")}, reverse=True)
    paths = []
    for key, name, title in PLOTS:
        if all(r.get(key) is None for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for rank in ranks:
            pts = ([(0, base.get(key))] if base else []) + [
                (r["epoch"], r.get(key)) for r in rows if r.get("lora_r") == rank
            ]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"LoRA r={rank}")
        if base and base.get(key) is not None:
            ax.axhline(base[key], color="gray", linestyle=":", label="base model")
            if key == "token_perplexity":
                ax.axhline(base[key] * (1 + budget), color="red", linestyle="--", label=f"budget (+{budget * 100:g}%)")
        ax.set(xlabel="epoch (0 = base model)", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp"  # written beside and renamed: a failed write keeps the old plot
        try:
            fig.savefig(tmp, dpi=100, format="png")
            os.replace(tmp, out_dir / name)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        paths.append(out_dir / name)
    return paths


PROTOCOLS = {
    "q2g": "protocol `q2g`: sliding windows, <bos> in every window",
    "lm-eval": "protocol `lm-eval`: lm-evaluation-harness's wikitext task (its articles, detokenizer, windows and counts)",
    "lm-eval-raw": "protocol `lm-eval-raw`: lm-eval's windows and counts, without its detokenizer",
}


def _protocol_line(protocol: str | None) -> str:
    return PROTOCOLS.get(protocol or "q2g", f"protocol `{protocol}`")


def _backend(row: dict) -> str:
    return f", generated with {row['eval_backend']}" if row.get("eval_backend") else ""


def _heldout_line(row: dict) -> str:
    if row.get("heldout_loss") is None:
        return ""
    return (
        f"{row.get('heldout_n')} reference solutions ({row.get('heldout_tokens')} tokens) scored for the "
        f"held-out loss; "
    )


def write_report(out_dir, metrics_rows: list[dict], info: dict) -> Path:
    """Write out_dir/report.md (and its plots) from the metrics rows; returns the report's path."""
    out_dir = Path(out_dir)
    rows = sorted(metrics_rows, key=lambda r: (r.get("epoch", 0) > 0, -(r.get("lora_r") or 0), r.get("epoch", 0)))
    base = next((r for r in rows if r.get("epoch") == 0), None)
    after, label = after_row(rows, info.get("final"))
    evaluated = any(r.get("pass@1") is not None for r in rows)
    lines = [f"# q2g fine-tuning report: {info.get('base_model', 'student')}", ""]
    lines += results_table(base, after, label) if evaluated else ["Evaluation was skipped (`--no-eval`)."]
    lines += ["", "## Forgetting", ""] + verdict_lines(rows, after, info)
    scored = after or base or {}
    lines += [
        "",
        "## Setup",
        "",
        f"- Teacher: {teacher_line(info.get('teachers'))}.",
        f"- Student: `{info.get('base_model')}`, LoRA r={info.get('lora_r')} alpha={info.get('lora_alpha')} on "
        f"{', '.join(info.get('target_modules') or [])}; {info.get('epochs', 0):g} epochs, optimizer {info.get('optim')}, "
        f"{info.get('precision')} on {info.get('device')}.",
        f"- Training data: {info.get('n_train_examples')} validated traces ({info.get('n_train_tokens')} tokens).",
        f"- Evaluation: {scored.get('n_eval', 'n/a')} holdout problems scored (greedy pass@1, the same problems "
        f"every epoch{_backend(scored)}); {_heldout_line(scored)}{scored.get('ppl_tokens_scored', 'n/a')} "
        f"WikiText tokens scored for perplexity ({_protocol_line(scored.get('ppl_protocol'))}).",
    ]
    if info.get("loss_path"):  # what ran (q2g.finetune.config): loss, attention, checkpointing and why
        lines.append(
            f"- Ran: loss {info['loss_path']}, attention {info.get('attention')}; gradient checkpointing "
            f"{info.get('gradient_checkpointing')}."
        )
    if info.get("baseline_reused_from"):
        lines.append(f"- Baseline: reused from {info['baseline_reused_from']} (not evaluated again).")
    if info.get("holdout"):
        lines.append(f"- Holdout: {info['holdout']}.")
    if info.get("padding_share") is not None:
        lines.append(
            f"- Batches: {info['padding_share']:.1%} of the batch tokens were padding"
            f"{' (length-grouped)' if info.get('group_by_length') else ''}."
        )
    if any(r.get("nonfinite_skips") for r in rows):
        lines.append(
            f"- Non-finite steps skipped (--skip-nonfinite): {max(r.get('nonfinite_skips') or 0 for r in rows)}."
        )
    if info.get("wall_s") is not None:
        lines.append(f"- Wall time: {info['wall_s'] / 60:.1f} min.")
    lines += ["", "## Every evaluation", ""] + epochs_table(rows)
    if evaluated:
        titles = {name: title for _, name, title in PLOTS}
        for path in plot(out_dir, rows, info.get("budget", forgetting.DEFAULT_BUDGET)):
            lines += ["", f"![{titles[path.name]} per epoch]({path.name})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
