"""`q2g export`: the validated traces as a JSONL training file for other trainers (TRL, any chat SFT).

    q2g export --traces dataset/ --format trl --base-model google/gemma-7b --out traces.trl.jsonl
    q2g export --traces dataset/ --format messages --out traces.messages.jsonl

Reads the `validated: true` rows of traces.jsonl (a folder from `q2g generate`, or the file), in
file order, and writes one row per trace, atomically. `datasets.load_dataset("json",
data_files=FILE)` reads either file as it is.

--format trl       TRL's prompt-completion format: {"prompt": ..., "completion": ...}, the prompt
                   being the student prompt of q2g's own format (prompts.student_prompt on the
                   --base-model tokenizer) and the completion the trace + its end-of-turn text.
                   TRL's SFTTrainer tokenizes it to the ids `q2g finetune` trains on and masks the
                   prompt (completion_only_loss). Two tokenizer details are settled here so that
                   holds: TRL encodes text with the special tokens, so a BOS the chat template
                   writes is left out of the prompt (else there would be two); and TRL appends EOS
                   to a completion that does not end with it, so for a student whose end-of-turn is
                   not its EOS (Gemma chat: <end_of_turn> vs <eos>) pass
                   SFTConfig(eos_token="<end_of_turn>") to train exactly q2g's target.
--format messages  conversational {"messages": [{"role": "user", "content": problem},
                   {"role": "assistant", "content": trace}]}, the user turn being what
                   prompts.student_prompt puts in the chat template; the trainer applies the
                   template, so no tokenizer is needed (and a base student without one cannot use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from q2g.config import Config, load_config, option
from q2g.errors import DataError
from q2g.examples import read_traces
from q2g.io import write_jsonl
from q2g.models import load_tokenizer
from q2g.out_guard import check_output, hold_lock, lock_beside
from q2g.prompts import has_chat_template, student_prompt, student_target, target_trace

FORMATS = ("trl", "messages")
DEFAULT_STUDENT = "google/gemma-7b"  # finetune's default --base-model


@dataclass
class ExportConfig(Config):
    traces: str | None = option(None, results=None, help="a folder from q2g generate, or its traces.jsonl (required)")
    format: str = option("trl", choices=FORMATS, results=None, help="trl: prompt/completion; messages: chat turns")
    out: str | None = option(None, results=None, help="the JSONL file to write (required)")
    base_model: str = option(
        DEFAULT_STUDENT,
        results=None,
        help="trl: the student whose prompt format and end-of-turn are written (hub id, folder, pypi:...)",
    )

    def check(self) -> list[str]:
        return [f"--{k} is required" for k in ("traces", "out") if not getattr(self, k)]


def traces_file(traces: str) -> Path:
    """The traces.jsonl that --traces names (a folder from q2g generate, or the file itself)."""
    path = Path(traces)
    path = path / "traces.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: traces file not found (run `q2g generate` first)")
    return path


def validated_traces(path: Path) -> list[dict]:
    """The validated rows of traces.jsonl, checked field by field (DataError naming file:line);
    a file without one is refused (examples.read_traces): an export of nothing is a mistake."""
    return read_traces(path)[1]


def check_out(args: ExportConfig, traces: Path) -> Path:
    """--out through the output guard: never the traces file, its folder, or the student's folder."""
    return check_output(
        args.out,
        "--out",
        inputs={"--traces": args.traces, "--base-model": args.base_model},
        folder=False,
    )


def trl_prompt(tokenizer, problem: str) -> str:
    """The student prompt as TRL will encode it (with special tokens): without a BOS the template wrote."""
    text, bos = student_prompt(tokenizer, problem), tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if has_chat_template(tokenizer) and adds_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def trl_row(tokenizer, row: dict) -> dict:
    # The same target as prompts.student_target_ids: the stripped trace, then the end-of-turn.
    return {
        "prompt": trl_prompt(tokenizer, row["problem"]),
        "completion": student_target(tokenizer, row["qwen_trace"]),
    }


def messages_row(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": target_trace(row["qwen_trace"])},
        ]
    }


def export_rows(rows: list[dict], fmt: str, tokenizer=None) -> list[dict]:
    if fmt == "trl":
        return [trl_row(tokenizer, r) for r in rows]
    if fmt == "messages":
        return [messages_row(r) for r in rows]
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def main(argv=None) -> int:
    args = load_config(ExportConfig, argv, prog="q2g export", section="export", description=__doc__.split("\n\n")[0])
    traces = traces_file(args.traces)
    out_path = check_out(args, traces)
    rows = validated_traces(traces)
    tokenizer = load_tokenizer(args.base_model) if args.format == "trl" else None
    out = export_rows(rows, args.format, tokenizer)
    folder, lock = lock_beside(out_path)
    with hold_lock(folder, name=lock):
        write_jsonl(out_path, out)
    print(f"[export] {len(out)} validated traces -> {args.out} ({args.format})")
    return 0
