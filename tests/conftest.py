"""Shared fixtures: tiny random Qwen2 / Gemma3 models built from configs (no downloads), the
shared data folder, a folder copier. The builders behind them are in helpers.py."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import build_tiny, shared_data_dir


@pytest.fixture(scope="session", autouse=True)
def no_baseline_cache():
    """Tests evaluate every baseline (a cached one would skip evaluations they count); the cache's own
    tests point Q2G_BASELINE_CACHE at a folder of theirs."""
    old = os.environ.get("Q2G_BASELINE_CACHE")
    os.environ["Q2G_BASELINE_CACHE"] = "off"
    yield
    if old is None:
        os.environ.pop("Q2G_BASELINE_CACHE", None)
    else:
        os.environ["Q2G_BASELINE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def avx2_only_cpu():
    """`precision: auto` follows the CPU (q2g.cpu_info): the suite's expectations (fp32 on the CPU)
    hold on every machine only if each test sees the same CPU, so this one has no bf16 matrix units.
    tests/test_cpu_precision.py fakes each kind; subprocesses still see the real CPU."""
    from q2g import cpu_info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_info, "bf16_units", lambda: None)
        mp.setattr(cpu_info, "simd_level", lambda: "AVX2")
        yield


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (the full GSM8K/MATH/WikiText copies) is not on this machine")
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    return build_tiny("gemma3", tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture()
def copy_dir(tmp_path):
    def _copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy
