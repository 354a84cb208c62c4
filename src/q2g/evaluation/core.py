"""The one in-memory evaluation: pass@1 on the fixed subset, the held-out loss, WikiText
perplexity, and the flat metrics row. `q2g evaluate` and finetune's per-epoch callback both call
`evaluate_model`; the parts live in pass_at_1.py, heldout_loss.py and perplexity.py.
"""

from __future__ import annotations

import math
import time

from q2g.errors import RunFailed
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.heldout_loss import heldout_loss
from q2g.evaluation.pass_at_1 import math_pass_at_1
from q2g.evaluation.perplexity import perplexity
from q2g.evaluation.subset import select_eval_subset


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
    (pass@1 result, seconds) already decoded across processes (q2g.evaluation.sharded), or None."""
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
                "eval_processes": m.get("n_processes", 1),  # processes that decoded (q2g.evaluation.sharded)
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
