"""Stage 1: a teacher's step-by-step traces for GSM8K / MATH, kept only when the answer is right.

    python generate_traces.py --teacher Qwen/Qwen2.5-7B-Instruct --datasets gsm8k math
    q2g generate --backend reference --data-dir packaged --out dataset/     # offline, no model
    q2g generate --backend vllm --shard 0/4 ...   (one per GPU; merged when all four are done)

In order:
1. load the problems and split off the holdout (data.select_split); write split.json and
   holdout.jsonl first. Holdout problems never reach the teacher (checked with data.find_leaks).
2. ask the teacher (backends/) for k = --samples-per-problem samples of each train problem;
3. keep a sample in traces.jsonl when it finished, its final answer equals the gold one
   (answers.is_correct) and no earlier correct sample of the problem has the same text; else
   write it to rejected.jsonl with a reason: truncated, no_answer, gold_unparseable,
   wrong_answer, duplicate, or failed (the backend could not get it: asked again on the next run);
4. write summary.json (+ a table on screen) and config.json (the resolved settings).

Resume: the problems are cut into batches planned over the whole ordered list, so a batch and
its sampling seed never depend on what already ran. Each batch's records go out in one fsynced
append per file. A rerun of the same command reads what is there (a torn last line is dropped
with a warning), skips problems whose k samples are all written, regenerates a batch that was
cut short and appends only its missing records: after a SIGKILL at any moment, the rerun ends
with exactly the records of an uninterrupted run (for a sampling hf teacher: with the same
--batch-size, since a batch's samples depend on its members). At the end both files are rewritten
in problem order. A rerun with other settings is refused (exit 2) unless --overwrite, which
deletes the old outputs first. Exit codes (q2g.errors): 0 done, 1 backend failure, 2 bad input or settings.

Shards: `--shard I/N` takes the problems whose stable hash of id is I mod N and writes
traces.shard-I-of-N.jsonl etc.; once all N are complete the last one merges them into
traces.jsonl (sorted in problem order), or run `q2g generate --merge-shards` with the same options.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from q2g import backends
from q2g.backends import BACKENDS, DEFAULT_BATCH_SIZE, BackendError, stable_int
from q2g.config import Config, option, result_keys
from q2g.data import (
    DEFAULT_MATH_SUBJECTS,
    MATH_SUBJECTS,
    SOURCES,
    DataError,
    find_leaks,
    read_split,
    select_split,
    write_split,
)
from q2g.errors import BadInput, RunFailed
from q2g.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl_tolerant, settings_diff

OUTPUT_GLOBS = ("traces*.jsonl", "rejected*.jsonl", "summary*.json", "config.json", "split.json", "holdout.jsonl")
DELAY_ENV = "Q2G_GENERATE_BATCH_DELAY"  # test hook: seconds to sleep before each batch (kill/resume test)


@dataclass
class GenerateConfig(Config):
    """Stage 1's options."""

    teacher: str = option(
        "Qwen/Qwen2.5-7B-Instruct",
        results="traces",
        help="hub id, local folder, or the model's name on an openai server",
    )
    backend: str = option(
        "hf", choices=BACKENDS, results="traces", help="where the traces come from (see q2g.backends)"
    )
    datasets: list[str] = option(
        list(SOURCES), choices=SOURCES, results="traces", help="benchmarks to draw problems from"
    )
    math_subjects: list[str] = option(
        list(DEFAULT_MATH_SUBJECTS), choices=tuple(MATH_SUBJECTS), results="traces", help="MATH subjects"
    )
    math_levels: list[int] | None = option(
        None, min=1, max=5, results="traces", help="MATH levels to keep (default: all)"
    )
    temperature: float = option(0.3, min=0, max=2, results="traces", help="0 = greedy")
    top_p: float = option(0.95, gt=0, max=1, results="traces", help="nucleus sampling mass")
    max_new_tokens: int = option(
        1024, min=1, results="traces", help="token cap per sample (a capped sample is rejected as truncated)"
    )
    samples_per_problem: int = option(
        1, min=1, results="traces", help="k samples per problem; every distinct correct one is kept"
    )
    out: str = option("dataset", results=None, help="output folder")
    holdout: str = option(
        "random",
        choices=("random", "official-test"),
        results="traces",
        help="holdout: a random share of train, or the official test splits",
    )
    holdout_fraction: float = option(
        0.2, gt=0, max=0.9, results="traces", help="share of the problems held out (--holdout random)"
    )
    limit: int | None = option(
        None, min=1, results="traces", help="problems per stratum before splitting (quick runs)"
    )
    seed: int = option(0, results="traces", help="split and sampling seed")
    shard: str | None = option(None, results=None, help="I/N: generate only shard I of N (0-based)")
    merge_shards: bool = option(False, results=None, help="merge complete shard files into traces.jsonl and exit")
    batch_size: int | None = option(
        None,
        min=1,
        results=None,
        help="problems per batch (one write, the unit of resume); default "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH_SIZE.items()),
    )
    data_dir: str | None = option(
        None, results="traces", help="local data folder; 'packaged' = the subsets shipped with q2g (default: hub)"
    )
    overwrite: bool = option(False, results=None, help="delete the outputs in --out and start again")
    base_url: str | None = option(
        None, results=None, help="openai: server URL (default $OPENAI_BASE_URL or http://localhost:8000/v1)"
    )
    api_key: str | None = option(
        None, results=None, help="openai: API key (default $OPENAI_API_KEY or $Q2G_API_KEY); never saved"
    )
    concurrency: int = option(8, min=1, results=None, help="openai: requests in flight")
    timeout: float = option(600.0, gt=0, results=None, help="openai: seconds per request")
    max_retries: int = option(6, min=0, results=None, help="openai: retries on 429/5xx/connection errors")
    reasoning: str = option(
        backends.DEFAULT_REASONING,
        choices=backends.REASONING_MODES,
        results="traces",
        help="thinking teachers: the trace is <think>reasoning</think> + answer, or the answer only",
    )
    tensor_parallel_size: int = option(1, min=1, results=None, help="vllm: GPUs per model")
    precision: str = option("auto", choices=("auto", "bf16", "fp16", "fp32"), results=None, help="hf/vllm weights")
    device: str = option("auto", results=None, help="hf: cuda, cpu, mps or auto")

    def check(self) -> list[str]:
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except ValueError as e:
                return [str(e)]
        return []


