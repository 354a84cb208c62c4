"""`q2g sweep`: the Pareto front via Optuna, a search space refused before training, resume after
SIGKILL, two workers sharing one study, and one real sweep of the tiny random Gemma3.

Most tests replace the trial (`train=`) and the baseline (`baseline=`) with fakes that return
metrics made up from the settings, so the study machinery is tested in seconds; the fakes live
here so a worker subprocess can import them (`sys.path` + `import test_sweep`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from refusal import snapshot

optuna = pytest.importorskip("optuna")

from q2g import cli  # noqa: E402
from q2g.errors import ConfigError  # noqa: E402
from q2g.sweep import pareto, storage, workers  # noqa: E402
from q2g.sweep import settings as sweep_settings  # noqa: E402
from q2g.sweep import space as sweep_space  # noqa: E402
from q2g.sweep import stage as sweep  # noqa: E402
from q2g.sweep import study as sweep_study  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def write_config(path: Path, space: str, sampler="grid", extra_sweep="", student="fake-student") -> Path:
    path.write_text(f"""# q2g sweep --config {path.name}
out: unused
generate:
  backend: reference
  teacher: reference
  data_dir: packaged
  limit: 4
finetune:
  base_model: {student}
  data_dir: packaged
  epochs: 1
  batch_size: 4
  grad_accum: 1
  max_seq_len: 128
  eval_limit: 2
  eval_max_new_tokens: 4
  ppl_max_tokens: 64
  ppl_max_length: 64
  ppl_stride: 32
