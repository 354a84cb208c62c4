"""Sweeps of stage 2 with Optuna: which LoRA settings buy accuracy for the least forgetting.

    q2g sweep --config configs/sweep_demo_gemma3-270m.yaml
    q2g sweep --config my_run.yaml --out runs/sweep --n-trials 16 --storage sqlite:///runs/sweep.db
    q2g sweep --config my_run.yaml --out runs/sweep &  q2g sweep --config my_run.yaml --out runs/sweep

The file is a `q2g run` config plus a `sweep:` section (see SweepConfig): the search `space`
(finetune options as a list of values or `{low, high, log}`; `lora_alpha_ratio` sets alpha = ratio * r),
the `sampler` (grid | tpe | nsga2) and two `objectives` (pass@1 or heldout_loss, then ppl_change).
Stage 1 runs once; the base model is evaluated once (DIR/baseline.json) and every trial reuses that
row; each trial is one `finetune.run_finetune` into DIR/trial-NNN/. The study (default: an Optuna
journal file, DIR/study.journal) is the one record of what ran: rerunning the command goes on, a
trial whose process died is taken over and its finetune resumed in the same folder, and any number of
workers on this machine can share one study (asks are serialised by DIR/.sweep.lock).

Writes DIR/trials.jsonl (one row per finished trial), DIR/pareto.md and DIR/pareto.png (the front).
Per-epoch values are kept in each trial's row (`epochs`): Optuna's `trial.report` and pruning exist
for single-objective studies only.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from q2g.config import (
    Config,
    field_kind,
    field_problems,
    fields_of,
    load_yaml,
    normalise_keys,
    option,
    result_keys,
    value_problem,
)
from q2g.errors import BadInput, ConfigError, RunFailed
from q2g.finetune.config import FinetuneConfig

OBJECTIVES = {"pass@1": "maximize", "heldout_loss": "minimize", "ppl_change": "minimize"}
RATIO = "lora_alpha_ratio"  # searched in place of lora_alpha: alpha = ratio * r
NOT_SEARCHABLE = ("out", "traces", "split", "resume", "baseline_from", "no_eval")  # set by the sweep itself
MAX_DUPLICATES = 50  # proposals in a row that repeat a trial before the sampler is taken to be done
UNCLAIMED_S = 60  # a RUNNING trial no worker has claimed for this long was left by a dead process
ENUMERATE_AFTER = 3  # ... or, in a finite space, before its untried points are enumerated instead
EPOCH_KEYS = ("epoch", "lora_r", "pass@1", "heldout_loss", "ppl_change", "train_loss", "flagged")


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
    seed: int = option(0, results="training", help="sampler seed")
    storage: str | None = option(
        None, results=None, help="Optuna storage URL, or a journal file path (default: DIR/study.journal)"
    )
    study_name: str = option("q2g-sweep", results=None, help="study name inside the storage")

    def check(self) -> list[str]:
        o = self.objectives
        if len(o) != 2 or o[0] == "ppl_change" or o[1] != "ppl_change":
            return [f"objectives: {o} must be [pass@1, ppl_change] or [heldout_loss, ppl_change]"]
        return []


@dataclass
class Dimension:
    """One searched option: categorical `choices` (Optuna label -> value), or a numeric range."""

    kind: type
    choices: dict | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        cls = IntDistribution if self.kind is int else FloatDistribution
        return cls(self.low, self.high, log=self.log)

    def value(self, label):
        return self.choices[label] if self.choices is not None else label


@dataclass
class Sweep:
    """Everything a worker needs, read and checked before anything is written."""

    config: Path
    out: Path
    cfg: SweepConfig
    dims: dict
    finetune: object  # finetune.FinetuneConfig (the trials' base)
    eval_cfg: object  # evaluate.EvalConfig
    gen_argv: list
    target: int  # finished trials wanted in all
    size: int | None  # points in the space when it is all lists

    @property
    def lock(self) -> Path:
        return self.out / ".sweep.lock"


def load_optuna():
    try:
        import optuna
    except ImportError:
        raise RunFailed("q2g sweep needs Optuna: pip install 'q2g[sweep]' (or pip install 'optuna>=4')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---------------------------------------------------------------- the search space


def dimension(name: str, spec, fields: dict) -> Dimension:
    """The Dimension of `spec` for option `name`; ValueError says what is wrong with it."""
    if name == RATIO:
        hint, meta = float, {"choices": None, "min": None, "max": None, "gt": 0}
    elif name in NOT_SEARCHABLE:
        raise ValueError("is set by q2g sweep itself (one value for every trial)")
    elif name not in fields:
        close = difflib.get_close_matches(name, [*fields, RATIO], n=1)
        raise ValueError(
            "not a finetune option"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; evaluation settings are the same for every trial: set them in finetune:"
        )
    else:
        hint, meta = fields[name][1], fields[name][0].metadata
    kind, is_list, _ = field_kind(hint)
    if isinstance(spec, list):
        return categorical(spec, hint, meta, kind, is_list)
    if isinstance(spec, dict):
        return numeric_range(spec, hint, meta, kind, is_list)
    raise ValueError(f"give a list of values or {{low, high, log}}, got {spec!r}")


def categorical(spec: list, hint, meta, kind, is_list) -> Dimension:
    if not spec:
        raise ValueError("empty list: give at least one value")
    choices = {}
    for v in spec:
        v = [v] if is_list and isinstance(v, str) else v  # `all-linear` for a list option = [all-linear]
        if why := value_problem(v, hint, meta):
            raise ValueError(f"value {v!r}: {why}")
        label = ",".join(v) if is_list else v  # Optuna's choices are scalars
        if label in choices:
            raise ValueError(f"lists {v!r} twice")
        choices[label] = v
    return Dimension(kind, choices=choices)


def numeric_range(spec: dict, hint, meta, kind, is_list) -> Dimension:
    if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
        raise ValueError(f"a range is {{low, high}} or {{low, high, log}}, got keys {sorted(spec)}")
    if is_list or kind not in (int, float):
        raise ValueError(f"a range needs a number option, this one is {hint}: give a list of values")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for end, v in (("low", low), ("high", high)):
        if why := value_problem(v, hint, meta):
            raise ValueError(f"{end}: {why}")
    if not isinstance(log, bool):
        raise ValueError(f"log must be true or false, got {log!r}")
    if low > high:
        raise ValueError(f"low ({low}) > high ({high})")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0, got {low}")
    return Dimension(kind, low=low, high=high, log=log)


def parse_space(space: dict, where: str, sampler: str) -> dict[str, Dimension]:
    """Every searched option checked against FinetuneConfig; one ConfigError naming each bad key."""
    from q2g.finetune.config import FinetuneConfig

    if not space:
        raise ConfigError(f"{where}: sweep.space is empty: name at least one finetune option to search")
    fields, dims, problems = fields_of(FinetuneConfig), {}, []
    for key, spec in space.items():
        try:
            dims[str(key).replace("-", "_")] = dimension(str(key).replace("-", "_"), spec, fields)
        except ValueError as e:
            problems.append(f"{where}: sweep.space.{key}: {e}")
    if RATIO in dims and "lora_alpha" in dims:
        problems.append(f"{where}: sweep.space: search lora_alpha or {RATIO}, not both")
    ranges = [k for k, d in dims.items() if d.choices is None]
    if sampler == "grid" and ranges:
        problems.append(f"{where}: sweep.space.{ranges[0]}: the grid sampler needs a list of values, not a range")
    if problems:
        raise ConfigError("; ".join(problems))
    return dims


def trial_settings(dims: dict, params: dict, base) -> dict:
    """A trial's finetune settings from its Optuna params (labels -> values, ratio -> lora_alpha)."""
    values = {name: dims[name].value(label) for name, label in params.items()}
    if (ratio := values.pop(RATIO, None)) is not None:
        values["lora_alpha"] = ratio * values.get("lora_r", base.lora_r)
    return values


def check_points(dims: dict, base, where: str, limit: int = 4096) -> None:
    """Build the FinetuneConfig of every point (a range: its ends) so that a combination finetune
    refuses (a cross-field rule) stops the sweep before its first trial, not in the middle."""
    axes = {k: list(d.choices) if d.choices is not None else [d.low, d.high] for k, d in dims.items()}
    if math.prod(len(v) for v in axes.values()) > limit:
        return
    for point in itertools.product(*axes.values()):
        settings = trial_settings(dims, dict(zip(axes, point)), base)
        try:
            base.replace(**settings)
        except ConfigError as e:
            raise ConfigError(f"{where}: sweep.space: the point {settings} is refused by finetune: {e}") from None


# ---------------------------------------------------------------- reading the config


def load_sweep(config: Path, out: Path | None = None, **overrides) -> Sweep:
    """Read and check the whole file (stages and sweep) before anything runs or is written."""
    from q2g import generate, run
    from q2g.finetune import stage as finetune

    data = load_yaml(config)
    unknown = set(data) - {"out", *run.STAGES, "sweep"}
    if unknown:
        raise ConfigError(
            f"{config}: unknown top-level key(s) {sorted(unknown)}; expected out, generate, finetune, sweep"
        )
    if not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{config}: no `sweep:` section (a mapping with space:, sampler:, objectives:, n_trials:)")
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
    out = Path(out or data.get("out") or f"runs/{config.stem}")
    gen_argv = run.stage_argv("generate", config, out)
    generate.parse(gen_argv)
    ft, eval_cfg = finetune.parse(run.stage_argv("finetune", config, out))
    dims = parse_space(cfg.space, str(config), cfg.sampler)
    size = math.prod(len(d.choices) for d in dims.values()) if all(d.choices for d in dims.values()) else None
    if cfg.n_trials is None and size is None:
        raise ConfigError(f"{config}: sweep.n_trials is needed when the space has a range")
    target = min(n for n in (cfg.n_trials, size) if n is not None)
    check_points(dims, ft, str(config))
    return Sweep(config, out, cfg, dims, ft, eval_cfg, gen_argv, target, size)


def study_settings(sweep: Sweep) -> dict:
    """What makes two sweeps the same study (not n_trials or the seed: a rerun may extend either)."""
    ft = {k: v for k, v in sweep.finetune.to_dict().items() if k not in ("out", "traces")}
    ev = {k: v for k, v in sweep.eval_cfg.to_dict().items() if k != "eval_batch_size"}
    return json.loads(
        json.dumps(
            {
                "space": sweep.cfg.space,
                "sampler": sweep.cfg.sampler,
                "objectives": sweep.cfg.objectives,
                "finetune": ft,
                "eval": ev,
            },
            default=str,
        )
    )


def resolved(sweep: Sweep) -> dict:
    """DIR/sweep.json: the settings this sweep ran with (beside sweep_config.yaml, the file as given)."""
    return {
        **study_settings(sweep),
        "config": str(sweep.config),
        "n_trials": sweep.target,
        "seed": sweep.cfg.seed,
        "directions": {o: OBJECTIVES[o] for o in sweep.cfg.objectives},
        "study_name": sweep.cfg.study_name,
        "storage": sweep.cfg.storage or str(sweep.out / "study.journal"),
    }


# ---------------------------------------------------------------- the study and its workers


@contextmanager
def locked(path: Path):
    """An exclusive lock between the processes of this machine (released if the holder dies)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def storage_for(optuna, url: str | None, out: Path):
    """An Optuna storage URL as given; a path (or nothing: DIR/study.journal) becomes a journal file."""
    if url and "://" in url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(url) if url else out / "study.journal")))


def without_stop(sampler_class):
    """Optuna's GridSampler / BruteForceSampler, minus their stop when the space is done: that calls
    study.stop(), which raises outside study.optimize; the sweep asks and tells, and stops itself."""

    class Sampler(sampler_class):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Sampler


def make_sampler(optuna, sweep: Sweep, seed: int):
    cfg, n = sweep.cfg, sweep.target
    if cfg.sampler == "grid":  # the seed shuffles the grid: the same order in every process, or grid ids mix
        grid = {k: list(d.choices) for k, d in sweep.dims.items()}
        return without_stop(optuna.samplers.GridSampler)(grid, seed=cfg.seed)
    if cfg.sampler == "nsga2":  # a population of half the trials: at least two generations
        return optuna.samplers.NSGAIISampler(population_size=max(2, min(50, n // 2)), seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=max(1, min(10, n // 2)), seed=seed)


def open_study(optuna, sweep: Sweep):
    with locked(sweep.lock):
        study = optuna.create_study(
            storage=storage_for(optuna, sweep.cfg.storage, sweep.out),
            study_name=sweep.cfg.study_name,
            load_if_exists=True,
            directions=[OBJECTIVES[o] for o in sweep.cfg.objectives],
        )
        settings, saved = study_settings(sweep), study.user_attrs.get("settings")
        if saved is None:
            study.set_user_attr("settings", settings)
        elif saved != settings:
            diff = [k for k in settings if saved.get(k) != settings[k]]
            raise BadInput(
                f"study {sweep.cfg.study_name!r} in {sweep.cfg.storage or sweep.out / 'study.journal'} was "
                f"made with other sweep settings ({', '.join(diff)}); use another --out or --study-name"
            )
    # TPE/NSGA-II are seeded by how far the study is, so a rerun does not propose its first trials again.
    study.sampler = make_sampler(optuna, sweep, sweep.cfg.seed + len(study.trials))
    return study


def process_id(pid: int) -> str | None:
    """A live process's start time (tells a reused pid apart); None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def orphaned(trial) -> bool:
    """A RUNNING trial no live worker holds: its process died, or let go of it on Ctrl-C."""
    worker = trial.user_attrs.get("worker")
    if worker is None:  # killed between ask and claim (a worker elsewhere claims within milliseconds)
        return (datetime.datetime.now() - trial.datetime_start).total_seconds() > UNCLAIMED_S
    if worker.get("released"):
        return True
    if worker["host"] != socket.gethostname():
        return False  # another machine's; only its own worker can tell
    return process_id(worker["pid"]) != worker["start"]


