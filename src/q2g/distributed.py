"""Several processes (`accelerate launch`, torchrun): who writes, and how the others hear of it.

    accelerate launch --num_processes 8 -m q2g.cli finetune --config run.yaml

The Trainer trains on every process (DDP through accelerate). The per-epoch pass@1 decoding is
split across the processes (`gather` brings their rows to the main one; see
q2g.evaluation.core); everything else in stage 2 happens once, on the main process: the
baseline, the held-out loss and perplexity, metrics.jsonl, adapters, final/ and the report. Its decisions (a metrics row, hence the forgetting policy's verdict) are
shared so every process stops or goes on together. With one process every call here is a no-op,
so nothing else in q2g needs to know.

Two timeouts, on purpose:
- the process group's (`init(timeout_s)`, from `ddp_timeout`; q2g's default DEFAULT_TIMEOUT_S):
  every collective of the Trainer (DDP's gradient all-reduce, its barriers) is bounded by it. It
  is set here, before TrainingArguments exist, because the group is created once: the Trainer's
  own `ddp_timeout` would otherwise never apply and NCCL would use torch's 10-minute default.
- q2g's own waits (`share`, `wait`) are not collectives: they poll the launcher's key-value
  store (WAIT_S, a day), so the other processes can wait out a main-process evaluation of any
  length. If the main process dies, the launcher (torchrun / accelerate) ends the others.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from datetime import timedelta

from q2g.errors import ConfigError

DEFAULT_TIMEOUT_S = 3 * 3600  # ddp_timeout unless set: a 7B's gradient step never needs more
WAIT_S = 24 * 3600  # how long non-main processes wait for the main one (evaluation, generation)
SUPPORTED_MODES = "one process, DDP (accelerate / torchrun), or DeepSpeed ZeRO stage 1 or 2"
_counter = {"n": 0}
_timeout = {"s": None}


def launched() -> bool:
    """Started by a launcher with more than one process (WORLD_SIZE > 1)?"""
    return world_size() > 1


def world_size() -> int:
    """$WORLD_SIZE as set by a launcher (1 when unset); junk is bad input, not a traceback."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"$WORLD_SIZE must be a whole number >= 1 (set by torchrun / accelerate), got {text[:200]!r}"
        )
    return int(text)


def timeout_s(trainer: dict | None) -> int:
    """The process group's timeout: `ddp_timeout` of the trainer: fields, else q2g's default."""
    value = (trainer or {}).get("ddp_timeout", DEFAULT_TIMEOUT_S)
    try:
        seconds = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"trainer: ddp_timeout must be a number of seconds, got {value!r}") from None
    if seconds < 1:
        raise ConfigError(f"trainer: ddp_timeout must be >= 1 second, got {seconds}")
    return seconds


def init(seconds: int = DEFAULT_TIMEOUT_S) -> None:
    """Create the process group (under a launcher) with this timeout, before anything else does."""
    import torch
    from accelerate import PartialState

    if launched() and not torch.distributed.is_initialized():
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=seconds))
        _timeout["s"] = seconds
        if is_main():
            print(f"[q2g] {describe()}", flush=True)


def describe() -> str:
    """One line for the log: processes, backend, the group's timeout."""
    if num_processes() == 1:
        return "1 process"
    backend = _state().backend
    group = f"process-group timeout {_timeout['s']} s" if _timeout["s"] else "torch's default timeout"
    return f"{num_processes()} processes ({backend}), {group}, non-main processes wait up to {WAIT_S} s"


