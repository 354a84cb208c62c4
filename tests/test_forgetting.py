"""The forgetting budget's pure rules: relative change, over budget, next rank, final choice."""

import pytest

from q2g.forgetting import choose_final, next_rank, over_budget, relative_change, scaled_alpha, verdict


def test_relative_change():
    assert relative_change(20.0, 21.0) == pytest.approx(0.05)
    assert relative_change(20.0, 19.0) == pytest.approx(-0.05)
    assert relative_change(8.0, 8.0) == 0.0
    with pytest.raises(ValueError):
        relative_change(0.0, 1.0)


def test_over_budget_is_strictly_greater_and_ignores_falls():
    assert over_budget(0.0501, 0.05)
    assert not over_budget(0.05, 0.05)  # exactly the budget is allowed
    assert not over_budget(-0.5, 0.0)  # a fall in perplexity is never forgetting
    assert over_budget(1e-9, 0.0)  # a 0 % budget flags any rise
    assert not over_budget(None, 0.0)  # not measured
    with pytest.raises(ValueError):
        over_budget(0.1, -0.01)


def test_next_rank_halves_until_min_rank():
    assert next_rank(16, 4) == 8
    assert next_rank(8, 4) == 4
    assert next_rank(4, 4) is None
    assert next_rank(5, 2) == 2
    assert next_rank(1, 1) is None
    assert scaled_alpha(32, 16, 8) == 16  # alpha / r stays 2


def rows(*flags):
    return [{"epoch": 0, "flagged": False}] + [
        {"epoch": i + 1, "adapter": f"epoch-{i + 1}", "flagged": f} for i, f in enumerate(flags)
    ]


def test_choose_final():
    assert choose_final(rows(False, True), "flag")["adapter"] == "epoch-2"
    assert choose_final(rows(False, True), "stop")["adapter"] == "epoch-1"
    assert choose_final(rows(True), "stop") is None  # the base model (epoch 0) is never "an adapter"
    # reduce-rank: a later run within budget wins; if none is, the last within budget anywhere
    retrain = rows(False, True) + [{"epoch": 1, "adapter": "rank-8/epoch-1", "flagged": False}]
    assert choose_final(retrain, "reduce-rank")["adapter"] == "rank-8/epoch-1"
    assert (
        choose_final(rows(False, True) + [{"epoch": 1, "adapter": "rank-8/epoch-1", "flagged": True}], "reduce-rank")[
            "adapter"
        ]
        == "epoch-1"
    )
    with pytest.raises(ValueError):
        choose_final(rows(False), "ignore")


def test_verdict_text():
    assert verdict(0.062, 0.05) == "OVER BUDGET: WikiText perplexity +6.2% > 5% allowed"
    assert verdict(-0.01, 0.05) == "within budget: WikiText perplexity -1.0% (<= 5% allowed)"
    assert verdict(0.001, 0.0) == "OVER BUDGET: WikiText perplexity +0.1% > 0% allowed"
    assert verdict(None, 0.05).startswith("not measured")