def claim(trial) -> None:
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "start": process_id(os.getpid())})
    trial.set_user_attr("attempts", trial.user_attrs.get("attempts", 0) + 1)


RETRIED: set[int] = set()  # failed trials this process ran or asked for again (each is retried once per run)


def failed_to_retry(study, trials):
    """A trial that failed (an error, not a duplicate) whose settings have not run since, and that
    this process has not retried yet: a rerun gives each failed point one more try."""
    from optuna.trial import TrialState

    ran = [t.params for t in trials]
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return next(
        (t for t in failed if "error" in t.user_attrs and t.number not in RETRIED and t.params not in ran), None
    )


def next_trial(optuna, study, sweep: Sweep):
    """(Call under the lock.) An orphaned trial to take over, else a failed one to retry, else a
    new one; None when done."""
    from optuna.trial import Trial, TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    orphan = next((t for t in trials if t.state == TrialState.RUNNING and orphaned(t)), None)
    if orphan is not None:
        trial = Trial(study, orphan._trial_id)
        claim(trial)
        return trial
    if len(trials) >= sweep.target:
        return None
    dists = {k: d.distribution() for k, d in sweep.dims.items()}
    if (failed := failed_to_retry(study, trials)) is not None:
        RETRIED.add(failed.number)
        print(
            f"[sweep] retrying the settings of failed trial {failed.number} ({failed.user_attrs['error']})", flush=True
        )
        study.enqueue_trial(failed.params, user_attrs={"retry_of": failed.number}, skip_if_exists=False)
        trial = study.ask(dists)
        claim(trial)
        return trial
    if sweep.cfg.sampler == "grid" and study.sampler.is_exhausted(study):
        print("[sweep] every grid point has run", flush=True)
        return None
    for attempt in range(MAX_DUPLICATES):
        if attempt == ENUMERATE_AFTER and sweep.size and sweep.cfg.sampler != "grid":
            print(
                f"[sweep] {sweep.cfg.sampler} proposed {attempt} settings in a row that ran already: the rest of "
                "this finite space is enumerated (Optuna's BruteForceSampler)",
                flush=True,
            )
            with warnings.catch_warnings():  # "experimental" since Optuna 3.1
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = without_stop(optuna.samplers.BruteForceSampler)(seed=sweep.cfg.seed)
        trial = study.ask(dists)
        same = next((t.number for t in trials if t.params == trial.params), None)
        if same is None:
            claim(trial)
            return trial
        trial.set_user_attr("duplicate_of", same)  # not run: those settings ran or run already
        study.tell(trial, state=TrialState.FAIL)
    print(f"[sweep] the sampler proposed only settings already tried {MAX_DUPLICATES} times: stopping", flush=True)
    return None


