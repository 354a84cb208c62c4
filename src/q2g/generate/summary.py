"""Counting what stage 1 wrote: per-source problems, traces, yield, tokens and tokens/s; the table.

summary.json holds `sources` (one row per benchmark) and `total`; yield = the share of problems
with at least one validated trace; tok/s counts only timed batches (a resumed run adds its time).
"""

from __future__ import annotations

from collections import Counter, defaultdict


class Tally:
    """Per-source counts of the records written, and the time spent generating them."""

    def __init__(self, timing: dict | None = None):
        self.rows = defaultdict(
            lambda: {
                "problems": set(),
                "solved": set(),
                "samples": 0,
                "validated": 0,
                "tokens": 0,
                "rejected": Counter(),
                "timed_tokens": 0,
                "seconds": 0.0,
            }
        )
        for source, row in (timing or {}).items():
            self.rows[source].update(timed_tokens=row.get("timed_tokens", 0), seconds=row.get("seconds", 0.0))
        self.run_tokens, self.run_seconds = 0, 0.0

    def add_records(self, records: list[dict]) -> None:
        for r in records:
            row = self.rows[r["source"]]
            row["problems"].add(r["problem_id"])
            row["samples"] += 1
            row["tokens"] += r["n_tokens"]
            if r["validated"]:
                row["validated"] += 1
                row["solved"].add(r["problem_id"])
            else:
                row["rejected"][r["reason"]] += 1

    def add_time(self, problems: list[dict], samples: list[list], seconds: float) -> None:
        """A batch's time, shared between its sources by the tokens each generated."""
        tokens = Counter()
        for p, s in zip(problems, samples):
            tokens[p["source"]] += sum(x.n_tokens for x in s)
        total = sum(tokens.values())
        for source, n in tokens.items():
            self.rows[source]["timed_tokens"] += n
            self.rows[source]["seconds"] += seconds * (n / total if total else 1 / len(tokens))
        self.run_tokens += total
        self.run_seconds += seconds

    def summary(self, **extra) -> dict:
        sources = {s: summarize_row(row) for s, row in sorted(self.rows.items())}
        keys = ("problems", "problems_validated", "samples", "validated", "tokens", "timed_tokens", "seconds")
        total = {k: sum(s[k] for s in sources.values()) for k in keys}
        total["rejected"] = dict(sum((Counter(s["rejected"]) for s in sources.values()), Counter()))
        return {**extra, "sources": sources, "total": with_rates(total)}


def summarize_row(row: dict) -> dict:
    return with_rates(
        {
            "problems": len(row["problems"]),
            "problems_validated": len(row["solved"]),
            "samples": row["samples"],
            "validated": row["validated"],
            "tokens": row["tokens"],
            "rejected": dict(row["rejected"]),
            "timed_tokens": row["timed_tokens"],
            "seconds": round(row["seconds"], 3),
        }
    )


def with_rates(row: dict) -> dict:
    """yield = share of problems with at least one validated trace; tok/s over timed batches."""
    row["yield_pct"] = round(100 * row["problems_validated"] / row["problems"], 2) if row["problems"] else 0.0
    row["tokens_per_s"] = round(row["timed_tokens"] / row["seconds"], 1) if row["seconds"] else None
    return row


def print_table(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("source", "problems", "samples", "validated", "yield %", "tokens", "tok/s", "wall s"):
        table.add_column(name, justify="left" if name == "source" else "right")
    rows = [*summary["sources"].items(), ("total", summary["total"])]
    for name, r in rows:
        table.add_row(
            name,
            str(r["problems"]),
            str(r["samples"]),
            str(r["validated"]),
            f"{r['yield_pct']:.1f}",
            str(r["tokens"]),
            "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
            f"{r['seconds']:.1f}",
        )
    console = Console()
    if not console.is_terminal:  # logs: wide enough that no column is cut
        console.width = max(console.width, 110)
    console.print(table)
