"""--init-adapter: start a run from a saved LoRA adapter (an SFT run's final/ or epoch-N/).

    peft_model = build_lora_model(base, cfg, lora_r, lora_alpha)
    load_init_adapter(peft_model, "runs/sft/final")

The adapter's weights replace the fresh ones; its rank and target modules must be this run's
(check_init_adapter, before anything is written; peft's loader then checks names and shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

from q2g.errors import BadInput

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