def run_sweep(config: Path, out: Path | None = None, *, train=None, baseline=None, **overrides) -> dict:
    """Generate once, then run trials until the study has its n_trials; returns write_outputs(...).
    `train(cfg, eval_cfg)` (default finetune.run_finetune) and `baseline(cfg, eval_cfg, path)`
    (default evaluate_baseline) are replaceable for tests."""
    from q2g import generate
    from q2g.finetune import stage as finetune
    from q2g.io import atomic_write_json

    optuna = load_optuna()
    sweep = load_sweep(Path(config), out, **overrides)
    sweep.out.mkdir(parents=True, exist_ok=True)
    study = open_study(optuna, sweep)  # refuses a study of other settings before anything runs
    print(
        f"[sweep] {sweep.cfg.sampler} over {', '.join(sweep.dims)} -> {sweep.out} ({sweep.target} trials)", flush=True
    )
    with locked(sweep.lock):
        shutil.copy(sweep.config, sweep.out / "sweep_config.yaml")
        atomic_write_json(sweep.out / "sweep.json", resolved(sweep))
        generate.main(sweep.gen_argv)
    if not set(result_keys(FinetuneConfig, scopes=("baseline",))) & set(
        sweep.dims
    ):  # one baseline for all: score it before the first trial
        ensure_baseline(sweep, sweep.finetune, baseline or evaluate_baseline)
    while True:
        with locked(sweep.lock):
            trial = next_trial(optuna, study, sweep)
        if trial is None:
            break
        run_trial(study, sweep, trial, train or finetune.run_finetune, baseline or evaluate_baseline)
    with locked(sweep.lock):
        result = write_outputs(study, sweep)
    print(
        f"[sweep] {len(result['rows'])} trials finished; front: {sorted(result['front'])}; {sweep.out / 'pareto.md'}",
        flush=True,
    )
    return result


# ---------------------------------------------------------------- one trial


def baseline_path(sweep: Sweep, cfg) -> Path:
    """DIR/baseline.json for the sweep's student; a searched student setting gets its own file."""
    other = {
        k: getattr(cfg, k)
        for k in result_keys(FinetuneConfig, scopes=("baseline",))
        if getattr(cfg, k) != getattr(sweep.finetune, k)
    }
    if not other:
        return sweep.out / "baseline.json"
    return sweep.out / f"baseline-{hashlib.sha256(json.dumps(other).encode()).hexdigest()[:8]}.json"


def evaluate_baseline(cfg, eval_cfg, path: Path) -> dict:
    """Score the base model once and save its row at `path` (its generations in the folder beside)."""
    from q2g.finetune import baseline, prepare

    run = prepare.prepare(cfg.replace(out=str(path.with_suffix("")), resume=False, baseline_from=None), eval_cfg)
    return baseline.save_baseline(run, path)