def _state():
    """accelerate's process state, read from the launcher's environment (one process for a plain run).
    On a machine without CUDA it must be told so, or a 2-process CPU launch looks like 1 (gloo)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return _state().is_main_process if launched() else True


def _store():
    from torch.distributed import distributed_c10d

    _state()
    return distributed_c10d._get_default_store()


def _key(name: str) -> str:
    _counter["n"] += 1  # every process calls share/wait in the same order, so the keys agree
    return f"q2g/{name}/{_counter['n']}"


def share(obj, wait_s: int = WAIT_S):
    """The main process's `obj`, on every process (pickled); itself with one process. The others
    poll the store for up to `wait_s` (no collective, so no process-group timeout applies)."""
    if num_processes() == 1:
        return obj
    store, key = _store(), _key("share")
    if is_main():
        store.set(key, pickle.dumps(obj))
        return obj
    store.wait([key], timedelta(seconds=wait_s))
    return pickle.loads(store.get(key))


def rank() -> int:
    return _state().process_index if launched() else 0


def gather(obj, wait_s: int = WAIT_S) -> list | None:
    """Every process's `obj`, in process order, on the main process (None on the others); [obj]
    with one process. Through the store, like `share`: the main process polls for up to `wait_s`."""
    if num_processes() == 1:
        return [obj]
    store, key = _store(), _key("gather")
    store.set(f"{key}/{rank()}", pickle.dumps(obj))
    if not is_main():
        return None
    keys = [f"{key}/{r}" for r in range(num_processes())]
    store.wait(keys, timedelta(seconds=wait_s))
    return [pickle.loads(store.get(k)) for k in keys]


def wait(wait_s: int = WAIT_S) -> None:
    """Every process waits here until all have arrived (a store counter, not a collective)."""
    if num_processes() == 1:
        return
    store, key = _store(), _key("wait")
    if store.add(key, 1) == num_processes():
        store.set(key + "/done", b"1")
    store.wait([key + "/done"], timedelta(seconds=wait_s))


def _zero_stage(config) -> int | None:
    """zero_optimization.stage of a DeepSpeed config (a dict, a JSON string or a file path)."""
    import json
    from pathlib import Path

    if isinstance(config, str):
        try:
            config = json.loads(Path(config).read_text() if Path(config).is_file() else config)
        except (OSError, ValueError):
            return None
    stage = (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return int(stage) if str(stage).isdigit() else None


def uses_deepspeed(trainer: dict | None, env=None) -> bool:
    """DeepSpeed asked for in trainer: (`deepspeed`) or by accelerate's config (its env)."""
    env, trainer = os.environ if env is None else env, trainer or {}
    return bool(trainer.get("deepspeed")) or env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1")


def check_parallel_mode(trainer: dict | None, env=None, skip_nonfinite: bool = False) -> None:
    """Refuse FSDP and ZeRO-3 before anything loads: evaluation runs the whole model on the main
    process, which sharded weights do not allow. ConfigError names where the mode was asked.
    DeepSpeed with --skip-nonfinite is refused too: accelerate's DeepSpeed wrapper runs the
    optimizer step inside `backward`, so q2g's guard sees a non-finite loss only after the step."""
    env, trainer = os.environ if env is None else env, trainer or {}
    if skip_nonfinite and uses_deepspeed(trainer, env):
        raise ConfigError(
            "--skip-nonfinite cannot skip under DeepSpeed (ZeRO 1/2): accelerate's DeepSpeed engine steps the "
            "optimizer inside backward, before q2g's guard sees the loss. Drop --skip-nonfinite (a non-finite "
            "loss then stops the run) or train without DeepSpeed (DDP)"
        )
    asked = []
    if trainer.get("fsdp") not in (None, "", False, [], "false", "False") or trainer.get("fsdp_config"):
        asked.append(f"trainer: fsdp={trainer.get('fsdp') or trainer.get('fsdp_config')!r}")
    if _zero_stage(trainer.get("deepspeed")) == 3:
        asked.append("trainer: deepspeed config with zero_optimization.stage 3")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"):
        asked.append("ACCELERATE_USE_FSDP (accelerate config: FSDP)")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1") and (
        env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        or _zero_stage(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")) == 3
    ):
        asked.append("ACCELERATE_DEEPSPEED_ZERO_STAGE 3 (accelerate config: DeepSpeed ZeRO-3)")
    if asked:
        raise ConfigError(
            f"{'; '.join(asked)}: sharded weights (FSDP, ZeRO-3) are not supported, because the "
            f"per-epoch evaluation runs the whole model on the main process. Supported: {SUPPORTED_MODES}"
        )


# What torchrun / accelerate set for their process group. A vLLM engine built in such a process
# takes them for its own (RANK=0 of WORLD_SIZE=N, the launcher's MASTER_PORT) and waits for peers
# that never come, or clashes on the port: it is built without them.
LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
)  # fmt: skip


@contextmanager
def without_launcher_env():
    """The launcher's variables (LAUNCHER_ENV) out of os.environ for the block, put back after
    (also on an exception): for starting a vLLM engine on one process of a launched run."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def on_main(fn, *args):
    """fn(*args) on the main process only (e.g. `q2g run`'s generation under a launcher); the
    others wait for it (store polls, up to WAIT_S) and get None."""
    result = fn(*args) if is_main() else None
    wait()
    return result
