"""pass@1 split across the processes of a multi-process run (`accelerate launch`, torchrun).

    math = sharded_pass_at_1(model, tokenizer, holdout, cfg, precision=p)   # on every process
    if distributed.is_main():
        evaluate_model(..., math=math)          # the held-out loss and perplexity, main only

Decoding is most of an evaluation and each process holds the whole model under DDP, so each
decodes every n-th problem of the fixed eval subset (process k: problems k, k+n, ...) with the
model's own forward (not through the DDP wrapper, so no collective runs), and the main process
gathers the rows through the launcher's store (q2g.distributed.gather: no process-group timeout
applies) and puts them back in subset order. Greedy decoding of a row does not depend on the
others in its batch (tests/test_decoding.py), so the rows are the ones a single process writes.

Returns None where nothing is split: one process, no holdout, or `--eval-backend vllm` (one
engine per process would each claim its share of the GPU); the main process then decodes all
problems itself, as before.
"""

from __future__ import annotations

import time

from q2g import distributed
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.pass_at_1 import math_pass_at_1, summarize
from q2g.evaluation.subset import select_eval_subset


def shards(items: list, n: int) -> list[list]:
    """`items` dealt to n processes: process k gets items k, k+n, k+2n, ..."""
    return [items[k::n] for k in range(n)]


def unshard(parts: list[list]) -> list:
    """The inverse of `shards`: the parts' items back in their original order."""
    n = len(parts)
    out: list = [None] * sum(len(p) for p in parts)
    for k, part in enumerate(parts):
        out[k::n] = part
    return out


def sharded_pass_at_1(model, tokenizer, holdout, cfg: EvalConfig, progress=True, precision=None):
    """(pass@1 result, seconds) on the main process, None on the others and where not split."""
    n = distributed.num_processes()
    if n == 1 or not holdout or cfg.eval_backend == "vllm":
        return None
    t0 = time.time()
    subset = select_eval_subset(holdout, cfg.eval_limit, cfg.eval_seed)
    mine = shards(subset, n)[distributed.rank()]
    show = progress and distributed.is_main()
    rows = math_pass_at_1(model, tokenizer, mine, cfg, show, precision)["generations"] if mine else []
    parts = distributed.gather(rows)
    if parts is None:
        return None
    merged = unshard(parts)
    return {
        **summarize(merged),
        "backend": cfg.eval_backend,
        "generations": merged,
        "n_processes": n,
    }, time.time() - t0
