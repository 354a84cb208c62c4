"""The shipped forgetting-control sweeps parse, every grid point is a finetune config q2g accepts,
and together they cover the six methods of issue 18 (plain, rsLoRA, DoRA, PiSSA, rehearsal 0.1, KL 0.1)."""

import itertools
from pathlib import Path

from q2g.sweep import settings as sweep

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "q2g" / "configs"
NAMES = ("sweep_forgetting_gemma3-270m", "sweep_forgetting_init_gemma3-270m")


def points(name: str) -> list[dict]:
    s = sweep.load_sweep(CONFIGS / f"{name}.yaml")  # also builds every point's FinetuneConfig
    axes = {k: list(d.choices.values()) for k, d in s.dims.items()}
    assert s.size == len(list(itertools.product(*axes.values()))) == s.cfg.n_trials
    return [dict(zip(axes, p)) for p in itertools.product(*axes.values())]


def test_the_two_grids_cover_the_six_methods():
    every = [p for name in NAMES for p in points(name)]
    defaults = {"use_dora": False, "use_rslora": False, "kl_to_base": 0.0, "rehearsal_fraction": 0.0}
    defaults["init_lora_weights"] = "default"

    def has(**changed):
        want = {**defaults, **changed}
        return any(all(p.get(k, defaults[k]) == v for k, v in want.items()) for p in every)

    assert has() and has(use_rslora=True) and has(use_dora=True) and has(init_lora_weights="pissa")
    assert has(rehearsal_fraction=0.1) and has(kl_to_base=0.1)
