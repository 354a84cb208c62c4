"""`python -m world_size_probe ARGS`: `q2g finetune ARGS`, then one line per process saying which
rank of how many it was and on which torch.distributed backend (tests/test_launchers.py reads it)."""

import sys

import torch.distributed as dist

from q2g import cli

if __name__ == "__main__":
    code = cli.call("finetune", sys.argv[1:])
    if dist.is_initialized():
        print(f"[probe] rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()})", flush=True)
    else:
        print("[probe] no process group", flush=True)
    sys.exit(code)
