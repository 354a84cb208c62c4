"""Before stage 2 writes anything: check every setting and input, and decide what the run will do.

    check_request(cfg, eval_cfg)        # cheap checks (also run by `q2g run` before generation) -> (device, precision)
    run = prepare(cfg, eval_cfg)        # -> config.Run; reads the traces; writes only rehearsal texts to the cache

`prepare` is the one place the decisions of config.Settings are made: device and precision
(decided once, in check_request, and passed on in Settings and Run), optimizer, the loss path, the attention implementation, the examples,
and (fit_memory) gradient checkpointing from q2g.memory's plan.
Self-rehearsal texts: q2g.finetune.rehearsal (add_rehearsal, called here after every check).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from q2g import cpu_info, distributed, memory, models
from q2g.batching import padding_report
from q2g.data import loaders, splits
from q2g.errors import BadInput, ConfigError
from q2g.evaluation.config import EvalConfig
from q2g.examples import build_dataset, locate_traces, read_traces, refuse_leaks, teacher_info
from q2g.finetune import baseline, kl_anchor
from q2g.finetune.baseline import read_baseline, refuse_other_baseline
from q2g.finetune.config import FinetuneConfig, Run, Settings, run_keys
from q2g.finetune.distill.data import add_distill, report_text
from q2g.finetune.distill.onpolicy import prepare_info as onpolicy_info
from q2g.finetune.distill.onpolicy_data import memory_shape, tag_problems
from q2g.finetune.lora import check_init_adapter
from q2g.finetune.loss import planned_loss_path
from q2g.finetune.rehearsal import add_rehearsal
from q2g.finetune.train import training_arguments
from q2g.io import settings_diff
from q2g.optional import require
from q2g.out_guard import check_inputs, check_output

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # --report-to values that need their package


def check_trackers(report_to: list[str]) -> None:
    """--report-to X needs X installed: say the pip command now, not as a traceback at step 0."""
    for tracker in report_to:
        if tracker in TRACKERS:
            require(tracker, f"--report-to {tracker}", ConfigError)


def check_out(cfg: FinetuneConfig) -> Path:
    """--out through the output guard: never the base model, the traces, the split, the data folder,
    the baseline cache or --baseline-from, nor inside or holding any of them."""
    inputs = {
        "--base-model": cfg.base_model,
        "--traces": cfg.traces,
        "--split": cfg.split,
        "--data-dir": cfg.data_dir,
        "--baseline-from": cfg.baseline_from,
        "--init-adapter": cfg.init_adapter,
        "--distill-teacher": cfg.distill_teacher,
        "baseline cache": baseline.folder() if baseline.enabled() and not cfg.no_baseline_cache else None,
    }
    return check_output(cfg.out, "--out", inputs=inputs)


def check_eval_backend(eval_cfg: EvalConfig) -> None:
    if eval_cfg.eval_backend == "vllm":
        require("vllm", "--eval-backend vllm", ConfigError)


def check_rank(cfg: FinetuneConfig) -> None:
    """--lora-r at most the model's hidden size (an absurd rank would ask for terabytes), read from
    its config alone, before the rehearsal step or anything else writes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.resolve_model_path(cfg.base_model), trust_remote_code=False)
    hidden = getattr(config.get_text_config(), "hidden_size", None)
    if isinstance(hidden, int) and cfg.lora_r > hidden:
        raise ConfigError(f"--lora-r: must be <= the model's hidden size ({hidden}), got {cfg.lora_r}")


def check_request(cfg: FinetuneConfig, eval_cfg: EvalConfig) -> tuple[str, models.Precision]:
    """What can be refused from the settings alone (no traces read, nothing written); returns the
    run's (device, precision), decided here once."""
    check_out(cfg)
    check_inputs({"--traces": cfg.traces, "--split": cfg.split, "--baseline-from": cfg.baseline_from})
    if cfg.use_dora and eval_cfg.eval_backend == "vllm" and not cfg.no_eval:  # said before "vLLM missing"
        raise ConfigError(
            "--use-dora with --eval-backend vllm: vLLM serves LoRA adapters only and refuses a DoRA one "
            "(its magnitude vector); evaluate with --eval-backend hf, or drop --use-dora"
        )
    check_eval_backend(eval_cfg)
    models.check_model_name(cfg.base_model)
    check_trackers(cfg.report_to)
    device = models.pick_device(cfg.device)
    precision = models.resolve_precision(cfg.precision, device)
    training_arguments(cfg, Path(cfg.out), None, "adamw_torch", 1, device)  # a bad trainer: field, now
    models.check_target_modules(cfg.base_model, cfg.target_modules)
    kl_anchor.check_processes(cfg.distill != "none", distributed.num_processes(), "--distill")  # before any eval
    check_init_adapter(cfg.init_adapter, cfg.lora_r, cfg.target_modules)
    return device, precision