sweep:
  sampler: {sampler}
{extra_sweep}  space:
{space}""")
    return path


GRID = "    lora_r: [4, 8, 16]\n    target_modules: [[q_proj, v_proj], all-linear]\n"


# ---------------------------------------------------------------- fakes (also used by the worker subprocesses)


def fake_metrics(cfg) -> tuple[float, float]:
    """pass@1 and perplexity change from the settings: a bigger adapter learns more and forgets more."""
    size = cfg.lora_r * (4 if cfg.target_modules == ["all-linear"] else 1)
    return size / 200, size / 1000


def fake_train(cfg, eval_cfg):
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.txt", "a") as f:
        f.write(f"{os.getpid()} resume={cfg.resume}\n")
    kill_at("train")  # a kill inside the trial (install_kills)
    if os.environ.get("FAKE_SLEEP"):  # a trial that takes a while (a worker is killed inside it)
        (folder / "started").touch()
        time.sleep(float(os.environ["FAKE_SLEEP"]))
    if os.environ.get("FAKE_BARRIER"):  # every worker holds a trial at once before any finishes
        barrier = Path(os.environ["FAKE_BARRIER"])
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)
    if os.environ.get("FAKE_HANG_ON") == folder.name and not cfg.resume:
        (folder / "started").touch()
        time.sleep(600)  # killed here
    pass1, change = fake_metrics(cfg)
    row = {
        "epoch": 1,
        "lora_r": cfg.lora_r,
        "adapter": "epoch-1",
        "pass@1": pass1,
        "pass@1_by_source": {"gsm8k": pass1},
        "ppl_change": change,
        "token_perplexity": 10 * (1 + change),
        "flagged": change > cfg.forgetting_budget,
        "train_s": 0.01,
        "train_loss": 1.0,
    }
    (folder / "final").mkdir(exist_ok=True)
    return {
        "out": folder,
        "rows": [{"epoch": 0, "pass@1": 0.0}, row],
        "selection": {"adapter": "epoch-1"},
        "report": None,
        "wall_s": 0.01,
    }


def fake_baseline(cfg, eval_cfg, path):
    row = {"epoch": 0, "pass@1": 0.0, "ppl_change": 0.0, "token_perplexity": 10.0}
    path.write_text(json.dumps({"settings": {}, "row": row}))
    return row


# ---------------------------------------------------------------- kills placed by the test (q2g reads no hook)

KILL_AT = "TEST_SWEEP_KILL_AT"  # "point:n": the worker SIGKILLs itself the n-th time it reaches point
_reached: dict[str, int] = {}


def kill_at(point: str) -> None:
    name, _, n = os.environ.get(KILL_AT, "").partition(":")
    if name == point:
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def killing(f, point: str, after: bool = False):
    """f, with the kill point `point` before (or after) each call."""

    def wrapped(*a, **k):
        if not after:
            kill_at(point)
        out = f(*a, **k)
        if after:
            kill_at(point)
        return out

    return wrapped


def install_kills() -> None:
    """Wrap q2g's sweep in this worker process at the kill points: generate (before stage 1), ask
    (inside Optuna's ask), claim (before a trial is claimed), tell (before Optuna's tell), between
    (after a trial); `baseline`, `trial` and `train` are placed around the fakes the worker passes."""
    if not os.environ.get(KILL_AT):
        return
    from q2g.generate import stage as generate
    from q2g.sweep import stage as sweep
    from q2g.sweep import study

    generate.main = killing(generate.main, "generate")
    study.claim = killing(study.claim, "claim")
    optuna.study.Study.tell = killing(optuna.study.Study.tell, "tell")
    sweep.run_trial = killing(sweep.run_trial, "between", after=True)
    hooked = study.hooked

    def killing_sampler(sampler_class):
        class Sampler(hooked(sampler_class)):
            def before_trial(self, s, trial) -> None:
                super().before_trial(s, trial)
                kill_at("ask")

        return Sampler

    study.hooked = killing_sampler


WORKER = (
    "import sys; sys.path.insert(0, {tests!r}); import test_sweep as t; from q2g.sweep import stage as sweep; "
    "t.install_kills(); sweep.run_sweep({config!r}, {out!r}, train=t.killing(t.fake_train, 'trial'), "
    "baseline=t.killing(t.fake_baseline, 'baseline'))"
)


def start_worker(config, out, **env) -> subprocess.Popen:
    code = WORKER.format(tests=str(TESTS), config=str(config), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def study_of(out: Path, name="q2g-sweep"):
    return optuna.load_study(study_name=name, storage=storage.open_storage(optuna, None, out, 60, 180))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def settings_of(rows) -> list[str]:
    return sorted(json.dumps(r["settings"], sort_keys=True) for r in rows)


# ---------------------------------------------------------------- the front


def test_front_excludes_dominated_and_keeps_ties(tmp_path):
    s = sweep_settings.load_sweep(write_config(tmp_path / "s.yaml", GRID), tmp_path / "out")
    s.out.mkdir()
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    points = [(0.5, 0.01), (0.5, 0.01), (0.4, 0.02), (0.6, 0.08), (0.3, 0.001), (0.3, 0.05)]
    for i, (acc, change) in enumerate(points):
        row = {
            "trial": i,
            "settings": {"lora_r": 4},
            "values": {"pass@1": acc, "ppl_change": change},
            "pass@1": acc,
            "ppl_change": change,
            "over_budget": change > 0.05,
            "train_s": 1.0,
            "adapter": f"trial-{i:03d}/final",
        }
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, change], params={"lora_r": 4}, distributions=dist, user_attrs={"row": row}
            )
        )
    result = pareto.write_outputs(study, s)
    # 2 is dominated by 0/1, 5 by 4; 0 and 1 tie (both kept); 3 is on the front though over budget
    assert result["front"] == {0, 1, 3, 4}
    assert [r["on_front"] for r in rows_of(s.out)] == [True, True, False, True, True, False]
    assert result["best"]["trial"] == 0  # best pass@1 within the 5% budget (3 has more, but +8%)
    md = (s.out / "pareto.md").read_text()
    assert "| **0** | yes | 4 | 50.0% |" in md and "| 2 |  | 4 | 40.0% |" in md
    assert "Best within the budget: **trial 0**" in md and "--adapter trial-000/final" in md
    assert (s.out / "pareto.png").stat().st_size > 10_000


def test_best_within_budget_minimises_a_loss_objective():
    rows = [
        {"trial": 0, "values": {"heldout_loss": 1.2}, "ppl_change": 0.01, "over_budget": False},
        {"trial": 1, "values": {"heldout_loss": 1.0}, "ppl_change": 0.09, "over_budget": True},
        {"trial": 2, "values": {"heldout_loss": 1.1}, "ppl_change": 0.04, "over_budget": False},
    ]
    assert pareto.best_within_budget(rows, ["heldout_loss", "ppl_change"])["trial"] == 2
    assert pareto.best_within_budget(rows[1:2], ["heldout_loss", "ppl_change"]) is None


# ---------------------------------------------------------------- refused before anything runs


@pytest.mark.parametrize(
    "space, message",
    [
        ("    lora_rank: [4, 8]\n", "sweep.space.lora_rank: not a finetune option (did you mean 'lora_r'?)"),
        ("    lora_r: []\n", "sweep.space.lora_r: empty list: give at least one value"),
        ("    lr: {low: 1.0e-3, high: 1.0e-4}\n", "sweep.space.lr: low (0.001) > high (0.0001)"),
        ("    lr: {low: 0, high: 1.0e-3, log: true}\n", "sweep.space.lr: low: must be > 0, got 0"),
        ("    lora_r: [4, 2.5]\n", "sweep.space.lora_r: value 2.5: must be an int, got 2.5"),
        ("    optim: [adamw, sgd]\n", "sweep.space.optim: value 'sgd': 'sgd' is not one of adamw_8bit, adamw"),
        ("    eval_limit: [2, 4]\n", "sweep.space.eval_limit: not a finetune option"),
        ("    out: [a, b]\n", "sweep.space.out: is set by q2g sweep itself"),
        ("    lora_alpha: [8]\n    lora_alpha_ratio: [1, 2]\n", "search lora_alpha or lora_alpha_ratio, not both"),
        ("    lr: {low: 1.0e-4, high: 1.0e-3}\n", "sweep.space.lr: the grid sampler needs a list of values"),
        ("    target_modules: {low: 1, high: 2}\n", "sweep.space.target_modules: a range needs a number option"),
    ],
)
def test_bad_space_is_refused_before_anything_runs(tmp_path, capsys, space, message):
    config = write_config(tmp_path / "bad.yaml", space)
    out = tmp_path / "out"
    assert cli.call("sweep", ["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and f"{config}: " in err
    assert not out.exists()


def test_bad_sweep_section_and_override(tmp_path, capsys):
    config = write_config(tmp_path / "s.yaml", GRID, extra_sweep="  objectives: [ppl_change, pass@1]\n")
    with pytest.raises(ConfigError, match=r"objectives: \['ppl_change', 'pass@1'\] must be"):
        sweep_settings.load_sweep(config)
    config = write_config(tmp_path / "s.yaml", GRID, extra_sweep="  n_trial: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'sweep.n_trial' for q2g sweep \\(did you mean 'n_trials'"):
        sweep_settings.load_sweep(config)
    config = write_config(tmp_path / "s.yaml", GRID)
    assert cli.call("sweep", ["--config", str(config), "--out", str(tmp_path / "o"), "--n-trials", "0"]) == 2
    assert "--n-trials: must be >= 1, got 0" in capsys.readouterr().err
    config = write_config(tmp_path / "s.yaml", "    lr: {low: 1.0e-4, high: 1.0e-3, log: true}\n", sampler="tpe")
    with pytest.raises(ConfigError, match="sweep.n_trials is needed when the space has a range"):
        sweep_settings.load_sweep(config)


def test_a_point_finetune_refuses_stops_the_sweep_before_it_starts(tmp_path, monkeypatch):
    from q2g.finetune.config import FinetuneConfig

    def check(self):  # a cross-field rule, as a future FinetuneConfig.check might have
        return (
            ["lora_r 16 on all-linear is too big"]
            if (self.lora_r, self.target_modules) == (16, ["all-linear"])
            else []
        )

    config = write_config(tmp_path / "s.yaml", GRID)
    sweep_settings.load_sweep(config, tmp_path / "out")
    monkeypatch.setattr(FinetuneConfig, "check", check)
    with pytest.raises(
        ConfigError, match=r"the point \{'lora_r': 16, 'target_modules': \['all-linear'\]\} is refused"
    ):
        sweep_settings.load_sweep(config, tmp_path / "out")


def test_alpha_ratio_and_list_choices_become_finetune_settings(tmp_path):
    space = "    lora_r: [4, 16]\n    lora_alpha_ratio: [2]\n    target_modules: [[q_proj, v_proj], all-linear]\n"
    s = sweep_settings.load_sweep(write_config(tmp_path / "s.yaml", space), tmp_path / "out")
    assert s.target == 4 and list(s.dims["target_modules"].choices) == ["q_proj,v_proj", "all-linear"]
    settings = sweep_space.trial_settings(
        s.dims, {"lora_r": 16, "lora_alpha_ratio": 2, "target_modules": "all-linear"}, s.finetune
    )
    assert settings == {"lora_r": 16, "target_modules": ["all-linear"], "lora_alpha": 32}
    cfg = s.finetune.replace(**settings)
    assert (cfg.lora_alpha, cfg.target_modules) == (32, ["all-linear"])


# ---------------------------------------------------------------- resume, workers, duplicates


def fake_student(tmp_path: Path) -> str:
    """A folder that passes the model check `q2g sweep` makes before it writes (the fakes never load it)."""
    folder = tmp_path / "fake-student"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_resume_after_sigkill_equals_an_uninterrupted_sweep(tmp_path):
    config = write_config(tmp_path / "s.yaml", GRID, student=fake_student(tmp_path))
    whole = sweep.run_sweep(config, tmp_path / "whole", train=fake_train, baseline=fake_baseline)

    out = tmp_path / "killed"
    worker = start_worker(config, out, FAKE_HANG_ON="trial-002")
    deadline = time.time() + 60
    while not (out / "trial-002" / "started").exists():
        assert worker.poll() is None and time.time() < deadline, worker.stdout.read() if worker.poll() else "timeout"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert len(rows_of(out)) == 2  # trials 0 and 1 finished before the kill

    result = sweep.run_sweep(config, out, train=fake_train, baseline=fake_baseline)
    rows = rows_of(out)
    assert len(rows) == len(whole["rows"]) == 6 and settings_of(rows) == settings_of(whole["rows"])
    assert [r["trial"] for r in rows] == list(range(6)) and result["front"] == whole["front"]
    study = study_of(out)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.trials[2].user_attrs["attempts"] == 2  # taken over, same number and folder
    attempts = (out / "trial-002" / "attempts.txt").read_text().splitlines()
    assert [a.split()[1] for a in attempts] == ["resume=False", "resume=True"]

    printed = subprocess.run(
        [sys.executable, "-m", "q2g.cli", "sweep", "--config", str(config), "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0 and "[sweep] trial" not in printed.stdout  # a third run: nothing left to do
    assert len(study_of(out).trials) == 6


def test_two_workers_share_one_study_without_repeating_settings(tmp_path):
    config = write_config(tmp_path / "s.yaml", GRID)
    out, barrier = tmp_path / "shared", tmp_path / "barrier"
    barrier.mkdir()
    workers = [start_worker(config, out, FAKE_BARRIER=str(barrier)) for _ in range(2)]
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    rows = rows_of(out)
    assert len(rows) == 6 and len(set(settings_of(rows))) == 6  # the whole grid, each point once
    pids = {line.split()[0] for r in rows for line in (Path(r["dir"]) / "attempts.txt").read_text().splitlines()}
    assert len(pids) == 2 and all(len((Path(r["dir"]) / "attempts.txt").read_text().splitlines()) == 1 for r in rows)
    assert len(study_of(out).trials) == 6
    front = {r["trial"] for r in rows if r["on_front"]}
    assert front == {t.number for t in study_of(out).best_trials} and front
    assert all("| **" + str(n) + "** |" in (out / "pareto.md").read_text() for n in front)


def test_a_trial_is_orphaned_when_its_worker_is_gone():
    study = optuna.create_study()
    trial = study.ask()
    frozen = lambda: study.trials[0]  # noqa: E731
    assert not workers.orphaned(frozen())  # just asked, not claimed: not an orphan to take over, but
    assert workers.unclaimed(frozen(), None)  # under the lock (journal): given up at once
    assert not workers.unclaimed(frozen(), 60)  # an RDB's other machines: only after the grace period
    workers.claim(trial)
    assert not workers.unclaimed(frozen(), None)
    assert not workers.orphaned(frozen()) and frozen().user_attrs["attempts"] == 1  # this process holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial.set_user_attr("worker", {**frozen().user_attrs["worker"], "pid": int(dead.stdout)})
    assert workers.orphaned(frozen())  # its process exited
    trial.set_user_attr("worker", {"released": True})
    assert workers.orphaned(frozen())  # let go on Ctrl-C


def test_sqlite_storage_url(tmp_path):
    config = write_config(tmp_path / "s.yaml", GRID, extra_sweep="  n_trials: 2\n")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    sweep.run_sweep(config, tmp_path / "out", train=fake_train, baseline=fake_baseline, storage=url)
    assert len(optuna.load_study(study_name="q2g-sweep", storage=url).trials) == 2
    assert not (tmp_path / "out" / "study.journal").exists() and len(rows_of(tmp_path / "out")) == 2


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_samplers_never_rerun_settings_and_stop_at_the_space_size(tmp_path, sampler):
    config = write_config(
        tmp_path / "s.yaml",
        "    lora_r: [4, 8]\n    lora_dropout: [0.0, 0.1]\n",
        sampler=sampler,
        extra_sweep="  n_trials: 10\n",
    )
    result = sweep.run_sweep(config, tmp_path / "out", train=fake_train, baseline=fake_baseline)
    assert len(result["rows"]) == 4 and len(set(settings_of(result["rows"]))) == 4
    study = study_of(tmp_path / "out")
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert all(t.state.name == "FAIL" for t in repeats) and len(study.trials) == 4 + len(repeats)


def test_other_settings_in_the_same_folder_are_refused(tmp_path, capsys):
    config = write_config(tmp_path / "s.yaml", GRID, extra_sweep="  n_trials: 2\n")
    sweep.run_sweep(config, tmp_path / "out", train=fake_train, baseline=fake_baseline)
    sweep.run_sweep(config, tmp_path / "out", train=fake_train, baseline=fake_baseline, n_trials=3)  # extends
    assert len(rows_of(tmp_path / "out")) == 3
    other = write_config(tmp_path / "o.yaml", "    lora_r: [2, 4]\n")
    with pytest.raises(Exception, match=r"made with other sweep settings \(space\); use another --out"):
        sweep.run_sweep(other, tmp_path / "out", train=fake_train, baseline=fake_baseline)
    before = snapshot(tmp_path / "out")
    with pytest.raises(Exception, match=r"made with other sweep settings \(space\); use another --out"):
        sweep.run_sweep(other, tmp_path / "out", train=fake_train, baseline=fake_baseline)
    assert snapshot(tmp_path / "out") == before  # refused before the journal or sweep.json is touched


def test_heldout_loss_objective_needs_the_metric(tmp_path):
    config = write_config(tmp_path / "s.yaml", GRID, extra_sweep="  objectives: [heldout_loss, ppl_change]\n")
    with pytest.raises(ConfigError, match="the metrics rows have no heldout_loss"):
        sweep.run_sweep(config, tmp_path / "out", train=fake_train, baseline=fake_baseline)
    assert not list((tmp_path / "out").glob("trial-*"))


# ---------------------------------------------------------------- the real thing, tiny


def test_shipped_demo_config_on_the_tiny_gemma(tmp_path, tiny_gemma_dir, capsys):
    """The shipped sweep demo with the tiny random Gemma3 as the student, 2 trials of 3 steps."""
    demo = (REPO / "src/q2g/configs/sweep_demo_gemma3-270m.yaml").read_text()
    assert "base_model: pypi:gemma3-270m" in demo
    config = tmp_path / "demo.yaml"
    config.write_text(demo.replace("base_model: pypi:gemma3-270m", f"base_model: {tiny_gemma_dir}"))
    out = tmp_path / "sweep"
    assert cli.call("sweep", ["--config", str(config), "--out", str(out), "--n-trials", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[sweep] trial 1: lora_r=" in printed and "1 of 2 finished, 1 left | ETA ~" in printed
    rows = rows_of(out)
    assert [r["trial"] for r in rows] == [0, 1] and all(r["adapter"] for r in rows)
    for r in rows:
        metrics = [json.loads(line) for line in (Path(r["dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["reused_from"] == str(out / "baseline.json")  # the baseline was scored once
        assert [m["epoch"] for m in metrics] == [0, 1] and metrics[1]["step"] == 3
        assert (Path(r["adapter"]) / "adapter_model.safetensors").exists()
        assert (
            r["values"] == {"heldout_loss": r["heldout_loss"], "ppl_change": r["ppl_change"]} and len(r["epochs"]) == 1
        )
        assert r["settings"]["lora_alpha"] == r["settings"]["lora_r"] * r["settings"]["lora_alpha_ratio"]
    assert rows[0]["settings"] != rows[1]["settings"]
    assert (out / "pareto.png").exists() and "Best within the budget" in (out / "pareto.md").read_text()


def test_a_failed_trial_is_retried_on_the_next_run(tmp_path, monkeypatch, capsys):
    """A trial that failed (here: RunFailed on its first try) runs again when the sweep is rerun,
    into a new trial; the grid ends complete and the failure stays listed in the study."""
    from q2g.errors import RunFailed

    config = write_config(tmp_path / "s.yaml", "    lora_r: [4, 8]\n")
    tries = []

    def flaky(cfg, eval_cfg):
        tries.append(cfg.lora_r)
        if cfg.lora_r == 8 and tries.count(8) == 1:
            raise RunFailed("step 3: non-finite loss (nan)")
        return fake_train(cfg, eval_cfg)

    first = sweep.run_sweep(config, tmp_path / "out", train=flaky, baseline=fake_baseline)
    assert sorted(r["settings"]["lora_r"] for r in first["rows"]) == [4]
    sweep_study.RETRIED.clear()  # a new process
    second = sweep.run_sweep(config, tmp_path / "out", train=flaky, baseline=fake_baseline)
    assert sorted(r["settings"]["lora_r"] for r in second["rows"]) == [4, 8] and sorted(tries) == [4, 8, 8]
    assert "retrying the settings of failed trial" in capsys.readouterr().out
    states = sorted(t.state.name for t in study_of(tmp_path / "out").trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
