"""`q2g sweep` on a real PostgreSQL server: two workers share one study, the one on "another
machine" (its own host name, through `unshare --uts`) is SIGKILLed inside a trial, and the other
finishes the study: every grid point COMPLETE exactly once (the dead worker's trial failed by its
stopped heartbeat and re-queued once, resumed in its folder) and the same pareto.md as an
uninterrupted sweep.

Needs Q2G_TEST_POSTGRES_URL (e.g. from scripts/pg_test_server.sh start DIR); skipped without it,
except that Q2G_REQUIRE_POSTGRES=1 (set by .ci/run) makes its absence a failure. Needs root for
`unshare --uts`. The trials are test_sweep's fakes (a fixed metric per setting, after a sleep).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

optuna = pytest.importorskip("optuna")

import test_sweep as t  # noqa: E402

from q2g.sweep import stage as sweep  # noqa: E402

URL = os.environ.get("Q2G_TEST_POSTGRES_URL")
REQUIRED = os.environ.get("Q2G_REQUIRE_POSTGRES") == "1"
GRID3 = "    lora_r: [4, 8, 16]\n"
BEATS = "  heartbeat_interval: 1\n  grace_period: 3\n"


@pytest.fixture
def pg_url():
    if not URL:
        if REQUIRED:
            pytest.fail("Q2G_REQUIRE_POSTGRES=1 but Q2G_TEST_POSTGRES_URL is not set: the PostgreSQL tests must run")
        pytest.skip("no PostgreSQL server: set Q2G_TEST_POSTGRES_URL (scripts/pg_test_server.sh start DIR)")
    from sqlalchemy.engine import make_url

    try:  # the driver SQLAlchemy picks for the URL (postgresql:// is psycopg 3 in SQLAlchemy 2.1)
        make_url(URL).get_dialect().import_dbapi()
    except ImportError as e:
        if REQUIRED:  # CI: a missing driver must not turn the test into a skip
            pytest.fail(f"Q2G_REQUIRE_POSTGRES=1 but the PostgreSQL driver is missing: {e}")
        pytest.skip(f"the PostgreSQL driver: pip install -e '.[postgres]' ({e})")
    return URL


WORKER = (
    "import sys; sys.path.insert(0, {tests!r}); import test_sweep as t; from q2g.sweep import stage as sweep; "
    "sweep.run_sweep({config!r}, {out!r}, train=t.fake_train, baseline=t.fake_baseline, "
    "storage={url!r}, study_name={name!r})"
)


def start(config, out, url, name, host=None, **env):
    code = WORKER.format(tests=str(t.TESTS), config=str(config), out=str(out), url=url, name=name)
    argv = [sys.executable, "-c", code]
    if host:  # as on a second machine: its own host name
        argv = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]
    env = {**os.environ, "PYTHONPATH": str(t.REPO / "src"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(argv, cwd=t.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, worker, timeout=90):
    deadline = time.time() + timeout
    while not path.exists():
        assert worker.poll() is None, worker.stdout.read()
        assert time.time() < deadline, f"timeout waiting for {path}"
        time.sleep(0.05)


def test_a_worker_killed_on_another_machine_is_taken_over(tmp_path, pg_url):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        why = "needs root and unshare --uts to give the killed worker another host name"
        pytest.fail(f"Q2G_REQUIRE_POSTGRES=1 but the test cannot run: {why}") if REQUIRED else pytest.skip(why)
    name = f"q2g-test-{uuid.uuid4().hex[:8]}"
    config = t.write_config(tmp_path / "s.yaml", GRID3, extra_sweep=BEATS)
    sweep.run_sweep(config, tmp_path / "whole", train=t.fake_train, baseline=t.fake_baseline, study_name=name)

    out = tmp_path / "shared"
    other = start(config, out, pg_url, name, host="other-machine", FAKE_SLEEP="600")
    wait_for(out / "trial-000" / "started", other)  # the other machine is inside trial 0
    here = start(config, out, pg_url, name)
    wait_for(out / "trial-002" / "attempts.txt", here)  # both points asked while trial 0 still beats
    other.send_signal(signal.SIGKILL)  # inside trial 0: its heartbeat stops, it is failed and re-queued
    other.wait()
    log = here.communicate(timeout=120)[0]
    assert here.returncode == 0, log

    study = optuna.load_study(study_name=name, storage=pg_url)
    complete = [tr for tr in study.trials if tr.state.name == "COMPLETE"]
    assert sorted(tr.params["lora_r"] for tr in complete) == [4, 8, 16]  # every point once
    (dead,) = [tr for tr in study.trials if tr.state.name == "FAIL"]  # failed by its stopped heartbeat
    assert dead.number == 0 and dead.user_attrs["worker"]["host"] == "other-machine"
    (retry,) = [tr for tr in complete if tr.system_attrs.get("failed_trial") == 0]  # re-queued once
    assert retry.user_attrs["trial"] == 0 and retry.user_attrs["attempts"] == 2
    attempts = (out / "trial-000" / "attempts.txt").read_text().splitlines()
    assert [a.split()[1] for a in attempts] == ["resume=False", "resume=True"]  # resumed in its folder
    assert [r["trial"] for r in t.rows_of(out)] == [0, 1, 2]
    whole = (tmp_path / "whole" / "pareto.md").read_text().replace(str(tmp_path / "whole"), "DIR")
    assert (out / "pareto.md").read_text().replace(str(out), "DIR") == whole
