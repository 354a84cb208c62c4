"""The one in-memory evaluation: pass@1 on the fixed subset, the held-out loss, WikiText
perplexity, and the flat metrics row. `q2g evaluate` and finetune's per-epoch callback both call
`evaluate_model`; the parts live in pass_at_1.py, heldout_loss.py and perplexity.py, the fixed
subset and the multi-process pass@1 below.

The fixed evaluation subset: the same holdout problems every epoch, stratified by source/subject.

pass@1 split across the processes of a multi-process run (`accelerate launch`, torchrun).

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

import math
import random
import time
from collections import defaultdict

from q2g import distributed
from q2g.data.sources import source_key
from q2g.errors import RunFailed
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.heldout_loss import heldout_loss
from q2g.evaluation.pass_at_1 import math_pass_at_1, summarize
from q2g.evaluation.perplexity import perplexity


def evaluate_model(
    model,
    tokenizer,
    holdout,
    wikitext_text,
    cfg: EvalConfig,
    progress=True,
    precision=None,
    adapter_dir=None,
    decoded=None,
) -> dict:
    """{"math": pass@1 on the fixed eval subset, "heldout": the solution loss, "ppl": WikiText
    perplexity, "row": the flat metrics fields}; a None input skips its parts. The one in-memory
    evaluation: `q2g evaluate` and finetune's per-epoch callback both call it. `adapter_dir`:
    where a peft `model`'s adapter is saved (used by `--eval-backend vllm`; optional). `decoded`:
    (pass@1 result, seconds) already decoded across processes (q2g.evaluation.core), or None."""
    out = {"math": None, "heldout": None, "ppl": None}
    t0 = time.time()
    if decoded is not None:
        out["math"], t0 = decoded[0], t0 - decoded[1]
    elif holdout:
        subset = select_eval_subset(holdout, cfg.eval_limit, cfg.eval_seed)
        out["math"] = math_pass_at_1(model, tokenizer, subset, cfg, progress, precision, adapter_dir)
    t1 = time.time()
    if holdout and cfg.heldout_loss_limit != 0:
        limit = cfg.eval_limit if cfg.heldout_loss_limit is None else cfg.heldout_loss_limit
        records = select_eval_subset(holdout, limit, cfg.eval_seed)
        out["heldout"] = heldout_loss(model, tokenizer, records, cfg, progress, precision)
    check_finite(out)  # before the perplexity's minutes
    t2 = time.time()
    if wikitext_text:
        out["ppl"] = perplexity(model, tokenizer, wikitext_text, cfg, progress, precision)
    check_finite(out)
    out["row"] = metrics_row(out["math"], out["ppl"], t1 - t0, time.time() - t2, out["heldout"], t2 - t1)
    return out


def metrics_row(
    m: dict | None, p: dict | None, math_s: float, ppl_s: float, h: dict | None = None, heldout_s: float = 0.0
) -> dict:
    """The evaluation fields of a metrics.jsonl row (None where a part was skipped)."""
    row = {"pass@1": None, "answer_format_rate": None, "heldout_loss": None, "token_perplexity": None}
    if m:
        row.update(
            {
                "pass@1": m["pass@1"],
                "pass@1_by_source": {k: v["pass@1"] for k, v in m["by_source"].items()},
                "n_by_source": {k: v["n"] for k, v in m["by_source"].items()},
                "n_eval": m["n"],
                "correct": m["correct"],
                "answer_format_rate": m["answer_format_rate"],
                "answer_format_rate_by_source": {k: v["answer_format_rate"] for k, v in m["by_source"].items()},
                "answer_extracted_rate": m["answer_extracted_rate"],
                "mean_new_tokens": m["mean_new_tokens"],
                "eval_backend": m["backend"],
                "eval_problems_per_s": m["n"] / max(math_s, 1e-9),
                "eval_processes": m.get("n_processes", 1),  # processes that decoded (q2g.evaluation.core)
            }
        )
    if h:
        row.update(
            {"heldout_loss": h["heldout_loss"], "heldout_tokens": h["heldout_tokens"], "heldout_n": h["heldout_n"]}
        )
    if p:
        row.update(
            {
                "token_perplexity": p["token_perplexity"],
                "word_perplexity": p["word_perplexity"],
                "bits_per_byte": p["bits_per_byte"],
                "ppl_tokens_scored": p["n_tokens_scored"],
                "ppl_protocol": p.get("protocol"),
                "eval_ppl_tokens_per_s": p["n_tokens_scored"] / max(ppl_s, 1e-9),
            }
        )
    return {**row, "eval_s": math_s + heldout_s + ppl_s}


def check_finite(result: dict) -> None:
    """A NaN/inf held-out loss or perplexity stops the run (RunFailed, exit 1) as a non-finite
    training loss does: it is no measurement, and must never be compared with a budget."""
    bad = []
    if result["heldout"] and not math.isfinite(result["heldout"]["heldout_loss"]):
        bad.append(
            f"held-out loss {result['heldout']['heldout_loss']} over {result['heldout']['heldout_tokens']} tokens"
        )
    if result["ppl"] and not math.isfinite(result["ppl"]["token_perplexity"]):
        bad.append(
            f"WikiText perplexity {result['ppl']['token_perplexity']} over {result['ppl']['n_tokens_scored']} tokens"
        )
    if bad:
        raise RunFailed(
            f"evaluation gave a non-finite {' and '.join(bad)}: the model's logits are not finite (a diverged "
            f"training, fp16 overflow, or a broken checkpoint; try --precision bf16/fp32 or a lower --lr)"
        )


def _quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """`limit` split over strata in proportion to their sizes (largest remainder), at least one
    each when limit allows, never more than a stratum holds."""
    base = 1 if limit >= len(sizes) else 0
    rest = limit - base * len(sizes)
    spare = {k: n - base for k, n in sizes.items()}
    total = sum(spare.values())
    exact = {k: rest * n / total if total else 0.0 for k, n in spare.items()}
    quota = {k: base + int(x) for k, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - int(exact[k])), k))
    for k in by_remainder[: limit - sum(quota.values())]:
        quota[k] += 1
    return quota


def select_eval_subset(holdout: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A fixed subset of `limit` problems stratified by source/subject; the same for the same
    holdout, limit and seed (independent of input order); returned in holdout order."""
    if not limit or limit >= len(holdout):
        return list(holdout)
    strata: dict[str, list[str]] = defaultdict(list)
    for r in holdout:
        strata[source_key(r)].append(r["id"])
    keep = set()
    for name, n in _quotas({k: len(v) for k, v in strata.items()}, limit).items():
        ids = sorted(strata[name])
        random.Random(f"eval/{seed}/{name}").shuffle(ids)
        keep.update(ids[:n])
    return [r for r in holdout if r["id"] in keep]


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