def parse(argv=None) -> GenerateConfig:
    from q2g.config import load_config

    args = load_config(
        GenerateConfig, argv, prog="q2g generate", section="generate", description=__doc__.split("\n\n")[0]
    )
    return args.replace(batch_size=args.batch_size or DEFAULT_BATCH_SIZE[args.backend])


# ---------------------------------------------------------------- settings and files


def prompt_sha() -> str:
    """Fingerprint of the teacher prompt: traces made with another prompt are another dataset."""
    from q2g import prompts

    text = "\n".join([prompts.TEACHER_SYSTEM, prompts.TEACHER_INSTRUCTION, prompts.FINAL_ANSWER_LINE])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def resolved_config(args, split_settings: dict) -> dict:
    skip = {"api_key", "overwrite", "merge_shards"}  # never write a secret to disk
    config = {k: v for k, v in args.to_dict().items() if k not in skip}
    config.update(
        math_subjects=split_settings["math_subjects"],
        math_levels=split_settings["math_levels"],
        data_dir=split_settings["data_dir"],
        prompt_sha=prompt_sha(),
        split=split_settings,
    )
    return json.loads(json.dumps(config))


def settings_mismatch(out: Path, config: dict) -> list[str]:
    """How `config` differs from the one that wrote `out` (empty: the same run, so resume)."""
    if not (out / "config.json").exists():
        stray = [p.name for g in ("traces*.jsonl", "rejected*.jsonl") for p in out.glob(g)]
        return [f"{', '.join(stray)} exist(s) without a config.json"] if stray else []
    return settings_diff(out / "config.json", config, (*result_keys(GenerateConfig, scopes=("traces",)), "prompt_sha"))