def prepare(cfg: FinetuneConfig, eval_cfg: EvalConfig) -> Run:
    """Read and check every input, decide the settings, then build the Run (nothing is written
    here but the rehearsal texts, into the cache, after every check)."""
    device, precision = check_request(cfg, eval_cfg)
    traces_path, split_path = locate_traces(cfg.traces, cfg.split)
    all_rows, rows = read_traces(traces_path)
    refuse_leaks(rows, splits.read_split(split_path), traces_path, split_path)
    tokenizer = models.load_tokenizer(cfg.base_model, padding_side="right")
    examples, stats = build_dataset(tokenizer, rows, cfg.max_seq_len)
    if not examples:
        raise BadInput(f"no trace fits --max-seq-len {cfg.max_seq_len} (all {len(rows)} prompts are longer)")
    distill_info = None
    if cfg.distill == "chunk-likelihood":  # before the rehearsal examples: add_distill follows build_dataset's order
        examples, distill_info = add_distill(tokenizer, rows, examples, cfg.max_seq_len, traces_path)
        print(f"[finetune] --distill {cfg.distill}: {report_text(distill_info)}", flush=True)
    elif cfg.distill == "on-policy":  # the problems the student samples from; the tokenizer report
        examples = tag_problems(tokenizer, rows, examples, cfg.max_seq_len)
        distill_info = onpolicy_info(cfg, tokenizer, rows)
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
        precision_why=precision.why,
        cpu=cpu_info.cpu_line(),
        optim_used=models.resolve_optim(cfg.optim, device),
        teachers=teacher_info(all_rows),
        distill_info=distill_info,
        attention=models.attention_implementation(cfg.base_model),
        versions=versions(),
    )
    out = Path(cfg.out)
    settings.traces_sha256 = traces_sha256(rows)
    check_resume(cfg, out, settings)
    if cfg.baseline_from:  # compared now: refused before config.json is written, not after
        refuse_other_baseline(Path(cfg.baseline_from), read_baseline(Path(cfg.baseline_from))[0], settings)
    check_rank(cfg)
    examples, stats = add_rehearsal(cfg, tokenizer, examples, stats, device, precision)  # checks done: may write
    for name in ("n_train_examples", "n_train_tokens", "n_rehearsal_examples", "n_rehearsal_tokens", "rehearsal_file"):
        setattr(settings, name, stats.get(name))
    fit_memory(settings, examples)
    run = Run(settings=settings, out=out, tokenizer=tokenizer, examples=examples, precision=precision)
    if not cfg.no_eval:
        run.records = splits.load_holdout(split_path)  # evaluate_model draws its fixed subsets from it
        run.wikitext = loaders.load_wikitext(cfg.data_dir)
    return run


def fit_memory(settings: Settings, examples: list[dict]) -> None:
    """The one place the memory decisions are made: estimate the training peak (q2g.memory) for the
    loss path that will run (--distill on-policy: its sampled rows and an in-process teacher's
    weights); turn on gradient checkpointing when that makes it fit, else say what to change.
    Sets settings.loss_path, memory_plan, padding_share, gradient_checkpointing_used/_why."""
    from transformers import AutoConfig

    cfg = settings.asked
    lengths = [len(e["input_ids"]) for e in examples]
    rows, seq_len, n_params, onpolicy = cfg.batch_size, cfg.max_seq_len, None, ""
    model_config = AutoConfig.from_pretrained(models.resolve_model_path(cfg.base_model), trust_remote_code=False)
    text_config = model_config.get_text_config()
    settings.loss_path = planned_loss_path(settings.device, text_config)[
        "loss_path"
    ]  # q2g.finetune.loss decides; any count of processes
    if cfg.distill == "on-policy":
        rows, seq_len, teacher = memory_shape(cfg, examples)
        n_params = memory.count_params(model_config) + teacher
        onpolicy = f" (on-policy: {rows} sampled rows of <= {seq_len} tokens" + (
            f", the teacher's {teacher / 1e9:.2f}B parameters beside the student's)" if teacher else ")"
        )
    shape = memory.TrainShape(
        rows,
        seq_len,
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
    p = memory.plan(model_config, shape, free, cfg.grad_accum, n_params)  # the whole config: a vision tower counts
    if onpolicy:
        p.message += onpolicy + ("" if p.action == "fits" else ": fewer --distill-samples or --batch-size")
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
        f"[finetune] loss {settings.loss_path}, attention {settings.attention}, precision {settings.precision_used} "
        f"({settings.precision_why}; CPU {settings.cpu}); "
        f"memory: {p.message}; padding {settings.padding_share:.1%} of batch tokens",
        flush=True,
    )
    print(f"[finetune] gradient checkpointing: {settings.gradient_checkpointing_why}", flush=True)
    if p.action not in ("fits", "gradient_checkpointing"):
        print(f"[finetune] WARNING: the estimate says this will not fit: {p.message}", flush=True)


def traces_sha256(rows: list[dict]) -> str:
    """What a resume compares: the validated traces' content (not their count)."""

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
