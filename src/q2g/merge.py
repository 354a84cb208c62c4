"""Merge a LoRA adapter into its base model and check the merge on a probe input (`q2g merge`).

    q2g merge --adapter checkpoints/final --out merged/ [--precision bf16|fp32] [--base-model NAME]

The base is the one named in the adapter's adapter_config.json unless --base-model is given. The
merged weights (W + alpha/r * B A) are saved as safetensors with the tokenizer. Then the saved
folder is loaded back and its logits on a probe prompt are compared with base + adapter before
merging: the largest absolute difference is printed, and the exit status is 1 when it exceeds
--atol (default: 1e-3 at fp32; at bf16 the merged weights are rounded once, hence a looser 0.5).
A quantized base is refused: merging into quantized weights would round the adapter away.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from q2g.adapter_check import adapter_base_model, check_adapter_fits, check_adapter_weights, read_adapter_config
from q2g.config import Config, load_config, option
from q2g.errors import BadInput, RunFailed
from q2g.io import atomic_write_json, writes_to
from q2g.models import (
    PRECISIONS,
    check_model_name,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_path,
    storage_dtype,
)
from q2g.out_guard import check_output, hold_lock, lock_beside
from q2g.prompts import student_prompt_ids

DEFAULT_ATOL = {"fp32": 1e-3, "bf16": 0.5}
PROBE_PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips did she sell?"
)


class MergeError(BadInput):
    """An adapter or base model that cannot be merged as asked."""


@dataclass
class MergeConfig(Config):
    adapter: str | None = option(None, results=None, help="adapter folder (e.g. checkpoints/final) (required)")
    out: str | None = option(None, results=None, help="folder for the merged model (required)")
    base_model: str | None = option(
        None, results=None, help="base model (default: base_model_name_or_path of adapter_config.json)"
    )
    precision: str = option(
        "fp32",
        choices=tuple(p for p in PRECISIONS if p in DEFAULT_ATOL),
        results=None,
        help="dtype of the merge and the saved weights",
    )
    atol: float | None = option(
        None, min=0, results=None, help="max |logit difference| allowed (default: 1e-3 fp32, 0.5 bf16)"
    )
    device: str = option("auto", results=None, help="auto, cpu, cuda")

    def check(self) -> list[str]:
        return [f"--{k} is required" for k in ("adapter", "out") if not getattr(self, k)]


def adapter_base(adapter: Path, base_model: str | None) -> str:
    """The base to merge into: --base-model, else the one adapter_config.json names (both checked)."""
    config = read_adapter_config(adapter)
    return base_model or adapter_base_model(adapter, config)


def check_out(out: Path, adapter: Path, base: str) -> None:
    """--out is replaced whole, so it must be new, empty, or a model folder (a previous merge), and
    (the output guard) never the adapter or the base model, nor a folder holding or inside either."""
    check_output(out, "--out", inputs={"--adapter": adapter, "base model": base})
    if (
        out.is_dir()
        and any(out.iterdir())
        and not ((out / "merge_check.json").exists() or (out / "config.json").exists())
    ):
        raise MergeError(
            f"--out {out} holds other files and no merge_check.json; refusing to replace it (choose another --out)"
        )


def refuse_quantized(base: str) -> None:
    """Read the base's config only: a quantized checkpoint says so before any weight is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(base), trust_remote_code=False)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise MergeError(
            f"base model {base} is quantized ({method}); merging would round the adapter into "
            f"quantized weights. Merge into an unquantized bf16/fp32 copy (--base-model)."
        )


def probe_logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def merge(adapter: Path, base: str, out: Path, dtype, device: str, tokenizer):
    """Merge and save to `out`; returns the base+adapter logits on the probe (taken before merging)."""
    import torch
    from peft import PeftModel

    with warnings.catch_warnings():  # peft reads a property transformers 5 renamed; harmless, and noisy
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(load_model(base, dtype, device), str(adapter))
    ids = torch.tensor([student_prompt_ids(tokenizer, PROBE_PROBLEM)])
    reference = probe_logits(model, ids)
    merged = model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return ids, reference


def main(argv=None) -> int:
    args = load_config(
        MergeConfig,
        argv,
        prog="q2g merge",
        section="merge",
        description="Merge a LoRA adapter into its base model, checked on a probe.",
    )
    adapter, out = Path(args.adapter), Path(args.out)
    base = adapter_base(adapter, args.base_model)
    check_out(out, adapter, base)
    check_model_name(base)
    check_adapter_weights(adapter)
    check_adapter_fits(adapter, base)
    device = pick_device(args.device)
    try:
        refuse_quantized(base)
    except OSError as e:
        raise MergeError(f"base model {base}: {e}") from None
    dtype = storage_dtype(args.precision)
    has_tokenizer = (adapter / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    print(f"[merge] {adapter} into {base} at {args.precision} on {device}", flush=True)
    folder, lock = lock_beside(out)  # beside: --out itself is replaced whole
    with hold_lock(folder, name=lock), writes_to(out, hint="free some space, then rerun the same command"):
        ids, reference = merge(adapter, base, out, dtype, device, tokenizer)
        merged = load_model(str(out), dtype, device)  # check what was written, not what is in memory
        diff = (probe_logits(merged, ids) - reference).abs().max().item()
        atol = args.atol if args.atol is not None else DEFAULT_ATOL[args.precision]
        ok = diff <= atol
        atomic_write_json(
            out / "merge_check.json",
            {
                "adapter": str(adapter),
                "base_model": base,
                "precision": args.precision,
                "probe_tokens": ids.shape[1],
                "max_abs_logit_diff": diff,
                "atol": atol,
                "ok": ok,
            },
        )
    print(
        f"[merge] probe ({ids.shape[1]} tokens): max |logit(merged) - logit(base + adapter)| = {diff:.3g} "
        f"(tolerance {atol:g}): {'OK' if ok else 'MISMATCH'}",
        flush=True,
    )
    print(f"[merge] wrote {out}", flush=True)
    if not ok:
        raise RunFailed(
            f"merged model's logits differ from base + adapter by {diff:.3g} > {atol:g}; "
            f"{out / 'merge_check.json'} has the numbers"
        )
    return 0
