"""The `q2g` command: one subcommand per stage.

    q2g demo                      # the whole pipeline offline on the real Gemma 3 270M (CPU)
    q2g run --config configs/X.yaml
    q2g generate ...   q2g finetune ...   q2g evaluate ...   q2g merge ...

Each subcommand is the `main(argv)` of its module, imported only when chosen so `q2g --help`
stays fast and a stage's heavy imports never slow another. This is the one place where errors
become exit codes (the table is in q2g.errors and the README): 2 bad input or settings, 1 a
failed run, 130 Ctrl-C; the message is one line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from q2g import __version__
from q2g.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Q2GError

COMMANDS = {
    "generate": ("q2g.generate.stage", "stage 1: teacher traces -> dataset/"),
    "finetune": ("q2g.finetune.stage", "stage 2: LoRA fine-tuning with per-epoch pass@1 and perplexity"),
    "evaluate": ("q2g.evaluation.stage", "pass@1 on a holdout and WikiText perplexity of any model (+adapter)"),
    "merge": ("q2g.merge", "merge a LoRA adapter into its base model, checked on a probe input"),
    "export": ("q2g.export", "validated traces as TRL prompt/completion or chat-messages JSONL"),
    "run": ("q2g.run", "generate -> finetune -> report from one YAML config, resuming finished stages"),
    "sweep": ("q2g.sweep.stage", "Optuna sweep of finetune settings: a Pareto front of accuracy vs forgetting"),
    "demo": ("q2g.run", "the offline demo: real Gemma 3 270M, shipped data, reference teacher"),
}


def usage() -> str:
    lines = ["usage: q2g <command> [options]   (q2g <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


INTERRUPTED = "interrupted: finished work is kept; rerun the same command to resume"
MAX_MESSAGE_CHARS = 4000  # a message echoes values cut to 200 characters; this bounds the rest


def main(argv=None) -> int:
    """The console entry: Ctrl-C at any moment (a stage's imports included) exits 130 with one line."""
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def dispatch(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"q2g {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"q2g: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "demo_main" if name == "demo" else "main")
    return run_entry(entry, rest)


def call(command: str, argv=()) -> int:
    """`q2g <command> argv...` from Python, with the command line's exit code (tests, scripts);
    argparse's own exit (a malformed command line: 2, --help: 0) is returned too, not raised."""
    try:
        return main([command, *argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1


def run_entry(entry, argv) -> int:
    """Call a stage's main; its q2g errors become (message on stderr, exit code)."""
    try:
        return int(entry(argv) or 0)
    except Q2GError as e:
        text = str(e)
        text = text if len(text) <= MAX_MESSAGE_CHARS else f"{text[:MAX_MESSAGE_CHARS]}... ({len(text):,} characters)"
        print(f"error: {text}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # argparse's own refusal (it has printed the message)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
