"""Student decoding on vLLM (`--eval-backend vllm`): one engine per base model for the whole
process, with LoRA on, so each epoch's adapter comes per request and is never merged.

vLLM is imported only when chosen (q2g.backends.vllm.import_vllm). Tested against a stand-in
module (tests/test_evaluate_metrics.py), which checks the calls, not vLLM itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from q2g.backends.vllm import import_vllm
from q2g.decoding.rows import Generation, cut_at_stop

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
# The engine is built for adapters up to this rank at least: the base model (epoch 0) comes first,
# before any adapter says its rank, and a rebuild costs a model load.
VLLM_MIN_LORA_RANK = 64
_ENGINES: dict = {}  # one engine per (base model, dtype) for the whole process


def adapter_rank(adapter_dir) -> int:
    """The LoRA rank in a peft adapter folder's adapter_config.json."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def vllm_engine(base: str, *, dtype: str, lora_rank: int, gpu_memory_utilization: float, seed: int = 0) -> dict:
    """The process's vLLM engine for `base`, with LoRA on (adapters come per request, never
    merged). Built once and kept across epochs; rebuilt only for an adapter of a higher rank."""
    vllm = import_vllm("--eval-backend vllm")
    need = next((r for r in VLLM_LORA_RANKS if r >= max(lora_rank, VLLM_MIN_LORA_RANK)), lora_rank)
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