def ensure_baseline(sweep: Sweep, cfg, baseline) -> Path:
    path = baseline_path(sweep, cfg)
    with locked(sweep.lock):  # one worker scores it, the others wait and reuse it
        if not path.exists():
            print(f"[sweep] baseline of {cfg.base_model} -> {path}", flush=True)
            baseline(cfg, sweep.eval_cfg, path)
    row = json.loads(path.read_text(encoding="utf-8"))["row"]
    if "heldout_loss" in sweep.cfg.objectives and "heldout_loss" not in row:
        raise ConfigError(
            f"{sweep.config}: sweep.objectives: the metrics rows have no heldout_loss (not measured by "
            "this q2g's evaluation yet); use objectives [pass@1, ppl_change]"
        )
    return path


def final_row(rows: list[dict], selection: dict) -> dict:
    """The metrics row of the adapter in final/, else (none qualified) the last trained epoch."""
    trained = [r for r in rows if r.get("epoch", 0) >= 1]
    if not trained:
        raise RunFailed("the trial wrote no trained epoch to metrics.jsonl")
    kept = [r for r in trained if selection.get("adapter") and r.get("adapter") == selection["adapter"]]
    return (kept or trained)[-1]


def trial_row(number: int, folder: Path, settings: dict, result: dict, objectives: list[str]) -> dict:
    """trials.jsonl's row from run_finetune's result; RunFailed if an objective was not measured."""
    rows = [r for r in result["rows"] if r.get("epoch", 0) >= 1]
    final = final_row(rows, result["selection"])
    for name in objectives:
        if final.get(name) is None:
            raise RunFailed(f"trial {number}: the final metrics row ({final.get('adapter')}) has no {name!r}")
    return {
        "trial": number,
        "dir": str(folder),
        "settings": settings,
        "values": {name: final[name] for name in objectives},
        "pass@1": final.get("pass@1"),
        "pass@1_by_source": final.get("pass@1_by_source"),
        "heldout_loss": final.get("heldout_loss"),
        "ppl_change": final.get("ppl_change"),
        "token_perplexity": final.get("token_perplexity"),
        "over_budget": bool(final.get("flagged")),
        "final_epoch": final["epoch"],
        "adapter": str(folder / "final") if result["selection"].get("adapter") else None,
        "train_s": sum(r.get("train_s") or 0.0 for r in rows),
        "wall_s": result.get("wall_s"),
        "epochs": [{k: r.get(k) for k in EPOCH_KEYS} for r in rows],
    }


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def progress(study, sweep: Sweep, trial, settings: dict) -> str:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    left = sweep.target - len(done)
    walls = [t.user_attrs["row"]["wall_s"] for t in done if (t.user_attrs.get("row") or {}).get("wall_s")]
    mean = sum(walls) / len(walls) if walls else None
    eta = (
        f"ETA ~{_duration(left * mean / max(1, running))} ({_duration(mean)} per trial, {running} running)"
        if mean
        else "ETA after the first trial"
    )
    shown = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in settings.items())
    return f"[sweep] trial {trial.number}: {shown} | {len(done)} of {sweep.target} finished, {left} left | {eta}"


def run_trial(study, sweep: Sweep, trial, train, baseline) -> None:
    """One finetune into DIR/trial-NNN (resumed there when taken over); tells the study its values."""
    from optuna.trial import TrialState

    settings = trial_settings(sweep.dims, trial.params, sweep.finetune)
    shown = {**{k: sweep.dims[k].value(v) for k, v in trial.params.items()}, **settings}  # + lora_alpha_ratio
    folder = sweep.out / f"trial-{trial.number:03d}"
    print(
        progress(study, sweep, trial, shown) + (" (resumed)" if trial.user_attrs["attempts"] > 1 else ""), flush=True
    )
    try:
        cfg = sweep.finetune.replace(**settings, out=str(folder), resume=trial.user_attrs["attempts"] > 1)
        cfg = cfg.replace(baseline_from=str(ensure_baseline(sweep, cfg, baseline)))
        row = trial_row(trial.number, folder, shown, train(cfg, sweep.eval_cfg), sweep.cfg.objectives)
    except KeyboardInterrupt:
        trial.set_user_attr("worker", {"released": True})  # the next run takes it over and resumes it
        raise
    except Exception as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        RETRIED.add(trial.number)  # the same settings would fail the same way now: the next run retries them
        if not isinstance(e, RunFailed):  # bad settings or a bug: every trial would fail the same way
            raise
        print(f"[sweep] trial {trial.number} failed: {e}", flush=True)
        return
    trial.set_user_attr("row", row)
    study.tell(trial, [row["values"][name] for name in sweep.cfg.objectives])
    with locked(sweep.lock):
        write_outputs(study, sweep)


