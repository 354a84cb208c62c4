"""benchmarks/gpu_proof.py --rehearse: the GPU proof script runs end to end on the CPU with the tiny
models, so it cannot rot before a GPU is at hand; every section's rows are in gpu_proof.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rehearsal_writes_every_section(tmp_path):
    out = tmp_path / "proof"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--rehearse", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "gpu_proof.md").read_text()
    res = json.loads((out / "gpu_proof.json").read_text())
    for row in (
        "| a conversion | WikiText token perplexity (known) |",
        "| b seed 1 epoch | pass@1_before |",
        "| b seed 1 epoch | pass@1_after |",
        "| b seed 1 epoch | heldout_loss_after |",
        "| b seed 1 epoch | ppl_change |",
        "| b seed 1 epoch | all_steps_finite | yes |",
        "| c 7B-shape vs TRL | real tok/s q2g / TRL |",
        "| c 7B-shape vs TRL | plan estimate / measured peak GB |",
        "| c 7B-shape vs TRL | q2g loss path | chunked |",
        "| d decoding | static: problems/s, generated tok/s |",
        "| d decoding | refill / static |",
        "| e Liger | Liger on vs off | rehearsal (CPU): no Liger |",
    ):
        assert row in md, row
    assert "FAILED" not in md
    assert res["b"]["ppl_before"] > 1 and res["b"]["heldout_loss_before"] > 0
    assert res["c"]["q2g"]["tokens_per_s"] > 0 and res["c"]["trl"]["tokens_per_s"] > 0
    assert res["d"]["refill"]["same_tokens"] == "yes"
