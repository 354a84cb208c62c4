"""Before stage 2 writes anything: check every setting and input, and decide what the run will do.

    check_request(cfg, eval_cfg)        # cheap checks, also run by `q2g run` before generation
    run = prepare(cfg, eval_cfg)        # -> settings.Run; reads the traces, writes nothing

`prepare` is the one place the decisions of settings.Settings are made: device and precision
(models.resolve_precision), optimizer, the loss path, the attention implementation, the examples,
and (fit_memory) gradient checkpointing from q2g.memory's plan.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from q2g import memory, models
from q2g.batching import padding_report
from q2g.data import loaders, splits
from q2g.errors import BadInput, ConfigError
from q2g.evaluation.config import EvalConfig
from q2g.finetune.baseline import read_baseline, refuse_other_baseline
from q2g.finetune.config import FinetuneConfig
from q2g.finetune.rehearsal import add_rehearsal
from q2g.finetune.settings import Run, Settings, run_keys
from q2g.finetune.sft_data import build_dataset, locate_traces, read_traces, refuse_leaks, teacher_info
from q2g.finetune.trainer import training_arguments
from q2g.io import settings_diff
from q2g.loss import planned_loss_path
from q2g.out_guard import check_inputs, check_output

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(report_to: list[str]) -> None:
    """--report-to X needs X installed: say the pip command now, not as a traceback at step 0."""
    missing = [t for t in report_to if t in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
    if missing:
        pkgs = " ".join(TRACKER_PACKAGES[t] for t in missing)
        raise ConfigError(f"--report-to {' '.join(missing)}: not installed here: pip install {pkgs}")


def check_out(cfg: FinetuneConfig) -> Path:
    """--out through the output guard: never the base model, the traces, the split, the data folder,
    the baseline cache or --baseline-from, nor inside or holding any of them."""
    from q2g.finetune import baseline_cache

    inputs = {
        "--base-model": cfg.base_model,
        "--traces": cfg.traces,
        "--split": cfg.split,
        "--data-dir": cfg.data_dir,
        "--baseline-from": cfg.baseline_from,
        "baseline cache": baseline_cache.folder() if baseline_cache.enabled() and not cfg.no_baseline_cache else None,
    }
    return check_output(cfg.out, "--out", inputs=inputs)


def check_eval_backend(eval_cfg: EvalConfig) -> None:
    if eval_cfg.eval_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--eval-backend vllm needs vLLM, which is not installed: pip install 'q2g[vllm]'")


def check_request(cfg: FinetuneConfig, eval_cfg: EvalConfig) -> None:
    """What can be refused from the settings alone (no traces read, nothing written)."""
    check_out(cfg)
    check_inputs({"--traces": cfg.traces, "--split": cfg.split, "--baseline-from": cfg.baseline_from})
    check_eval_backend(eval_cfg)
    models.check_model_name(cfg.base_model)
    check_trackers(cfg.report_to)
    device = models.pick_device(cfg.device)
    models.resolve_precision(cfg.precision, device)
    training_arguments(cfg, Path(cfg.out), None, "adamw_torch", 1, device)  # a bad trainer: field, now
    models.check_target_modules(cfg.base_model, cfg.target_modules)


def prepare(cfg: FinetuneConfig, eval_cfg: EvalConfig) -> Run:
    """Read and check every input, decide the settings, then build the Run (nothing is written here)."""
    check_request(cfg, eval_cfg)
    traces_path, split_path = locate_traces(cfg.traces, cfg.split)
    all_rows, rows = read_traces(traces_path)
    refuse_leaks(rows, splits.read_split(split_path), traces_path, split_path)
    device = models.pick_device(cfg.device)
    precision = models.resolve_precision(cfg.precision, device)
    tokenizer = models.load_tokenizer(cfg.base_model, padding_side="right")
    examples, stats = build_dataset(tokenizer, rows, cfg.max_seq_len)
    if not examples:
        raise BadInput(f"no trace fits --max-seq-len {cfg.max_seq_len} (all {len(rows)} prompts are longer)")
    examples, stats = add_rehearsal(cfg, tokenizer, examples, stats, traces_path, device, precision)
    print(
        f"[finetune] {traces_path}: {len(all_rows)} traces, {len(rows)} validated, {stats['n_train_examples']} "
        f"examples ({stats['n_train_tokens']} tokens; {stats['n_truncated']} cut at {cfg.max_seq_len}, "
        f"{stats['n_skipped_prompt_too_long']} skipped: prompt too long)",
        flush=True,
    )
    settings = Settings(
        asked=cfg,
        eval=eval_cfg,
        **stats,
        traces_file=str(traces_path),
        split_file=str(split_path),
        device=device,
        dtype=str(precision.dtype).removeprefix("torch."),
        amp=precision.autocast,
        precision_used=precision.label,
        optim_used=models.resolve_optim(cfg.optim, device),
        teachers=teacher_info(all_rows),
        attention=models.attention_implementation(cfg.base_model),
        versions=versions(),
    )
    out = Path(cfg.out)
    settings.traces_sha256 = traces_sha256(rows)
    check_resume(cfg, out, settings)
    fit_memory(settings, [len(e["input_ids"]) for e in examples])
    if cfg.baseline_from:  # compared now: refused before config.json is written, not after
        refuse_other_baseline(Path(cfg.baseline_from), read_baseline(Path(cfg.baseline_from))[0], settings)
    run = Run(settings=settings, out=out, tokenizer=tokenizer, examples=examples, precision=precision)
    if not cfg.no_eval:
        run.records = splits.load_holdout(split_path)  # evaluate_model draws its fixed subsets from it
        run.wikitext = loaders.load_wikitext(cfg.data_dir)
    return run


def fit_memory(settings: Settings, lengths: list[int]) -> None:
    """The one place the memory decisions are made: estimate the training peak (q2g.memory) for the
    loss path that will run; turn on gradient checkpointing when that makes it fit, else say what
    to change. Sets settings.loss_path, memory_plan, padding_share, gradient_checkpointing_used/_why."""
    from transformers import AutoConfig

    cfg = settings.asked
    model_config = AutoConfig.from_pretrained(models.resolve_model_path(cfg.base_model), trust_remote_code=False)
    text_config = model_config.get_text_config()
    hidden = getattr(text_config, "hidden_size", None)
    if isinstance(hidden, int) and cfg.lora_r > hidden:
        raise ConfigError(f"--lora-r: must be <= the model's hidden size ({hidden}), got {cfg.lora_r}")
    settings.loss_path = planned_loss_path(settings.device, text_config)[
        "loss_path"
    ]  # q2g.loss decides; any count of processes
    shape = memory.TrainShape(
        cfg.batch_size,
        cfg.max_seq_len,
        4 if settings.dtype == "float32" else 2,
        cfg.lora_r,
        tuple(cfg.target_modules),
        cfg.gradient_checkpointing,
        label_only_loss=settings.loss_path != "plain",
        loss_chunk_size=cfg.loss_chunk_size,
        optim_8bit=settings.optim_used == "adamw_bnb_8bit",
        attention="eager" if settings.attention == "eager" else "sdpa",
    )
    free, kept = memory.free_for_training(settings.device, settings.to_dict())  # less the vLLM engine's share
    p = memory.plan(text_config, shape, free, cfg.grad_accum)
    padding = padding_report(lengths, cfg.batch_size, cfg.grad_accum, cfg.seed)
    settings.memory_plan = {
        "action": p.action,
        "need_gb": p.need_bytes / memory.GB,
        "free_gb": p.free_bytes / memory.GB,
        "message": p.message + (f"; {kept}" if kept else ""),
    }
    settings.padding_share = padding["group_by_length" if cfg.group_by_length else "random"]
    settings.gradient_checkpointing_used = cfg.gradient_checkpointing or p.action == "gradient_checkpointing"
    settings.gradient_checkpointing_why = (
        "asked (--gradient-checkpointing)"
        if cfg.gradient_checkpointing
        else f"turned on by the memory plan ({p.message})"
        if p.action == "gradient_checkpointing"
        else f"off: not needed ({p.message})"
    )
    print(
        f"[finetune] loss {settings.loss_path}, attention {settings.attention}, precision {settings.precision_used}; "
        f"memory: {p.message}; padding {settings.padding_share:.1%} of batch tokens",
        flush=True,
    )
    print(f"[finetune] gradient checkpointing: {settings.gradient_checkpointing_why}", flush=True)
    if p.action not in ("fits", "gradient_checkpointing"):
        print(f"[finetune] WARNING: the estimate says this will not fit: {p.message}", flush=True)


def traces_sha256(rows: list[dict]) -> str:
    """What a resume compares: the validated traces' content (not their count)."""
    import hashlib
    import json

    text = json.dumps([[r.get("id"), r["problem"], r["qwen_trace"]] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_resume(cfg: FinetuneConfig, out: Path, settings: Settings) -> None:
    """A folder holding a run is continued only with --resume and the same settings and traces."""
    if not (out / "metrics.jsonl").exists():
        return
    if not cfg.resume:
        raise BadInput(
            f"{out} already holds a run (metrics.jsonl); pass --resume to continue it or choose another --out"
        )
    diff = settings_diff(out / "config.json", settings.to_dict(), run_keys(("baseline", "training")))
    if diff:
        raise BadInput(f"--resume: {out} was made with other settings ({'; '.join(diff)}); use another --out")


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