# ---------------------------------------------------------------- outputs


def best_within_budget(rows: list[dict], objectives: list[str]) -> dict | None:
    """The best first objective among trials within the forgetting budget (ties: less forgetting)."""
    sign = -1 if OBJECTIVES[objectives[0]] == "maximize" else 1
    within = [r for r in rows if not r["over_budget"]]
    return min(within, key=lambda r: (sign * r["values"][objectives[0]], r["ppl_change"]), default=None)


def write_outputs(study, sweep: Sweep) -> dict:
    """trials.jsonl, pareto.md and pareto.png from the study (so every worker writes the same)."""
    from optuna.trial import TrialState

    from q2g.io import write_jsonl

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "row" in t.user_attrs]
    front = {t.number for t in study.best_trials}
    rows = [{**t.user_attrs["row"], "on_front": t.number in front} for t in sorted(done, key=lambda t: t.number)]
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]
    best = best_within_budget(rows, sweep.cfg.objectives)
    write_jsonl(sweep.out / "trials.jsonl", rows)
    if rows:
        plot_front(sweep.out / "pareto.png", rows, sweep.cfg.objectives[0], sweep.finetune.forgetting_budget)
    from q2g.io import atomic_write_text

    atomic_write_text(sweep.out / "pareto.md", "\n".join(pareto_lines(sweep, rows, best, failed)) + "\n")
    return {"rows": rows, "front": front, "best": best}


def _fmt(key: str, v) -> str:
    if v is None:
        return "n/a"
    if key == "pass@1":
        return f"{v:.1%}"
    if key == "ppl_change":
        return f"{v:+.2%}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return f"{v:.4f}" if key == "heldout_loss" else f"{v:g}" if isinstance(v, float) else str(v)