def clear_outputs(out: Path) -> None:
    for pattern in OUTPUT_GLOBS:
        for path in out.glob(pattern):
            path.unlink()


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(match[1]), int(match[2])


def in_shard(problem_id: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or stable_int("shard", problem_id) % shard[1] == shard[0]


def output_paths(out: Path, shard: tuple[int, int] | None) -> dict[str, Path]:
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return {
        "traces": out / f"traces{tag}.jsonl",
        "rejected": out / f"rejected{tag}.jsonl",
        "summary": out / f"summary{tag}.json",
    }


# ---------------------------------------------------------------- judging samples


def normalize_trace(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def rejection(sample, problem: dict, extracted) -> str | None:
    """Why a sample is not a trace (None: it is one, unless a duplicate)."""
    from q2g.answers import is_correct

    if sample.error:  # the backend could not get it; the next run asks again
        return "failed"
    if sample.truncated:  # an unfinished trace would teach the student to stop mid-solution
        return "truncated"
    if extracted is None:
        return "no_answer"
    verdict = is_correct(sample.answer_text, problem["answer"], problem["source"])
    return "gold_unparseable" if verdict is None else None if verdict else "wrong_answer"


def judge(problem: dict, samples: list, meta: dict) -> list[dict]:
    """One record per sample; `validated` True for the first correct copy of each distinct text."""
    from q2g.answers import extract_answer_with_rule

    records, seen = [], set()
    for index, sample in enumerate(samples):
        extracted, rule = extract_answer_with_rule(sample.answer_text, problem["source"])  # not the thinking
        reason = rejection(sample, problem, extracted)
        if reason is None:
            key = normalize_trace(sample.text)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        record = {
            "problem": problem["problem"],
            "qwen_trace": sample.text.strip(),
            "answer": problem["answer"],
            "source": problem["source"],
            "validated": reason is None,
        }
        if reason:
            record["reason"] = reason
        if sample.error:
            record["error"] = sample.error
        record.update(
            id=f"{problem['id']}#s{index}",
            problem_id=problem["id"],
            sample=index,
            subject=problem["subject"],
            level=problem["level"],
            **meta,
            extracted_answer=extracted,
            answer_rule=rule,
            n_tokens=sample.n_tokens,
        )
        records.append(record)
    return records


def read_records(paths: dict[str, Path]) -> list[dict]:
    """Records already written (traces and rejects); a torn last line is cut off the file."""
    return read_jsonl_tolerant(paths["traces"], repair=True) + read_jsonl_tolerant(paths["rejected"], repair=True)


def retried(records: list[dict]) -> list[dict]:
    """Records without the failed samples that a later run got (its record replaces them)."""
    got = {r["id"] for r in records if r.get("reason") != "failed"}
    return [r for r in records if r.get("reason") != "failed" or r["id"] not in got]


def done_problems(records: list[dict], k: int) -> set[str]:
    """Problems whose k samples are all on disk (in either file)."""
    samples: dict[str, set[int]] = defaultdict(set)
    for r in records:
        samples[r["problem_id"]].add(r["sample"])
    return {pid for pid, s in samples.items() if len(s) >= k}


def write_sorted(path: Path, records: list[dict], order: dict[str, int]) -> None:
    """Rewrite a records file deduplicated by id and in problem order (atomic)."""
    unique = {}
    for r in records:
        unique.setdefault(r["id"], r)
    rows = sorted(unique.values(), key=lambda r: (order.get(r["problem_id"], len(order)), r["sample"]))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- counting


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


# ---------------------------------------------------------------- the generation loop


def run_batches(backend_loader, batches, paths, records, k, seed, meta, tally, extra) -> None:
    from tqdm import tqdm

    done, have = done_problems(records, k), {r["id"] for r in records}
    total = sum(len(b) for b in batches)
    bar = tqdm(
        total=total,
        initial=sum(p["id"] in done for b in batches for p in b),
        unit="problem",
        desc="generate",
        disable=False,
        dynamic_ncols=True,
    )
    delay, backend = float(os.environ.get(DELAY_ENV) or 0), None
    try:
        for batch in batches:
            todo = [p for p in batch if p["id"] not in done]
            if not todo:
                continue
            backend = backend or backend_loader()  # loaded only when there is work: a finished rerun is instant
            time.sleep(delay)
            start = time.perf_counter()
            # The whole batch, not just `todo`: a cut-short batch then gets the same samples again.
            samples = backend.generate(batch, k, seed)
            seconds = time.perf_counter() - start
            if len(samples) != len(batch) or any(len(s) != k for s in samples):
                raise BackendError(f"backend {backend.name} returned the wrong number of samples")
            new = [
                r
                for p, s in zip(batch, samples)
                if p["id"] not in done
                for r in judge(p, s, meta)
                if r["id"] not in have
            ]
            append_jsonl(paths["traces"], [r for r in new if r["validated"]])
            append_jsonl(paths["rejected"], [r for r in new if not r["validated"]])
            tally.add_records(new)
            tally.add_time(batch, samples, seconds)
            summary = tally.summary(complete=False, **extra)
            atomic_write_json(paths["summary"], summary)
            bar.set_postfix(
                {
                    "yield": f"{summary['total']['yield_pct']:.0f}%",
                    "tok/s": f"{tally.run_tokens / max(tally.run_seconds, 1e-9):.0f}",
                }
            )
            bar.update(len(todo))
    finally:
        bar.close()


def merge_shards(out: Path, order: dict[str, int], required: bool, extra: dict) -> dict | None:
    """Merge complete shards into traces.jsonl / rejected.jsonl / summary.json (None: not all done)."""
    found = {}
    for path in out.glob("summary.shard-*-of-*.json"):
        i, n = map(int, re.fullmatch(r"summary\.shard-(\d+)-of-(\d+)\.json", path.name).groups())
        found[(i, n)] = json.loads(path.read_text(encoding="utf-8"))
    counts = {n for _, n in found}
    if len(counts) != 1:
        if required:
            problem = f"shards of different N {sorted(counts)}" if counts else "no shard outputs found"
            raise DataError(f"{out}: {problem}")
        return None
    n = counts.pop()
    missing = [i for i in range(n) if not found.get((i, n), {}).get("complete")]
    if missing:
        if required:
            raise DataError(f"{out}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} not complete yet")
        return None
    records = []
    for i in range(n):
        records += read_records(output_paths(out, (i, n)))
    timing = defaultdict(lambda: {"timed_tokens": 0, "seconds": 0.0})
    for summary in found.values():  # time = sum over shards (GPU-seconds when they ran side by side)
        for source, row in summary["sources"].items():
            timing[source]["timed_tokens"] += row["timed_tokens"]
            timing[source]["seconds"] += row["seconds"]
    write_sorted(out / "traces.jsonl", [r for r in records if r["validated"]], order)
    write_sorted(out / "rejected.jsonl", [r for r in records if not r["validated"]], order)
    tally = Tally(timing)
    tally.add_records(list({r["id"]: r for r in records}.values()))
    summary = tally.summary(
        complete=True, **{**extra, "shard": None, "merged_shards": n, "problems_planned": len(order)}
    )
    atomic_write_json(out / "summary.json", summary)
    return summary


def check_teacher(args) -> None:
    """A local teacher (hf, vllm) that cannot load is refused before anything is written."""
    if args.backend in ("hf", "vllm"):
        from q2g.models import check_model_name

        check_model_name(args.teacher)


def teacher_name(args) -> str:
    return "reference" if args.backend == "reference" else args.teacher


def summary_extra(args, problems, holdout) -> dict:
    return {
        "shard": args.shard,
        "teacher": teacher_name(args),
        "backend": args.backend,
        "samples_per_problem": args.samples_per_problem,
        "problems_planned": len(problems),
        "holdout_problems": len(holdout),
    }


def main(argv=None) -> int:
    args = parse(argv)
    shard = parse_shard(args.shard) if args.shard else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    # all input is read and checked before anything is written
    check_teacher(args)
    train, holdout, settings = select_split(
        args.datasets,
        args.math_subjects,
        args.math_levels,
        args.holdout,
        args.holdout_fraction,
        args.seed,
        args.data_dir,
        args.limit,
    )
    config, order = resolved_config(args, settings), {r["id"]: i for i, r in enumerate(train)}
    mismatch = settings_mismatch(out, config)
    if mismatch and not args.overwrite:
        raise BadInput(
            f"{out} holds outputs of a run with other settings:\n  " + "\n  ".join(mismatch) + "\n"
            "Rerun with the same settings to resume, use another --out, or add --overwrite to delete them."
        )
    if args.overwrite:
        clear_outputs(out)
    if args.merge_shards:
        try:
            summary = merge_shards(out, order, required=True, extra=summary_extra(args, order, holdout))
        except ValueError as e:
            raise DataError(str(e)) from None
        print_table(summary, f"merged {summary['merged_shards']} shards -> {out / 'traces.jsonl'}")
        return 0
    return generate(args, out, train, holdout, settings, config, order, shard)


def generate(args, out, train, holdout, settings, config, order, shard) -> int:
    from q2g.io import writes_to

    with writes_to(out, hint="free some space, then rerun the same command to resume"):
        return write_outputs(args, out, train, holdout, settings, config, order, shard)


def write_outputs(args, out, train, holdout, settings, config, order, shard) -> int:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    write_split(out, train, holdout, settings)
    leaks = find_leaks(train, read_split(out))
    if leaks:  # select_split keeps the sides apart; this guards the promise, not the common case
        raise RuntimeError(f"{len(leaks)} train problems are in the holdout, e.g. {leaks[0]}")
    mine = [p for p in train if in_shard(p["id"], shard)]
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    paths = output_paths(out, shard)
    try:
        records = [r for r in read_records(paths) if r.get("reason") != "failed"]  # failed: ask again
        previous = json.loads(paths["summary"].read_text(encoding="utf-8")) if paths["summary"].exists() else {}
    except (ValueError, KeyError) as e:
        raise DataError(str(e)) from None
    extra = summary_extra(args, mine, holdout)
    tally = Tally(previous.get("sources"))
    tally.add_records(records)
    meta = {
        "teacher": teacher_name(args),
        "backend": args.backend,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    try:
        run_batches(
            lambda: backends.load_backend(args.backend, args),
            batches,
            paths,
            records,
            args.samples_per_problem,
            args.seed,
            meta,
            tally,
            extra,
        )
    except (ImportError, OSError) as e:
        raise RunFailed(f"{type(e).__name__}: {e}") from None
    except KeyboardInterrupt:
        print(f"interrupted; every finished batch is in {out}: rerun the same command to resume", file=sys.stderr)
        raise
    records = retried(read_records(paths))
    write_sorted(paths["traces"], [r for r in records if r["validated"]], order)
    write_sorted(paths["rejected"], [r for r in records if not r["validated"]], order)
    failed = sorted({r["problem_id"] for r in records if r.get("reason") == "failed"})
    summary = tally.summary(complete=not failed, **extra)
    atomic_write_json(paths["summary"], summary)
    print_table(summary, f"{args.backend} traces -> {paths['traces']}")
    if failed:
        error = next(r["error"] for r in records if r.get("reason") == "failed")
        raise RunFailed(
            f"{len(failed)} problem(s) failed (reason `failed` in {paths['rejected'].name}), e.g. "
            f"{failed[0]}: {error}\nRerun the same command to ask for them again."
        )
    if shard and (merged := merge_shards(out, order, required=False, extra=extra)):
        print_table(merged, f"all {shard[1]} shards complete: merged -> {out / 'traces.jsonl'}")
    return 0
