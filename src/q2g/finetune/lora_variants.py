"""peft's LoRA variants as finetune options: rsLoRA, DoRA and the adapter's initialisation.

    q2g finetune ... --use-rslora          # scale alpha / sqrt(r) instead of alpha / r
    q2g finetune ... --use-dora            # weight-decomposed LoRA: a trained magnitude per output
    q2g finetune ... --init-lora-weights pissa   # (default, gaussian, pissa, pissa_niter_<n>, olora, ...)

`option_errors` checks the three (and the other forgetting-control options) against the installed
peft when the config is built, before anything loads. `lora_kwargs` is what `LoraConfig` gets.

PiSSA and OLoRA rewrite the base weights (W -> W - B A at init, so the sum is unchanged). An
adapter saved as it is would then only be right on that residual base, so `keep_initial` saves the
adapter as initialised (in a temporary folder) and `save_kwargs` makes every epoch-N/ adapter a
plain LoRA of rank 2r on the ORIGINAL base (peft's path_initial_model_for_weight_conversion):
q2g's load, evaluation (vLLM too) and merge paths need no other change. Trainer checkpoints
(for --resume) keep the residual form, which a resumed run rebuilds with the same seed.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import typing
import weakref

from q2g.finetune.kl_anchor import check_init

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


def option_errors(cfg) -> list[str]:
    """Problems with the LoRA-variant and forgetting-control options of a FinetuneConfig."""
    problems = []
    supported = supported_inits()
    if not is_supported(cfg.init_lora_weights, supported):
        problems.append(
            f"--init-lora-weights {cfg.init_lora_weights!r} is not one q2g can train with the installed peft; "
            f"choose one of {', '.join(supported)}"
        )
    if cfg.use_dora and str(cfg.init_lora_weights).startswith(CONVERTED_INITS):
        problems.append(
            f"--use-dora with --init-lora-weights {cfg.init_lora_weights}: the saved adapter is converted to a LoRA "
            "on the original base, which DoRA's magnitude (a norm of the residual weight) does not survive"
        )
    kl = check_init(cfg.kl_to_base, cfg.init_lora_weights)
    if kl:
        problems.append(kl)
    if cfg.forgetting_check_steps and cfg.no_eval:
        problems.append("--forgetting-check-steps needs the WikiText evaluation (drop --no-eval)")
    return problems


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
