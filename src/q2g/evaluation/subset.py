"""The fixed evaluation subset: the same holdout problems every epoch, stratified by source/subject."""

from __future__ import annotations

import random
from collections import defaultdict

from q2g.data.sources import source_key


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
