"""The adapter itself: peft's LoRA variants as finetune options (rsLoRA, DoRA, the adapter's
initialisation), and a run started from a saved adapter.

    q2g finetune ... --use-rslora          # scale alpha / sqrt(r) instead of alpha / r
    q2g finetune ... --use-dora            # weight-decomposed LoRA: a trained magnitude per output
    q2g finetune ... --init-lora-weights pissa   # (default, gaussian, pissa, pissa_niter_<n>, olora, ...)

`finetune.config.option_errors` checks the three (and the other forgetting-control options) against the installed
peft when the config is built, before anything loads. `lora_kwargs` is what `LoraConfig` gets.

PiSSA and OLoRA rewrite the base weights (W -> W - B A at init, so the sum is unchanged). An
adapter saved as it is would then only be right on that residual base, so `keep_initial` saves the
adapter as initialised (in a temporary folder) and `save_kwargs` makes every epoch-N/ adapter a
plain LoRA of rank 2r on the ORIGINAL base (peft's path_initial_model_for_weight_conversion):
q2g's load, evaluation (vLLM too) and merge paths need no other change. Trainer checkpoints
(for --resume) keep the residual form, which a resumed run rebuilds with the same seed.

`--init-adapter DIR` starts a run from a saved LoRA adapter (an SFT run's final/ or epoch-N/): its
weights replace the fresh ones; its rank and target modules must be this run's (check_init_adapter,
before anything is written; peft's loader then checks names and shapes).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import typing
import weakref
from pathlib import Path

from q2g.errors import BadInput

DEFAULT_INIT = "default"  # peft's True: A Kaiming-uniform, B zero
# Inits q2g runs as they are (no extra data or config); the rest peft offers need a calibration
# pass (eva, corda, lora_ga) or a quantisation config (loftq).
SUPPORTED_INITS = (DEFAULT_INIT, "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal", "mica")
CONVERTED_INITS = ("pissa", "olora")  # saved as a plain rank-2r LoRA on the original base


def peft_inits() -> tuple[str, ...]:
    """The string values the installed peft's LoraConfig.init_lora_weights accepts."""
    from peft import LoraConfig

    kind = typing.get_type_hints(LoraConfig).get("init_lora_weights")
    values = [a for arg in typing.get_args(kind) for a in (typing.get_args(arg) or (arg,)) if isinstance(a, str)]
    return tuple(v.replace("[number of iters]", "<n>") for v in values)


@functools.cache  # FinetuneConfig.check runs for every sweep point
def supported_inits() -> tuple[str, ...]:
    offered = {DEFAULT_INIT, *peft_inits()}
    return tuple(i for i in SUPPORTED_INITS if i in offered)


def is_supported(init: str, supported: tuple[str, ...]) -> bool:
    if init in supported and "<n>" not in init:
        return True
    return "pissa_niter_<n>" in supported and re.fullmatch(r"pissa_niter_[1-9]\d*", init) is not None


def lora_kwargs(cfg) -> dict:
    """The LoraConfig fields of the variant options."""
    init = True if cfg.init_lora_weights == DEFAULT_INIT else cfg.init_lora_weights
    return {"use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "init_lora_weights": init}


def keep_initial(peft_model):
    """After get_peft_model: for PiSSA/OLoRA, save the adapter as initialised (for the conversion)."""
    init = peft_model.peft_config["default"].init_lora_weights
    if isinstance(init, str) and init.startswith(CONVERTED_INITS):
        folder = tempfile.mkdtemp(prefix="q2g-initial-adapter-")
        weakref.finalize(peft_model, shutil.rmtree, folder, ignore_errors=True)
        peft_model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA start
        peft_model.save_pretrained(folder)
        peft_model.peft_config["default"].init_lora_weights = init
        peft_model.q2g_initial_adapter = folder
    return peft_model


def save_adapter_files(model, folder) -> None:
    """model.save_pretrained(folder), a PiSSA/OLoRA adapter converted to a plain LoRA on the original
    base. peft's conversion loads the initial adapter beside the trained one and then warns that
    PiSSA/OLoRA "should not be used with other adapters": its own step, so that warning is hidden."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* changes the base weights of the model", category=UserWarning)
        model.save_pretrained(folder, **save_kwargs(model))


def save_kwargs(model) -> dict:
    """Extra save_pretrained arguments: convert a PiSSA/OLoRA adapter to a LoRA on the original base."""
    folder = getattr(model, "q2g_initial_adapter", None)
    return {"path_initial_model_for_weight_conversion": folder} if folder else {}


WEIGHTS = "adapter_model.safetensors"


def check_init_adapter(folder: str | None, lora_r: int, target_modules) -> None:
    """Refuse, before anything is written, an adapter folder this run cannot start from."""
    if not folder:
        return
    path = Path(folder)
    if not (path / WEIGHTS).is_file():
        raise BadInput(f"--init-adapter {folder}: no {WEIGHTS} there (an epoch-N/ or final/ folder of a run)")
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"--init-adapter {folder}: adapter_config.json unreadable ({type(e).__name__}: {e})") from None
    theirs = sorted(config.get("target_modules") or ())
    if config.get("r") != lora_r or theirs != sorted(target_modules):
        raise BadInput(
            f"--init-adapter {folder}: rank {config.get('r')} on {theirs}, but this run trains rank {lora_r} on "
            f"{sorted(target_modules)}: use the same --lora-r and --target-modules"
        )


def load_init_adapter(peft_model, folder: str) -> None:
    """Load `folder`'s adapter weights (checked by check_init_adapter) into the fresh adapter of `peft_model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(Path(folder) / WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise BadInput(f"--init-adapter {folder}: tensors this model has no place for: {unexpected[:3]}")
    print(f"[finetune] started from the adapter in {folder}", flush=True)
