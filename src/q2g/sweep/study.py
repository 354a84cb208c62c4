"""The Optuna study of a sweep: opening it, its sampler, and choosing the next trial to run.

Every worker asks under DIR/.sweep.lock and claims what it asked before it lets go (workers.py), so
no trial is run twice on one machine and none is left RUNNING by a worker killed inside `ask`. The
grid is the sweep's own: its points (shuffled by the seed) are enqueued one at a time, the first
one not finished or running, so a point whose trial was lost is simply asked again.
"""

from __future__ import annotations

import itertools
import random
import warnings

from q2g.errors import BadInput, RunFailed
from q2g.sweep.settings import OBJECTIVES, Sweep, study_settings
from q2g.sweep.storage import describe, is_url, quiet
from q2g.sweep.workers import claim, orphaned, unclaimed

MAX_DUPLICATES = 50  # proposals in a row that repeat a trial before the sampler is taken to be done
ENUMERATE_AFTER = 3  # ... or, in a finite space, before its untried points are enumerated instead
RETRIED: set[int] = set()  # failed trials this process ran or asked for again (each is retried once per run)


def load_optuna():
    try:
        import optuna
    except ImportError:
        raise RunFailed("q2g sweep needs Optuna: pip install 'q2g[sweep]' (or pip install 'optuna>=4')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def hooked(sampler_class):
    """An Optuna sampler minus the stop of Grid/BruteForce samplers when the space is done (that
    calls study.stop(), which raises outside study.optimize: the sweep stops itself)."""

    class Sampler(sampler_class):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Sampler


def make_sampler(optuna, sweep: Sweep, seed: int):
    cfg, n = sweep.cfg, sweep.target
    if cfg.sampler == "grid":  # the points are enqueued (grid_points); the sampler never proposes
        return hooked(optuna.samplers.RandomSampler)(seed=seed)
    if cfg.sampler == "nsga2":  # a population of half the trials: at least two generations
        return hooked(optuna.samplers.NSGAIISampler)(population_size=max(2, min(50, n // 2)), seed=seed)
    return hooked(optuna.samplers.TPESampler)(n_startup_trials=max(1, min(10, n // 2)), seed=seed)


def grid_points(sweep: Sweep) -> list[dict]:
    """Every point of the grid as Optuna params, in the seed's order (the same in every process)."""
    axes = {k: list(d.choices) for k, d in sweep.dims.items()}
    points = [dict(zip(axes, p)) for p in itertools.product(*axes.values())]
    random.Random(sweep.cfg.seed).shuffle(points)
    return points


def refuse_changed_settings(sweep: Sweep) -> None:
    """A rerun of the same study (name and storage) into a folder whose sweep.json says it was made
    with other sweep settings is refused here, before any write (open_study finds the same, but
    only after the journal was opened and appended to)."""
    import json

    from q2g.io import read_input_bytes

    path = sweep.out / "sweep.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(read_input_bytes(path).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"{path}: not valid JSON (a damaged sweep folder? use another --out)") from None
    where = describe(sweep.cfg.storage, sweep.out)
    if not isinstance(saved, dict) or (saved.get("study_name"), saved.get("storage")) != (sweep.cfg.study_name, where):
        return
    settings = study_settings(sweep)
    diff = [k for k in settings if saved.get(k) != settings[k]]
    if diff:
        raise BadInput(
            f"study {sweep.cfg.study_name!r} in {where} was made with other sweep settings "
            f"({', '.join(diff)}); use another --out or --study-name"
        )


def open_study(optuna, sweep: Sweep, storage):
    """Create or load the study; one of other settings is refused (BadInput) before anything runs."""
    study = optuna.create_study(
        storage=storage,
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
            f"study {sweep.cfg.study_name!r} in {describe(sweep.cfg.storage, sweep.out)} was "
            f"made with other sweep settings ({', '.join(diff)}); use another --out or --study-name"
        )
    # TPE/NSGA-II are seeded by how far the study is, so a rerun does not propose its first trials again.
    study.sampler = make_sampler(optuna, sweep, sweep.cfg.seed + len(study.trials))
    return study


def failed_to_retry(study, trials):
    """A trial that failed (an error, not a duplicate) whose settings have not run since, and that
    this process has not retried yet: a rerun gives each failed point one more try."""
    from optuna.trial import TrialState

    ran = [t.params for t in trials]
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return next(
        (t for t in failed if "error" in t.user_attrs and t.number not in RETRIED and t.params not in ran), None
    )


def recover(optuna, study, sweep: Sweep) -> None:
    """(Under the lock.) Give up trials killed inside `ask` (FAIL, `abandoned`: never run, so not
    counted and asked again); with an RDB, let Optuna fail and re-queue trials whose heartbeat stopped."""
    from optuna.trial import TrialState

    if is_url(sweep.cfg.storage):
        with quiet(optuna):
            optuna.storages.fail_stale_trials(study)
    wait = sweep.cfg.grace_period if is_url(sweep.cfg.storage) else None  # other machines ask outside our lock
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if unclaimed(t, wait):
            study._storage.set_trial_user_attr(t._trial_id, "abandoned", "killed between ask and claim")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def ask(optuna, study, sweep: Sweep, dists: dict):
    """A new trial: the next grid point enqueued first (grid), else what the sampler proposes.
    A trial re-queued by an RDB's retry callback (WAITING) is asked first either way."""
    from optuna.trial import TrialState

    if sweep.cfg.sampler == "grid" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL))
        # a point that failed with an error waits for the next run (failed_to_retry); lost ones are asked again
        taken = [t.params for t in trials if t.state != TrialState.FAIL or "error" in t.user_attrs]
        point = next((p for p in grid_points(sweep) if p not in taken), None)
        if point is None:
            return None
        study.enqueue_trial(point, skip_if_exists=False)
    with quiet(optuna):
        return study.ask(dists)


def earlier_same(study, trial):
    """A finished or running trial before `trial` with its settings (read after the ask, so two
    machines asking the same point at once agree on which one runs it)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.RUNNING)
    return next(
        (
            t.number
            for t in study.get_trials(deepcopy=False, states=states)
            if t.number < trial.number and t.params == trial.params
        ),
        None,
    )


def take_over(optuna, study, trials):
    """A claimed trial whose worker on this machine died or let go (journal storage; an RDB's
    heartbeats do this for every machine), claimed again; else None."""
    from optuna.trial import Trial, TrialState

    orphan = next((t for t in trials if t.state == TrialState.RUNNING and orphaned(t)), None)
    if orphan is None:
        return None
    trial = Trial(study, orphan._trial_id)
    claim(trial)
    return trial


def next_trial(optuna, study, sweep: Sweep):
    """(Call under the lock.) An orphaned trial to take over, else a failed one to retry, else a
    new one; claimed before the lock is let go. None when done."""
    from optuna.trial import TrialState

    recover(optuna, study, sweep)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    if not is_url(sweep.cfg.storage) and (trial := take_over(optuna, study, trials)) is not None:
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
        with quiet(optuna):
            trial = study.ask(dists)
        claim(trial)
        return trial
    for attempt in range(MAX_DUPLICATES):
        if attempt == ENUMERATE_AFTER and sweep.size and sweep.cfg.sampler != "grid":
            print(
                f"[sweep] {sweep.cfg.sampler} proposed {attempt} settings in a row that ran already: the rest of "
                "this finite space is enumerated (Optuna's BruteForceSampler)",
                flush=True,
            )
            with warnings.catch_warnings():  # "experimental" since Optuna 3.1
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = hooked(optuna.samplers.BruteForceSampler)(seed=sweep.cfg.seed)
        trial = ask(optuna, study, sweep, dists)
        if trial is None:
            print("[sweep] every grid point has run", flush=True)
            return None
        same = earlier_same(study, trial)
        if same is None:
            claim(trial)
            return trial
        trial.set_user_attr("duplicate_of", same)  # not run: those settings ran or run already
        study.tell(trial, state=TrialState.FAIL)
    print(f"[sweep] the sampler proposed only settings already tried {MAX_DUPLICATES} times: stopping", flush=True)
    return None


def others_running(study, sweep: Sweep) -> bool:
    """With an RDB storage, a worker with nothing left to ask waits while other workers' trials run
    and the study is short of its n_trials: one of them may die, and its re-queued trial is then
    this worker's (recover). A journal's workers are all on this machine: they are taken over at once."""
    from optuna.trial import TrialState

    if not is_url(sweep.cfg.storage):
        return False
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len(done) < sweep.target and bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
