"""pass@1 and the answer-format rate of an in-memory model on holdout problems.

Greedy decoding from `prompts.student_prompt_ids` (the format the student is trained on), stopped
at its end token or at the start of a new problem, graded by `answers.is_correct`.
`--eval-backend hf` decodes in-process (decoding.generate); `vllm` sends the same token ids to a
vLLM engine, the base model's weights plus the epoch's adapter as a LoRARequest (no merge).
answer_format_rate: the share of generations that state a final answer within the token cap:
an answer `answers.extract_answer_with_rule` finds by a rule that reads a stated answer, not by
a fallback (GSM8K's last number, math-verify's `mv_expr`/`mv_latex`), which any text holding a
number passes, so it would not show a format being learned.

Student decoding on vLLM (`--eval-backend vllm`): one engine per base model for the whole
process, with LoRA on, so each epoch's adapter comes per request and is never merged.

vLLM is imported only when chosen (q2g.backends.vllm.import_vllm). Tested against a stand-in
module (tests/test_evaluate_metrics.py), which checks the calls, not vLLM itself.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from q2g import decoding, prompts
from q2g.answers.check import is_correct
from q2g.answers.extract import extract_answer_with_rule
from q2g.backends.vllm import import_vllm
from q2g.data.sources import source_key
from q2g.decoding.rows import Generation, cut_at_stop
from q2g.evaluation.config import EvalConfig
from q2g.models import vllm_dtype
from q2g.scoring import autocast, eval_mode, guarded_attention, progress_bar


def _score(record: dict, gen) -> dict:
    extracted, rule = extract_answer_with_rule(gen.text, record["source"])
    return {
        "id": record["id"],
        "source": record["source"],
        "subject": record.get("subject"),
        "problem": record["problem"],
        "answer": record["answer"],
        "generation": gen.text,
        "extracted": extracted,
        "rule": rule,
        "correct": is_correct(gen.text, record["answer"], record["source"]),
        "n_tokens": gen.n_tokens,
        "stopped": gen.stopped,
    }


# The rules of answers.extract_answer_with_rule that find a *stated* final answer (`#### x`,
# `\boxed{x}`, "the answer is x", "Answer: x"). The fallbacks are left out: GSM8K's last number
# and math-verify's readings of a MATH text's end (`mv_expr`: its last number, `mv_latex`: its
# last formula) find an answer in any text holding a number; they do not show one was stated.
STATED_RULES = ("gsm8k_hash", "boxed", "boxed_multi", "final_answer_is", "answer_is", "A_colon")


def states_answer(row: dict) -> bool:
    """The generation states a final answer (extracted by a rule in STATED_RULES)."""
    return row["rule"] in STATED_RULES


def summarize(rows: list[dict]) -> dict:
    """pass@1 and answer_format_rate overall and per source key. `correct` None (gold
    unparseable) counts as wrong."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[source_key(row)].append(row)

    def stats(items):
        correct, stated = sum(r["correct"] is True for r in items), sum(states_answer(r) for r in items)
        return {
            "pass@1": correct / len(items) if items else 0.0,
            "n": len(items),
            "correct": correct,
            "answer_format_rate": stated / len(items) if items else 0.0,
            "n_answer_stated": stated,
        }

    out = stats(rows)
    out["by_source"] = {k: stats(groups[k]) for k in sorted(groups)}
    out["answer_extracted_rate"] = sum(r["extracted"] is not None for r in rows) / len(rows) if rows else 0.0
    out["n_stopped"] = sum(bool(r["stopped"]) for r in rows)
    out["mean_new_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows) if rows else 0.0
    return out


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def _saved_adapter(model, adapter_dir):
    """`adapter_dir`, else (a peft model) its adapter saved to a temporary folder, else None."""
    import tempfile

    if adapter_dir is not None or not hasattr(model, "peft_config"):
        yield adapter_dir
        return
    with tempfile.TemporaryDirectory(prefix="q2g-adapter-") as tmp:
        model.save_pretrained(tmp)
        yield tmp


# vLLM's dtype names for the run's compute precision (Precision.autocast; None: fp32).
def _vllm_generate(model, prompt_ids, cfg: EvalConfig, end_ids, adapter_dir, precision):
    base = _base_model(model)
    with _saved_adapter(model, adapter_dir) as folder:
        engine = vllm_engine(
            base.config.name_or_path,
            dtype=vllm_dtype(precision),
            lora_r=adapter_rank(folder) if folder else 0,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.eval_seed,
        )
        return generate_vllm(
            engine,
            prompt_ids,
            max_new_tokens=cfg.eval_max_new_tokens,
            end_ids=end_ids,
            stop_strings=prompts.STUDENT_STOP_STRINGS,
            adapter_dir=folder,
            seed=cfg.eval_seed,
        )


def math_pass_at_1(
    model, tokenizer, records: list[dict], cfg: EvalConfig, progress=True, precision=None, adapter_dir=None
) -> dict:
    """Greedy pass@1 of `model` on `records` -> summary + one generation row per problem.
    `adapter_dir`: the saved adapter of a peft `model`, for `--eval-backend vllm` (None: saved
    to a temporary folder when needed)."""
    prompt_ids = [prompts.student_prompt_ids(tokenizer, r["problem"]) for r in records]
    end_ids = prompts.end_token_ids(tokenizer)
    if cfg.eval_backend == "vllm":
        gens = _vllm_generate(model, prompt_ids, cfg, end_ids, adapter_dir, precision)
    else:
        with (
            eval_mode(model),
            guarded_attention(model),
            autocast(model, precision),
            progress_bar(progress, total=len(records), desc="pass@1", unit="problem") as bar,
        ):
            n_tokens = [0]

            def tick(n_done, n_new):
                n_tokens[0] += n_new
                bar.update(n_done)
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(tok_s=f"{n_tokens[0] / elapsed:.1f}")

            gens = decoding.generate(
                model,
                tokenizer,
                prompt_ids,
                max_new_tokens=cfg.eval_max_new_tokens,
                temperature=0.0,
                end_ids=end_ids,
                stop_strings=prompts.STUDENT_STOP_STRINGS,
                batch_size=cfg.eval_batch_size,
                seed=cfg.eval_seed,
                progress=tick,
            )
    rows = [_score(r, g) for r, g in zip(records, gens)]
    return {**summarize(rows), "backend": cfg.eval_backend, "generations": rows}


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
# The engine is built for adapters up to this rank at least: the base model (epoch 0) comes first,
# before any adapter says its rank, and a rebuild costs a model load.
VLLM_MIN_LORA_RANK = 64
_ENGINES: dict = {}  # one engine per (base model, dtype) for the whole process


def adapter_rank(adapter_dir) -> int:
    """The LoRA rank in a peft adapter folder's adapter_config.json."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def vllm_engine(base: str, *, dtype: str, lora_r: int, gpu_memory_utilization: float, seed: int = 0) -> dict:
    """The process's vLLM engine for `base`, with LoRA on (adapters come per request, never
    merged). Built once and kept across epochs; rebuilt only for an adapter of a higher rank."""
    vllm = import_vllm("--eval-backend vllm")
    need = next((r for r in VLLM_LORA_RANKS if r >= max(lora_r, VLLM_MIN_LORA_RANK)), lora_r)
    held = _ENGINES.get((base, dtype))
    if held is None or held["max_lora_rank"] < need:
        _ENGINES.pop((base, dtype), None)
        llm = vllm.LLM(
            model=base,
            tokenizer=base,
            dtype=dtype,
            seed=seed,
            enable_lora=True,
            max_lora_rank=need,
            max_loras=1,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=False,
        )
        held = _ENGINES[(base, dtype)] = {"llm": llm, "max_lora_rank": need, "next_lora_id": 1}
    return held


def generate_vllm(
    engine: dict,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    end_ids=(),
    stop_strings=(),
    adapter_dir=None,
    seed: int = 0,
) -> list[Generation]:
    """Greedy continuations from a `vllm_engine`, with the LoRA adapter saved in `adapter_dir`
    (None: the base model). Every call gets a new LoRA id: vLLM caches an adapter by its id, and
    the same folder may hold new weights next time."""
    vllm = import_vllm("--eval-backend vllm")
    from vllm.lora.request import LoRARequest

    params = vllm.SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        stop=list(stop_strings) or None,
        stop_token_ids=sorted(end_ids) or None,
        seed=seed,
    )
    lora = None
    if adapter_dir is not None:
        lora_id, engine["next_lora_id"] = engine["next_lora_id"], engine["next_lora_id"] + 1
        lora = LoRARequest(f"q2g-{lora_id}", lora_id, str(adapter_dir))
    outputs = engine["llm"].generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora
    )
    results = []
    for out in outputs:
        c = out.outputs[0]
        text, _ = cut_at_stop(c.text, stop_strings)  # vLLM leaves the stop string out already
        results.append(
            Generation(
                text=text, n_tokens=len(c.token_ids), stopped=c.finish_reason == "stop", token_ids=list(c.token_ids)
            )
        )
    return results
