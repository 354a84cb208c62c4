"""Several processes (`accelerate launch`, torchrun): who writes, and how the others hear of it.

    accelerate launch --num_processes 8 -m q2g.cli finetune --config run.yaml

The Trainer trains on every process (DDP through accelerate). Everything else in stage 2 happens
once, on the main process: the baseline and per-epoch evaluations, metrics.jsonl, adapters,
final/ and the report. Its decisions (a metrics row, hence the forgetting policy's verdict) are
broadcast so every process stops or goes on together. With one process every call here is a
no-op, so nothing else in q2g needs to know.
"""

from __future__ import annotations


def _state():
    """accelerate's process state, read from the launcher's environment (one process for a plain run).
    On a machine without CUDA it must be told so, or a 2-process CPU launch looks like 1 (gloo)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    return _state().num_processes


def is_main() -> bool:
    return _state().is_main_process


def wait() -> None:
    """Every process waits here until all have arrived."""
    if num_processes() > 1:
        _state().wait_for_everyone()


def share(obj):
    """The main process's `obj`, on every process (pickled); itself with one process."""
    if num_processes() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj if is_main() else None], from_process=0)[0]
