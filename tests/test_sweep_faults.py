"""`q2g sweep` under failure: a trial that runs out of memory fails alone (the sweep goes on), and a
sweep killed at any moment (seeded kill points in generate, the baseline, `ask`, the claim, a
trial, the tell, between trials) resumes to every grid point finished exactly once.

The trials are test_sweep's fakes (metrics made up from the settings), so each sweep takes seconds;
the kills are placed by the test itself (test_sweep.install_kills wraps q2g's functions in the worker
process; q2g reads no test hook).
"""

import random
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
torch = pytest.importorskip("torch")

import test_sweep as t  # noqa: E402

from q2g import cli  # noqa: E402
from q2g.finetune import stage as finetune  # noqa: E402
from q2g.sweep import stage as sweep_cli  # noqa: E402
from q2g.sweep import study as sweep_study  # noqa: E402

GRID3 = "    lora_r: [4, 8, 16]\n"


def test_an_out_of_memory_trial_fails_alone_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """torch.OutOfMemoryError in one trial: that trial FAIL with the reason (study user attrs and
    pareto.md), memory freed, the other points finish; exit 1 says which failed; a rerun retries it."""
    config = t.write_config(tmp_path / "s.yaml", GRID3, student=t.fake_student(tmp_path))
    tries, freed = [], []

    def train(cfg, eval_cfg):
        tries.append(cfg.lora_r)
        if cfg.lora_r == 8 and tries.count(8) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return t.fake_train(cfg, eval_cfg)

    monkeypatch.setattr(finetune, "run_finetune", train)
    monkeypatch.setattr(sweep_cli, "evaluate_baseline", t.fake_baseline)
    monkeypatch.setattr("q2g.sweep.trials.free_accelerator_memory", lambda: freed.append(True))
    out = tmp_path / "out"
    assert cli.call("sweep", ["--config", str(config), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "trial failed" not in captured.err and "OutOfMemoryError: CUDA out of memory" in captured.err
    assert "going on with the next trial" in captured.out and freed == [True]
    study = t.study_of(out)
    states = {tr.params["lora_r"]: tr.state.name for tr in study.trials}
    assert states == {4: "COMPLETE", 8: "FAIL", 16: "COMPLETE"} and sorted(tries) == [4, 8, 16]
    failed = next(tr for tr in study.trials if tr.state.name == "FAIL")
    reason = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failed.user_attrs["error"] == reason
    assert study.user_attrs[f"error-trial-{failed.number:03d}"] == reason
    md = (out / "pareto.md").read_text()
    assert f"| {failed.number} |  | 8 | - | - | - | - | - | FAILED: {reason} |" in md
    assert "2 of 3 trials finished" in md and "1 trial(s) failed" in md
    assert len(t.rows_of(out)) == 2

    sweep_study.RETRIED.clear()  # a new process: the failed point is retried once
    assert cli.call("sweep", ["--config", str(config), "--out", str(out)]) == 0
    assert sorted(r["settings"]["lora_r"] for r in t.rows_of(out)) == [4, 8, 16] and tries.count(8) == 2


def test_ctrl_c_in_a_trial_stops_the_sweep(tmp_path, monkeypatch):
    config = t.write_config(tmp_path / "s.yaml", GRID3, student=t.fake_student(tmp_path))

    def interrupted(cfg, eval_cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "run_finetune", interrupted)
    monkeypatch.setattr(sweep_cli, "evaluate_baseline", t.fake_baseline)
    assert cli.call("sweep", ["--config", str(config), "--out", str(tmp_path / "out")]) == 130
    (trial,) = t.study_of(tmp_path / "out").trials  # the first trial only; released for the next run
    assert trial.state.name == "RUNNING" and trial.user_attrs["worker"] == {"released": True}


# ---------------------------------------------------------------- kill anywhere, resume

KILL_POINTS = ["generate", "baseline", "ask", "claim", "trial", "train", "tell", "between"]


def run_worker(config, out, kill: str | None) -> int:
    env = {t.KILL_AT: kill} if kill else {}
    worker = t.start_worker(config, out, **env)
    log = worker.communicate(timeout=120)[0]
    assert worker.returncode in (0, -9), log
    return worker.returncode


def check_grid_done(out: Path, points: list[int]) -> None:
    """Every point COMPLETE exactly once, nothing RUNNING or WAITING, no point trained from scratch twice."""
    study = t.study_of(out)
    states = [tr.state.name for tr in study.trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    done = sorted(tr.params["lora_r"] for tr in study.trials if tr.state.name == "COMPLETE")
    assert done == points
    rows = t.rows_of(out)
    assert sorted(r["settings"]["lora_r"] for r in rows) == points
    fresh = {}
    for folder in out.glob("trial-*"):
        if (folder / "attempts.txt").exists():
            for line in (folder / "attempts.txt").read_text().splitlines():
                fresh[folder.name] = fresh.get(folder.name, 0) + (line.endswith("resume=False"))
    assert all(n <= 1 for n in fresh.values()), fresh
    assert set(fresh) <= {Path(r["dir"]).name for r in rows}  # no folder of a point trained twice
    abandoned = [tr for tr in study.trials if tr.state.name == "FAIL"]
    assert all("abandoned" in tr.user_attrs or "duplicate_of" in tr.user_attrs for tr in abandoned)


def test_a_sweep_killed_anywhere_resumes_to_every_point_once(tmp_path):
    rng = random.Random(20)
    config = t.write_config(tmp_path / "s.yaml", GRID3)
    kills, sweeps, runs = 0, 0, 0
    while kills < 20:
        out = tmp_path / f"sweep-{sweeps}"
        while True:  # kill this sweep at random points until a run finishes it
            runs += 1
            assert runs < 80, f"{kills} kills in {runs} runs"
            point = rng.choice(KILL_POINTS)
            spec = f"{point}:{rng.randint(1, 3)}" if point not in ("generate", "baseline") else f"{point}:1"
            if run_worker(config, out, spec) == 0:
                break
            kills += 1
        assert run_worker(config, out, None) == 0  # nothing left to do
        check_grid_done(out, [4, 8, 16])
        sweeps += 1
    assert sweeps >= 3