def _md(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table_lines(rows: list[dict]) -> list[str]:
    """One line per trial: its settings, final pass@1 (overall, per source), forgetting; front in bold."""
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    sources = sorted({s for r in rows for s in (r.get("pass@1_by_source") or {})})
    loss = any(r.get("heldout_loss") is not None for r in rows)
    head = [
        "trial",
        "front",
        *keys,
        "pass@1",
        *(f"pass@1 {s}" for s in sources),
        *(["heldout loss"] if loss else []),
        "ppl change",
        "over budget",
        "train s",
        "adapter",
    ]
    align = [
        "---:",
        ":---:",
        *("---" for _ in keys),
        *("---:" for _ in range(1 + len(sources) + loss)),
        "---:",
        ":---:",
        "---:",
        "---",
    ]
    lines = [_md(head), _md(align)]
    for r in rows:
        b = "**" if r["on_front"] else ""
        by_source = r.get("pass@1_by_source") or {}
        cells = [
            f"{b}{r['trial']}{b}",
            "yes" if r["on_front"] else "",
            *(_fmt(k, r["settings"].get(k)) for k in keys),
            _fmt("pass@1", r["pass@1"]),
            *(_fmt("pass@1", by_source.get(s)) for s in sources),
            *([_fmt("heldout_loss", r.get("heldout_loss"))] if loss else []),
            _fmt("ppl_change", r["ppl_change"]),
            "**yes**" if r["over_budget"] else "no",
            f"{r['train_s']:.{0 if r['train_s'] >= 10 else 1}f}",
            r["adapter"] or "none (base model)",
        ]
        lines.append(_md(cells))
    return lines


def best_lines(sweep: Sweep, best: dict | None) -> list[str]:
    """The best trial within the budget, and the commands that load its adapter."""
    budget, first = sweep.finetune.forgetting_budget, sweep.cfg.objectives[0]
    lines = [f"Forgetting budget: WikiText perplexity may rise by at most {budget * 100:g}%.", ""]
    if best is None:
        return lines + ["**No trial stayed within the forgetting budget.**"]
    shown = ", ".join(f"{k}={_fmt(k, v)}" for k, v in best["settings"].items())
    lines.append(
        f"Best within the budget: **trial {best['trial']}** ({first} {_fmt(first, best['values'][first])}, "
        f"perplexity {_fmt('ppl_change', best['ppl_change'])}; {shown})."
    )
    if best["adapter"]:
        model = best["settings"].get("base_model", sweep.finetune.base_model)
        data_dir = best["settings"].get("data_dir", sweep.finetune.data_dir)
        split = sweep.out / "dataset" / "split.json"
        lines += [
            "Load its adapter (or merge it):",
            "",
            "```",
            f"q2g evaluate --model {model} --adapter {best['adapter']} --split {split}"
            + (f" --data-dir {data_dir}" if data_dir else ""),
            f"q2g merge --adapter {best['adapter']} --out {sweep.out / 'merged'}",
            "```",
        ]
    return lines


def pareto_lines(sweep: Sweep, rows: list[dict], best: dict | None, failed: list) -> list[str]:
    first, second = sweep.cfg.objectives
    summary = (
        f"{len(rows)} of {sweep.target} trials finished ({sweep.cfg.sampler} sampler over "
        f"{', '.join(sweep.dims)}); objectives: {OBJECTIVES[first]} {first}, minimize {second} "
        "(WikiText perplexity change vs. the base model). Front rows are in bold."
    )
    lines = [f"# q2g sweep: {sweep.cfg.study_name}", "", summary, ""]
    lines += table_lines(rows) + [""] + best_lines(sweep, best)
    if failed:
        lines += ["", "Failed trials: " + "; ".join(f"{t.number} ({t.user_attrs['error']})" for t in failed)]
    return lines + ["", "![accuracy vs forgetting](pareto.png)"]


def plot_front(path: Path, rows: list[dict], metric: str, budget: float) -> None:
    """Every trial a point (metric vs perplexity change), the front joined, the budget line drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if metric == "pass@1" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for over, style in (
        (False, {"color": "tab:blue", "marker": "o", "label": "within budget"}),
        (True, {"color": "tab:red", "marker": "x", "label": "over budget"}),
    ):
        pts = [
            (r["ppl_change"] * 100, r["values"][metric] * scale, r["trial"]) for r in rows if r["over_budget"] == over
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], **style)
            for x, y, n in pts:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r["ppl_change"] * 100, r["values"][metric] * scale) for r in rows if r["on_front"])
    ax.plot(
        [p[0] for p in front],
        [p[1] for p in front],
        color="black",
        linewidth=1,
        marker="s",
        markersize=11,
        markerfacecolor="none",
        label="Pareto front",
    )
    ax.axvline(budget * 100, color="red", linestyle="--", label=f"budget (+{budget * 100:g}%)")
    ax.set(
        xlabel="WikiText perplexity change vs. base (%)",
        ylabel="pass@1 on the holdout (%)" if metric == "pass@1" else "held-out loss",
        title="q2g sweep: accuracy vs forgetting",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from q2g.run import resolve_config

    parser = argparse.ArgumentParser(
        prog="q2g sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a run YAML with a sweep: section (path or shipped name)")
    parser.add_argument("--out", help="sweep folder (default: the config's `out:`)")
    parser.add_argument("--n-trials", type=int, help="finished trials in all (overrides sweep.n_trials)")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal file (default: DIR/study.journal)",
    )
    parser.add_argument("--study-name", help="study name in the storage (default: q2g-sweep)")
    args = parser.parse_args(argv)
    run_sweep(
        resolve_config(args.config),
        args.out and Path(args.out),
        n_trials=args.n_trials,
        storage=args.storage,
        study_name=args.study_name,
    )
    return 0
