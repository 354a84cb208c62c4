"""Is this folder a LoRA adapter that fits that model? Answered from its files before any weight
loads, for `q2g evaluate --adapter` and `q2g merge` (bad input, exit 2, naming file and field):

- `read_adapter_config`: the folder and its adapter_config.json (JSON, an object, `r` a positive
  integer); `check_adapter_weights`: a weights file (adapter_model.safetensors or .bin);
- `adapter_base_model`: the base it names (`base_model_name_or_path`, a non-empty string);
- `check_adapter_fits`: every LoRA weight's shape against the layer it adapts in the base, built
  on the meta device from its config alone, so an adapter of another architecture (or size) is
  refused naming the first weight that does not fit, instead of peft's size-mismatch traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from q2g.demo_model import resolve_model_path
from q2g.errors import BadInput

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


def read_adapter_config(folder, flag: str = "--adapter") -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        found = folder.is_dir(), path.is_file()
    except OSError as e:  # a name longer than the file system allows
        raise BadInput(f"{flag} {folder}: {e.strerror or e}") from None
    if not found[0]:
        raise BadInput(f"{flag} {folder}: no such folder")
    if not found[1]:
        raise BadInput(
            f"{flag} {folder}: no {CONFIG_FILE} (not a LoRA adapter folder; "
            f"final/ has none when no epoch stayed within the forgetting budget)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(config).__name__}")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise BadInput(f"{path}: r must be a positive integer (the LoRA rank), got {r!r}")
    return config


def check_adapter_weights(folder) -> None:
    folder = Path(folder)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise BadInput(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)}); the adapter was not saved whole")


def adapter_base_model(folder, config: dict) -> str:
    """The base model the adapter names (for `q2g merge` without --base-model)."""
    path = Path(folder) / CONFIG_FILE
    name = config.get("base_model_name_or_path")
    if name is None or name == "":
        raise BadInput(f"{path}: base_model_name_or_path is missing; pass --base-model")
    if not isinstance(name, str):
        raise BadInput(
            f"{path}: base_model_name_or_path must be a model name (a string), got {name!r}; pass --base-model"
        )
    return name


def _lora_shapes(weights: Path) -> dict[str, list[int]]:
    """{key: shape} of the LoRA A/B matrices in a safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_A." in k or ".lora_B." in k}
    except Exception as e:  # a truncated or foreign file: safetensors says what is wrong
        raise BadInput(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _bin_lora_shapes(weights: Path) -> dict[str, list[int]]:
    """{key: shape} of the LoRA matrices in a PyTorch .bin adapter, unpickled with weights_only=True
    (tensors and plain containers only: a foreign or hostile pickle is refused, never run)."""
    import torch

    try:
        state = torch.load(str(weights), map_location="meta", weights_only=True)
    except Exception as e:  # not a torch file, a pickle of other objects, a truncated file
        raise BadInput(f"{weights}: not a readable PyTorch state dict ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadInput(f"{weights}: not a state dict of named tensors (an adapter of another tool?)")
    return {k: list(v.shape) for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def _meta_modules(base: str) -> dict | None:
    """{name: module} of `base` built on the meta device from its config; None when it cannot be built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(base), trust_remote_code=False)
        with torch.device("meta"):
            return dict(AutoModelForCausalLM.from_config(config).named_modules())
    except Exception:  # an early check only: whatever keeps the model from building, loading it says
        return None


def _find(modules: dict, name: str):
    if name in modules:
        return modules[name]
    return next((m for n, m in modules.items() if n.endswith("." + name) or name.endswith("." + n)), None)


def check_adapter_fits(folder, base: str) -> None:
    weights = Path(folder) / WEIGHT_FILES[0]
    if weights.is_file():
        shapes = _lora_shapes(weights)
    elif (Path(folder) / WEIGHT_FILES[1]).is_file():
        weights = Path(folder) / WEIGHT_FILES[1]
        shapes = _bin_lora_shapes(weights)
    else:
        return
    modules = _meta_modules(base) if shapes else None
    if modules is None:
        return
    for key, shape in sorted(shapes.items()):
        name, kind = key.removeprefix(PEFT_PREFIX).split(".lora_")[0], key.split(".lora_")[1][0]
        module = _find(modules, name)
        if module is None:
            raise BadInput(f"{weights}: {key} adapts {name}, which {base} does not have (an adapter of another model)")
        want = getattr(module, "in_features" if kind == "A" else "out_features", None)
        got = shape[1] if kind == "A" else shape[0]
        if want is not None and len(shape) == 2 and got != want:
            side = "inputs" if kind == "A" else "outputs"
            raise BadInput(
                f"{weights}: {key} has shape {shape}, but {name} of {base} has {want} {side} "
                f"(an adapter of another model or size; pass the base it was trained on)"
            )
