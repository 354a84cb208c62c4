"""Before stage 2 writes anything: check every setting and input, and decide what the run will do.

    check_request(cfg, eval_cfg)        # cheap checks (also run by `q2g run` before generation) -> (device, precision)
    run = prepare(cfg, eval_cfg)        # -> config.Run; reads the traces; writes only rehearsal texts to the cache

`prepare` is the one place the decisions of config.Settings are made: device and precision
(decided once, in check_request, and passed on in Settings and Run), optimizer, the loss path, the attention implementation, the examples,
and (fit_memory) gradient checkpointing from q2g.memory's plan.

Self-rehearsal (`--rehearsal-fraction F`): the base model's own general text, mixed into training.

    q2g finetune ... --rehearsal-fraction 0.1 --rehearsal-max-tokens 128

Before training, the base model writes short continuations from `<bos>` alone (no WikiText
opening, so nothing of the perplexity text is trained on), by seeded sampling (temperature 1,
no top-k/top-p: its own distribution, not its mode). They are stored in q2g's cache ($Q2G_CACHE/
rehearsal/, never in the input dataset's folder) as `rehearsal-<key>.jsonl` + `rehearsal-<key>.json`
(the settings; the key is their hash), so a rerun or a sweep's trials with the same settings reuse
them instead of generating again. This is its own step, after every check has passed. A
fraction F of the training examples are these, trained with the plain LM loss (every token is
labelled), which keeps the student near its own distribution with no outside data.
F = 0 leaves the dataset exactly as it was.
"""

from __future__ import annotations

import gc
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
from q2g.finetune.distill.onpolicy_data import tag_problems
from q2g.finetune.lora import check_init_adapter
from q2g.finetune.loss import planned_loss_path
from q2g.finetune.train import training_arguments
from q2g.io import atomic_write_json, atomic_write_text, cache_dir, settings_diff
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
    fit_memory(settings, [len(e["input_ids"]) for e in examples])
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
    settings.loss_path = planned_loss_path(settings.device, text_config)[
        "loss_path"
    ]  # q2g.finetune.loss decides; any count of processes
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
    p = memory.plan(model_config, shape, free, cfg.grad_accum)  # the whole config: a vision tower counts
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


VERSION = 1  # bump when the way texts are written changes
BATCH = 16


def rehearsal_count(n_traces: int, fraction: float) -> int:
    """Rehearsal examples so that they are `fraction` of all examples (n / (n_traces + n))."""
    return round(fraction * n_traces / (1 - fraction)) if fraction > 0 else 0


def rehearsal_settings(base_model: str, n: int, max_new_tokens: int, seed: int) -> dict:
    return {
        "version": VERSION,
        "base_model": base_model,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompt": "<bos>",
        "sampling": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    }


def store_paths(folder: Path, settings: dict) -> tuple[Path, Path]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"rehearsal-{key}.jsonl", folder / f"rehearsal-{key}.json"


def generate_texts(model, tokenizer, settings: dict) -> list[dict]:
    """`n` sampled continuations of the start token: rows {"input_ids" (start token included), "text"}."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    end = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    device, rows = next(model.parameters()).device, []
    for i in range(0, settings["n"], BATCH):
        torch.manual_seed(settings["seed"] + i)  # each batch seeded: the texts do not depend on BATCH order
        ids = torch.full((min(BATCH, settings["n"] - i), 1), start, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=settings["max_new_tokens"],
                pad_token_id=tokenizer.pad_token_id,
                **settings["sampling"],
            )
        for seq in out[:, 1:].tolist():
            cut = next((j + 1 for j, t in enumerate(seq) if t in end), len(seq))  # keep the end token
            rows.append(
                {"input_ids": [start, *seq[:cut]], "text": tokenizer.decode(seq[:cut], skip_special_tokens=True)}
            )
    return rows


def load_or_generate(cfg, tokenizer, folder: Path, n: int, device: str, precision) -> tuple[list[dict], Path]:
    """The stored texts for these settings, or new ones written by the base model (then stored)."""
    from q2g.models import load_model

    settings = rehearsal_settings(cfg.base_model, n, cfg.rehearsal_max_tokens, cfg.seed)
    texts, meta = store_paths(folder, settings)
    if texts.exists() and meta.exists() and json.loads(meta.read_text(encoding="utf-8")) == settings:
        rows = [json.loads(line) for line in texts.read_text(encoding="utf-8").splitlines()]
        if len(rows) == n:
            print(f"[finetune] rehearsal: reusing {n} texts from {texts}", flush=True)
            return rows, texts
    print(
        f"[finetune] rehearsal: the base model writes {n} texts of <= {settings['max_new_tokens']} tokens", flush=True
    )
    model = load_model(cfg.base_model, precision.dtype, device)
    rows = generate_texts(model, tokenizer, settings)
    del model
    gc.collect()
    atomic_write_text(texts, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(meta, settings)  # written last: a text file without it is never reused
    return rows, texts


def rehearsal_examples(rows: list[dict], max_seq_len: int) -> list[dict]:
    """Plain LM examples: every token labelled (position t still predicts t+1, so the start token is not)."""
    return [{"input_ids": r["input_ids"][:max_seq_len], "labels": r["input_ids"][:max_seq_len]} for r in rows]


def add_rehearsal(cfg, tokenizer, examples: list, stats: dict, device: str, precision, folder: Path | None = None):
    """(examples + the rehearsal ones, stats with their counts); unchanged when the fraction is 0.
    The texts are kept in `folder` (default: $Q2G_CACHE/rehearsal), never beside the traces."""
    n = rehearsal_count(len(examples), cfg.rehearsal_fraction)
    if n == 0:
        return examples, stats
    folder = folder or cache_dir() / "rehearsal"
    rows, path = load_or_generate(cfg, tokenizer, folder, n, device, precision)
    extra = rehearsal_examples(rows, cfg.max_seq_len)
    n_tokens = sum(len(e["input_ids"]) for e in extra)
    return examples + extra, {
        **stats,
        "n_train_examples": stats["n_train_examples"] + len(extra),
        "n_train_tokens": stats["n_train_tokens"] + n_tokens,
        "n_rehearsal_examples": len(extra),
        "n_rehearsal_tokens": n_tokens,
        "rehearsal_file": str(path),
    }
