"""Stage 1: a teacher's step-by-step traces for GSM8K / MATH, kept only when the answer is right.

    python generate_traces.py --teacher Qwen/Qwen2.5-7B-Instruct --datasets gsm8k math
    q2g generate --backend reference --data-dir packaged --out dataset/     # offline, no model
    q2g generate --backend vllm --shard 0/4 ...   (one per GPU; merged when all four are done)

In order:
1. load the problems and split off the holdout (data.splits.select_split); write split.json and
   holdout.jsonl first. Holdout problems never reach the teacher (checked with data.splits.find_leaks).
2. ask the teacher (backends/) for k = --samples-per-problem samples of each train problem;
3. keep a sample in traces.jsonl when it finished, its final answer equals the gold one
   (answers.check.is_correct) and no earlier correct sample of the problem has the same text; else
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

import json
import sys
import time

from q2g.backends import BackendError, check_available
from q2g.backends import load as backend_load
from q2g.data.splits import find_leaks, read_split, select_split, write_split
from q2g.data.teacher_logprobs import finish_side_file
from q2g.errors import BadInput, DataError, RunFailed
from q2g.generate.config import parse
from q2g.generate.logprobs import report, score_traces, side_rows
from q2g.generate.outputs import clear_outputs, resolved_config, settings_mismatch
from q2g.generate.records import done_problems, judge, read_records, retried, write_sorted
from q2g.generate.shards import complete_shards, in_shard, layout_problem, merge_shards, output_paths, parse_shard
from q2g.generate.summary import Tally, print_table
from q2g.io import append_jsonl, atomic_write_json, read_input_bytes, read_jsonl_tolerant, writes_to
from q2g.models import check_model_name
from q2g.out_guard import LOCK_NAME, check_output, hold_lock

__all__ = ["main", "parse"]  # parse: run and sweep check a generate command line through this module


def run_batches(backend_loader, batches, paths, records, k, seed, meta, tally, extra, top_k=0) -> None:
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
    backend = None
    try:
        for batch in batches:
            todo = [p for p in batch if p["id"] not in done]
            if not todo:
                continue
            backend = backend or backend_loader()  # loaded only when there is work: a finished rerun is instant
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
            if top_k:  # the side file first: a trace on disk always has its log-probs line
                append_jsonl(
                    paths["teacher_logprobs"], side_rows(backend, batch, samples, new, top_k, meta["teacher"])
                )
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
        if backend is not None and hasattr(backend, "close"):
            backend.close()  # vLLM: the engine goes, its GPU memory back (q2g run's finetune needs it)


def check_teacher(args) -> None:
    """A local teacher (hf, vllm) that cannot load is refused before anything is written."""
    if args.backend in ("hf", "vllm"):
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
    if args.score_traces:
        return score_traces(args, backend_load.load_backend)
    shard = parse_shard(args.shard) if args.shard else None
    out = check_output(args.out, "--out", inputs={"--data-dir": args.data_dir, "--teacher": args.teacher})
    # all input is read and checked before anything is written
    check_available(args.backend)
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
    if shard and shard[1] > len(train):
        raise BadInput(f"--shard {args.shard}: {shard[1]} shards for {len(train)} train problems (at most one each)")
    if shard and not args.overwrite and (why := layout_problem(out, shard)):
        raise BadInput(why)
    if args.merge_shards:
        try:
            complete_shards(out, required=True)
        except ValueError as e:
            raise DataError(str(e)) from None
    config, order = resolved_config(args, settings), {r["id"]: i for i, r in enumerate(train)}
    mismatch = settings_mismatch(out, config)
    if mismatch and not args.overwrite:
        raise BadInput(
            f"{out} holds outputs of a run with other settings:\n  " + "\n  ".join(mismatch) + "\n"
            "Rerun with the same settings to resume, use another --out, or add --overwrite to delete them."
        )
    lock = f"{LOCK_NAME}.shard-{shard[0]}-of-{shard[1]}" if shard else LOCK_NAME  # shards run side by side
    with hold_lock(out, name=lock):  # every check is done: the folder is this run's until it ends
        return locked_main(args, out, train, holdout, settings, config, order, shard)


def locked_main(args, out, train, holdout, settings, config, order, shard) -> int:
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
        previous = json.loads(read_input_bytes(paths["summary"])) if paths["summary"].exists() else {}
    except (ValueError, KeyError) as e:
        raise DataError(str(e)) from None
    if not isinstance(previous, dict) or not isinstance(previous.get("sources", {}), dict):
        raise DataError(f"{paths['summary']}: not a q2g summary (use another --out, or --overwrite)")
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
            lambda: backend_load.load_backend(args.backend, args),
            batches,
            paths,
            records,
            args.samples_per_problem,
            args.seed,
            meta,
            tally,
            extra,
            args.teacher_logprobs,
        )
    except (ImportError, OSError) as e:
        raise RunFailed(f"{type(e).__name__}: {e}") from None
    except KeyboardInterrupt:
        print(f"interrupted; every finished batch is in {out}: rerun the same command to resume", file=sys.stderr)
        raise
    records = retried(read_records(paths))
    write_sorted(paths["traces"], [r for r in records if r["validated"]], order)
    write_sorted(paths["rejected"], [r for r in records if not r["validated"]], order)
    if args.teacher_logprobs:
        kept = read_jsonl_tolerant(paths["traces"])
        finish_side_file(paths["teacher_logprobs"], kept)
        report(paths["teacher_logprobs"], kept)
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
