"""benchmarks/gpu_proof.py --rehearse: both parts of the GPU proof run end to end on the CPU with the
tiny models, so they cannot rot before a GPU is at hand. Checked: every row of each part's table,
the files in --out (3 per part, at most 6 in all, no subfolder, nothing of the scratch work), and
that a SIGTERM after the first section leaves the JSON of what finished and ends the running child."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}

ROWS = {
    "shape": [
        "| train_ckpt_on | real tok/s q2g / TRL |",
        "| train_ckpt_on | q2g plan / reserved / allocated GB |",
        "| train_ckpt_on | checkpointing q2g / TRL | yes / yes |",
        "| train_ckpt_on | q2g loss path | chunked |",
        "| train_ckpt_off | checkpointing q2g / TRL | NO / NO |",
        "| decoding | static: problems/s, new tok/s (8 prompts, batch 4, bf16) |",
        "| decoding | refill / static |",
        "| liger | skipped | rehearsal (CPU): no Liger |",
        "| sweep_oom | trial 1 (no checkpointing) | batch 4: OutOfMemoryError: simulated",
        "| sweep_oom | trial 2 after free | batch 2: 1 steps, finite yes",
    ],
    "outcome": [
        "| conversion | WikiText 4,096 tokens fp32 (known) |",
        "| conversion | check_demo_model | BROKEN:",  # a tiny random model is not the real one
        "| traces | reference traces |",
        "| finetune | pass@1_before |",
        "| finetune | pass@1_after |",
        "| finetune | heldout_loss_after |",
        "| finetune | ppl_change |",
        "| finetune | all_steps_finite | yes |",
    ],
}


def proof(part: str, out: Path, *extra, **kw) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--part", part, "--rehearse", "--out", str(out)]
    cmd += list(extra)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def both_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = {}
    for part in ("shape", "outcome"):
        proc = proof(part, out)
        log = proc.communicate(timeout=900)[0]
        results[part] = (proc.returncode, log)
    return out, results


@pytest.mark.parametrize("part", ["shape", "outcome"])
def test_rehearsal_writes_every_row(both_parts, part):
    out, results = both_parts
    rc, log = results[part]
    assert rc == 0, log[-3000:]
    md = (out / f"{part}.md").read_text()
    for row in ROWS[part]:
        assert row in md, row
    assert "FAILED" not in md and "CUT SHORT" not in md
    res = json.loads((out / f"{part}.json").read_text())
    sec = res["sections"]
    if part == "shape":
        assert sec["train_ckpt_on"]["q2g"]["tokens_per_s"] > 0 and sec["train_ckpt_on"]["trl"]["tokens_per_s"] > 0
        assert sec["train_ckpt_on"]["plan_chunk"] >= 1
        assert sec["decoding"]["prompts"] == 8 and sec["decoding"]["same_tokens"] == "yes"
        assert sec["sweep_oom"]["trial_1"]["out_of_memory"] is True
    else:
        assert sec["conversion"]["ppl_4096_fp32"] > 1 and sec["conversion"]["demo_check_ok"] is False
        assert sec["traces"]["traces"] == 12
        assert sec["finetune"]["settings"]["eval_batch_size"] == 4  # set, not evaluation's default 8
        assert sec["finetune"]["ppl_before"] > 1 and sec["finetune"]["heldout_loss_before"] > 0
    assert "$ " in (out / f"{part}.log").read_text()  # every section's command and output streamed there


def test_out_holds_only_the_result_files(both_parts):
    out, _ = both_parts
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{part}.{ext}" for part in ("shape", "outcome") for ext in ("json", "md", "log"))
    assert len(names) <= 6 and all(p.is_file() for p in out.iterdir())


def test_sigterm_after_the_first_section_keeps_what_finished(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    proc = proof("shape", out, "--scratch", str(scratch))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        js = out / "shape.json"
        if js.exists() and "train_ckpt_on" in (sec := json.loads(js.read_text())["sections"]):
            if "running" not in sec["train_ckpt_on"]:
                break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    sec = json.loads((out / "shape.json").read_text())["sections"]
    assert sec["train_ckpt_on"]["q2g"]["tokens_per_s"] > 0
    assert sec.get("decoding", {"running": True}) == {"running": True}  # cut short, not reported as done
    assert "| train_ckpt_on | real tok/s q2g / TRL |" in (out / "shape.md").read_text()
    time.sleep(1)  # the running section (its own session) went with it: no process works in the scratch folder
    assert not [c for c in Path("/proc").glob("[0-9]*/cmdline") if str(scratch).encode() in read(c)]


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""
