"""--init-adapter: start a run from a saved LoRA adapter (an SFT run's final/ or epoch-N/).

    peft_model = build_lora_model(base, cfg, lora_r, lora_alpha)
    load_init_adapter(peft_model, "runs/sft/final")

The adapter's weights replace the fresh ones; its rank and target modules must be this run's
(peft's own loader checks the tensors' names and shapes; a mismatch is said as bad input).
"""

from __future__ import annotations

import json
from pathlib import Path

from q2g.errors import BadInput

WEIGHTS = "adapter_model.safetensors"


def load_init_adapter(peft_model, folder: str) -> None:
    """Load `folder`'s adapter weights into the (fresh) adapter of `peft_model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise BadInput(f"--init-adapter {folder}: no {WEIGHTS} there (an epoch-N/ or final/ folder of a run)")
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    ours = peft_model.peft_config["default"]
    if config.get("r") != ours.r or set(config.get("target_modules") or ()) != set(ours.target_modules or ()):
        raise BadInput(
            f"--init-adapter {folder}: rank {config.get('r')} on {sorted(config.get('target_modules') or ())}, "
            f"but this run trains rank {ours.r} on {sorted(ours.target_modules or ())}: use the same "
            "--lora-r and --target-modules"
        )
    result = set_peft_model_state_dict(peft_model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise BadInput(f"--init-adapter {folder}: tensors this model has no place for: {unexpected[:3]}")
    print(f"[finetune] started from the adapter in {folder}", flush=True)
