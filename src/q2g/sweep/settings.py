"""The `sweep:` section of a run config (SweepConfig) and the whole sweep, read and checked at once.

`load_sweep` reads the file, checks the generate and finetune sections as their stages would, the
search space against FinetuneConfig and every point of it, before anything runs or is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from q2g import run
from q2g.config import SEED_MAX, Config, field_problems, fields_of, load_yaml, normalise_keys, option
from q2g.errors import ConfigError
from q2g.finetune import stage as finetune
from q2g.generate import stage as generate
from q2g.out_guard import check_output
from q2g.sweep.space import check_points, parse_space, space_size

OBJECTIVES = {"pass@1": "maximize", "heldout_loss": "minimize", "ppl_change": "minimize"}


@dataclass
class SweepConfig(Config):
    """The `sweep:` section of a run config."""

    space: dict = option(
        results="training", help="finetune option -> list of values, or {low, high, log}; plus lora_alpha_ratio"
    )
    n_trials: int | None = option(
        None,
        min=1,
        results=None,
        help="finished trials in all, over reruns and workers (default: every point of an all-list space)",
    )
    sampler: str = option("tpe", choices=("grid", "tpe", "nsga2"), results="training", help="Optuna sampler")
    objectives: list[str] = option(
        ["pass@1", "ppl_change"],
        choices=tuple(OBJECTIVES),
        results="training",
        help="[pass@1 | heldout_loss, ppl_change]: the first's best, the second minimised",
    )
    seed: int = option(0, min=0, max=SEED_MAX, results="training", help="sampler seed")
    storage: str | None = option(
        None,
        results=None,
        help="Optuna storage: postgresql://, mysql://, sqlite:/// (an RDB with heartbeats: workers on several "
        "machines), or a journal file path (default: DIR/study.journal, workers on one machine)",
    )
    study_name: str = option("q2g-sweep", results=None, help="study name inside the storage")
    heartbeat_interval: int = option(
        60, min=1, results=None, help="RDB storage: seconds between a running trial's heartbeats"
    )
    grace_period: int = option(
        180,
        min=1,
        results=None,
        help="RDB storage: a trial with no heartbeat for this long is failed and re-queued once (its worker died)",
    )

    def check(self) -> list[str]:
        o = self.objectives
        if len(o) != 2 or o[0] == "ppl_change" or o[1] != "ppl_change":
            return [f"objectives: {o} must be [pass@1, ppl_change] or [heldout_loss, ppl_change]"]
        if self.grace_period <= self.heartbeat_interval:
            return [
                f"grace_period ({self.grace_period}) must be longer than heartbeat_interval ({self.heartbeat_interval})"
            ]
        return []


@dataclass
class Sweep:
    """Everything a worker needs, read and checked before anything is written."""

    config: Path
    out: Path
    cfg: SweepConfig
    dims: dict
    finetune: object  # finetune.FinetuneConfig (the trials' base)
    eval_cfg: object  # evaluate.EvalConfig
    generate: object  # generate.GenerateConfig
    gen_argv: list
    target: int  # finished trials wanted in all
    size: int | None  # points in the space when it is all lists

    @property
    def lock(self) -> Path:
        return self.out / ".sweep.lock"


def load_sweep(config: Path, out: str | Path | None = None, **overrides) -> Sweep:
    """Read and check the whole file (stages and sweep) before anything runs or is written."""
    data = load_yaml(config)
    unknown = set(data) - {"out", *run.STAGES, "sweep"}
    if unknown:
        raise ConfigError(
            f"{config}: unknown top-level key(s) {sorted(unknown)}; expected out, generate, finetune, sweep"
        )
    if not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{config}: no `sweep:` section (a mapping with space:, sampler:, objectives:, n_trials:)")
    if not isinstance(data.get("out", ""), str):
        raise ConfigError(f"{config}: out: must be a folder name, got {data['out']!r}")
    values = normalise_keys(data["sweep"], set(fields_of(SweepConfig)), config, "sweep.", "q2g sweep")
    labels = {k: f"{config}: sweep.{k}" for k in values}
    for k, v in overrides.items():
        if v is not None:
            values[k], labels[k] = v, "--" + k.replace("_", "-")
    if "space" not in values:
        raise ConfigError(f"{config}: sweep.space is missing: the finetune options to search")
    if problems := field_problems(SweepConfig, values, labels):
        raise ConfigError("; ".join(problems))
    cfg = SweepConfig(**values)
    out = run.run_out(config, data, out)
    gen_argv = run.stage_argv("generate", config, out)
    gen = generate.parse(gen_argv)
    ft, eval_cfg = finetune.parse(run.stage_argv("finetune", config, out))
    inputs = {
        "generate: data_dir": gen.data_dir,
        "finetune: data_dir": ft.data_dir,
        "finetune: base_model": ft.base_model,
    }
    check_output(out, "--out", inputs=inputs)
    dims = parse_space(cfg.space, str(config), cfg.sampler)
    size = space_size(dims)
    if cfg.n_trials is None and size is None:
        raise ConfigError(f"{config}: sweep.n_trials is needed when the space has a range")
    target = min(n for n in (cfg.n_trials, size) if n is not None)
    check_points(dims, ft, str(config))
    return Sweep(config, out, cfg, dims, ft, eval_cfg, gen, gen_argv, target, size)


def study_settings(sweep: Sweep) -> dict:
    """What makes two sweeps the same study (not n_trials or the seed: a rerun may extend either)."""
    ft = {k: v for k, v in sweep.finetune.to_dict().items() if k not in ("out", "traces")}
    ev = {k: v for k, v in sweep.eval_cfg.to_dict().items() if k != "eval_batch_size"}
    settings = {
        "space": sweep.cfg.space,
        "sampler": sweep.cfg.sampler,
        "objectives": sweep.cfg.objectives,
        "finetune": ft,
        "eval": ev,
    }
    return json.loads(json.dumps(settings, default=str))


def resolved(sweep: Sweep, storage: str) -> dict:
    """DIR/sweep.json: the settings this sweep ran with (beside sweep_config.yaml, the file as given)."""
    return {
        **study_settings(sweep),
        "config": str(sweep.config),
        "n_trials": sweep.target,
        "seed": sweep.cfg.seed,
        "directions": {o: OBJECTIVES[o] for o in sweep.cfg.objectives},
        "study_name": sweep.cfg.study_name,
        "storage": storage,
        "heartbeat_interval": sweep.cfg.heartbeat_interval,
        "grace_period": sweep.cfg.grace_period,
    }
