"""Peak training memory, estimated from the model config before anything is loaded, and what to do.

    from q2g.memory import TrainShape, estimate, free_for_training, free_memory, plan
    shape = TrainShape(batch_size=8, seq_len=1024, dtype_bytes=2, lora_r=16)
    estimate(config, shape)            # {'weights': ..., 'lora': ..., 'activations': ..., 'logits': ..., 'total': ...}
    p = plan(config, shape, free_memory("cuda"), grad_accum=4)
    print(p.message)                   # p.shape.gradient_checkpointing, p.shape.batch_size, p.grad_accum to run with
    free, note = free_for_training("cuda", config_dict)  # less the vLLM evaluation engine's share
    free_accelerator_memory()          # between a sweep's trials: gc + torch.cuda.empty_cache

The terms (bytes; b = batch, s = sequence, h = hidden, I = MLP width, V = vocabulary, L = layers):
    weights      n_params x bytes of the weights' dtype (2 for bf16, 4 for fp32)
    lora         LoRA params x 16: fp32 weight + fp32 grad + AdamW's two fp32 moments
                 (peft keeps adapters in fp32 under bf16 weights); 8-bit AdamW: x 10
    activations  saved for backward, per token and layer, in elements of the activation dtype:
                 4 I + 10 h + 3.5 q_dim + 3 kv_dim (measured with saved-tensor hooks on tiny
                 Gemma 3 / Qwen 2 with LoRA q,v and sdpa: 3.75 I + 10.5 h + 3.5 q + 2.8 kv for
                 Gemma, less for Qwen). Eager attention adds heads x s x (4 + dtype) for the
                 scores. Gradient checkpointing keeps only each layer's input (h) and recomputes
                 one layer at a time.
    logits       full: b s V x (dtype + 4 fp32 upcast + 4 log-softmax + 4 its gradient), the
                 plain `model(**batch).loss`; label-only chunked (q2g.finetune.loss): chunk V x (dtype + 4
                 + 4, + 4 with a softcap) + the label rows' hidden states and their gradient.
The decision keeps 10% of the free memory as headroom (allocator fragmentation, CUDA workspace).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
HEADROOM = 0.9  # use at most this share of the free memory


@dataclass(frozen=True)
class TrainShape:
    batch_size: int = 8
    seq_len: int = 1024
    dtype_bytes: int = 2  # weights and activations: 2 = bf16/fp16, 4 = fp32
    lora_r: int = 16
    target_modules: tuple = ("q_proj", "v_proj")
    gradient_checkpointing: bool = False
    label_only_loss: bool = True  # q2g.finetune.loss.LabelOnlyLossTrainer (False: the plain model loss)
    loss_chunk_size: int = 1024
    optim_8bit: bool = False
    attention: str = "sdpa"  # or "eager" (materialises the scores)


def dims(config) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return {
        "h": config.hidden_size,
        "I": config.intermediate_size,
        "L": config.num_hidden_layers,
        "V": config.vocab_size,
        "heads": heads,
        "q": heads * head_dim,
        "kv": kv * head_dim,
        "head_dim": head_dim,
    }


def count_params(config) -> int:
    """Parameters of a Llama-style decoder (Gemma 2/3, Qwen 2, Llama) from its config."""
    d = dims(config)
    h, kind = d["h"], getattr(config, "model_type", "")
    qkv_bias = kind == "qwen2" or bool(getattr(config, "attention_bias", False))
    attn = h * d["q"] + 2 * h * d["kv"] + d["q"] * h + (d["q"] + 2 * d["kv"] if qkv_bias else 0)
    norms = {"gemma3_text": 4 * h + 2 * d["head_dim"], "gemma3": 4 * h + 2 * d["head_dim"], "gemma2": 4 * h}.get(
        kind, 2 * h
    )
    embed = d["V"] * h * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return embed + d["L"] * (attn + 3 * h * d["I"] + norms) + h


def lora_params(config, r: int, targets=("q_proj", "v_proj")) -> int:
    """LoRA parameters for `targets` ('all-linear': every projection of a decoder layer; a name
    this table does not know is counted as the largest projection, an overestimate on purpose)."""
    d = dims(config)
    shape = {
        "q_proj": (d["h"], d["q"]),
        "k_proj": (d["h"], d["kv"]),
        "v_proj": (d["h"], d["kv"]),
        "o_proj": (d["q"], d["h"]),
        "gate_proj": (d["h"], d["I"]),
        "up_proj": (d["h"], d["I"]),
        "down_proj": (d["I"], d["h"]),
    }
    targets = list(shape) if list(targets) == ["all-linear"] else list(targets)
    largest = max(shape.values(), key=sum)
    return d["L"] * sum(r * sum(shape.get(t, largest)) for t in targets)


def activation_bytes(config, s: TrainShape) -> int:
    d = dims(config)
    per_token_layer = (4 * d["I"] + 10 * d["h"] + 3.5 * d["q"] + 3 * d["kv"]) * s.dtype_bytes
    if s.attention == "eager":
        per_token_layer += d["heads"] * s.seq_len * (4 + s.dtype_bytes)
    tokens = s.batch_size * s.seq_len
    if not s.gradient_checkpointing:
        return int(tokens * d["L"] * per_token_layer)
    return int(tokens * (d["L"] * d["h"] * s.dtype_bytes + per_token_layer))


def logits_bytes(config, s: TrainShape) -> int:
    d = dims(config)
    tokens = s.batch_size * s.seq_len
    if not s.label_only_loss:
        upcast = 4 if s.dtype_bytes < 4 else 0
        return int(tokens * d["V"] * (s.dtype_bytes + upcast + 4 + 4))
    softcap = 4 if getattr(config, "final_logit_softcapping", None) else 0
    rows = min(s.loss_chunk_size, tokens)
    return int(rows * d["V"] * (s.dtype_bytes + 4 + 4 + softcap) + 2 * tokens * d["h"] * s.dtype_bytes)


def estimate(config, s: TrainShape, n_params: int | None = None) -> dict:
    """Bytes per term and their total (see the module docstring)."""
    n = n_params if n_params is not None else count_params(config)
    parts = {
        "weights": n * s.dtype_bytes,
        "lora": lora_params(config, s.lora_r, s.target_modules) * (10 if s.optim_8bit else 16),
        "activations": activation_bytes(config, s),
        "logits": logits_bytes(config, s),
    }
    return {**parts, "total": sum(parts.values())}


@dataclass
class Plan:
    action: str  # "fits", "gradient_checkpointing", "smaller_batch", "does_not_fit"
    shape: TrainShape  # the settings to run with
    grad_accum: int
    need_bytes: int
    free_bytes: int
    message: str


def plan(config, s: TrainShape, free_bytes: int, grad_accum: int = 1, n_params: int | None = None) -> Plan:
    """Fits as asked; else turn on gradient checkpointing; else halve the batch (doubling the
    accumulation, so the optimizer sees the same examples per step) until it fits."""
    budget = free_bytes * HEADROOM
    need = estimate(config, s, n_params)["total"]

    def done(action, shape, accum, msg):
        return Plan(action, shape, accum, estimate(config, shape, n_params)["total"], free_bytes, msg)

    if need <= budget:
        return done("fits", s, grad_accum, f"fits: {need / GB:.1f} GB of {free_bytes / GB:.1f} GB free")
    ckpt = replace(s, gradient_checkpointing=True)
    if not s.gradient_checkpointing and estimate(config, ckpt, n_params)["total"] <= budget:
        return done(
            "gradient_checkpointing",
            ckpt,
            grad_accum,
            f"{need / GB:.1f} GB needed, {free_bytes / GB:.1f} GB free: turn on --gradient-checkpointing",
        )
    shape, accum = ckpt, grad_accum
    while shape.batch_size > 1:
        shape, accum = replace(shape, batch_size=shape.batch_size // 2), accum * 2
        if estimate(config, shape, n_params)["total"] <= budget:
            return done(
                "smaller_batch",
                shape,
                accum,
                f"{need / GB:.1f} GB needed, {free_bytes / GB:.1f} GB free: use --gradient-checkpointing "
                f"--batch-size {shape.batch_size} --grad-accum {accum}",
            )
    hint = "" if s.label_only_loss else "use the label-only loss (q2g.finetune.loss), "
    return done(
        "does_not_fit",
        shape,
        accum,
        f"does not fit even at batch 1 with checkpointing ({estimate(config, shape, n_params)['total'] / GB:.1f} GB, "
        f"{free_bytes / GB:.1f} GB free): {hint}shorten --max-seq-len, or use a bigger GPU",
    )


def free_memory(device: str = "cpu") -> int:
    """Free bytes on the device. CUDA: what the driver has free (mem_get_info) plus what torch's
    caching allocator holds but does not use (reserved - allocated: after a baseline evaluation
    or an earlier trial that is most of it, and torch hands it out again without the driver).
    Elsewhere: the host's available memory."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(torch.cuda.mem_get_info(index)[0]) + max(0, int(cached))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


def total_memory(device: str) -> int:
    """The device's total bytes (CUDA), 0 elsewhere."""
    if not device.startswith("cuda"):
        return 0
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return int(torch.cuda.mem_get_info(index)[1])


def free_for_training(device: str, settings: dict) -> tuple[int, str]:
    """(bytes the training may plan with, what was set aside). With --eval-backend vllm on CUDA,
    the evaluation engine takes vllm_gpu_memory_utilization x the card at the baseline, after the
    plan measured: that share is reserved now. `settings`: the stage's resolved config dict."""
    free = free_memory(device)
    if settings.get("eval_backend") != "vllm" or settings.get("no_eval") or not device.startswith("cuda"):
        return free, ""
    share = float(settings.get("vllm_gpu_memory_utilization") or 0.0)
    reserved = int(share * total_memory(device))
    return max(0, free - reserved), f"{reserved / GB:.1f} GB kept for the vLLM evaluation engine ({share:.0%})"


def free_accelerator_memory() -> None:
    """Give cached memory back between runs in one process (a sweep's trials): drop Python's
    garbage (models held by reference cycles), then torch's unused cached CUDA blocks."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
