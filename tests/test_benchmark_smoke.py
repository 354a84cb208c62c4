"""Every benchmark with a `--tiny` mode still runs against today's q2g: a benchmark is run on purpose
and rarely, so a changed signature (build_lora_model lost two arguments in the re-cut and
cpu_precision.py broke unseen until it was run for real) must fail here first. Each runs in its own
process on tiny random models and must print its table's header; none writes benchmarks/results/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "cpu_linears.py": "| linear layers | decode s |",
    "cpu_precision.py": "fp32",
    "distill_cost.py": "SFT",
    "onpolicy_cost.py": "| on-policy |",
    "train_vs_trl.py": "q2g",
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_tiny_benchmark_runs(script, tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime for p in results.iterdir()} if results.exists() else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "Q2G_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert CASES[script] in done.stdout, done.stdout[-3000:]
    assert "CPU" in done.stdout or "cpu" in done.stdout  # every timing says its CPU
    after = {p: p.stat().st_mtime for p in results.iterdir()} if results.exists() else {}
    assert after == before, "a --tiny run wrote into benchmarks/results/"
