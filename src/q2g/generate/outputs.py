"""Stage 1's output folder: the resolved config.json, the "same run?" check, and clearing it.

A rerun with the settings of config.json resumes; with other settings (on an option declared
`results="traces"`, or another teacher prompt) it is refused unless --overwrite, which deletes
every file matched by OUTPUT_GLOBS first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from q2g import prompts
from q2g.config import result_keys
from q2g.generate.config import GenerateConfig
from q2g.io import settings_diff

OUTPUT_GLOBS = (
    "traces*.jsonl",
    "teacher_logprobs*.jsonl",
    "rejected*.jsonl",
    "summary*.json",
    "config.json",
    "split.json",
    "holdout.jsonl",
)


def prompt_sha() -> str:
    """Fingerprint of the teacher prompt: traces made with another prompt are another dataset."""
    text = "\n".join([prompts.TEACHER_SYSTEM, prompts.TEACHER_INSTRUCTION, prompts.FINAL_ANSWER_LINE])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def resolved_config(args, split_settings: dict) -> dict:
    skip = {"api_key", "overwrite", "merge_shards"}  # never write a secret to disk
    config = {k: v for k, v in args.to_dict().items() if k not in skip}
    config.update(
        math_subjects=split_settings["math_subjects"],
        math_levels=split_settings["math_levels"],
        data_dir=split_settings["data_dir"],
        prompt_sha=prompt_sha(),
        split=split_settings,
    )
    if not config.get("teacher_logprobs"):  # off: absent, as in folders written before the option, which still resume
        config.pop("teacher_logprobs", None)
    return json.loads(json.dumps(config))


def settings_mismatch(out: Path, config: dict) -> list[str]:
    """How `config` differs from the one that wrote `out` (empty: the same run, so resume)."""
    if not (out / "config.json").exists():
        stray = [p.name for g in ("traces*.jsonl", "rejected*.jsonl") for p in out.glob(g)]
        return [f"{', '.join(stray)} exist(s) without a config.json"] if stray else []
    return settings_diff(out / "config.json", config, (*result_keys(GenerateConfig, scopes=("traces",)), "prompt_sha"))


def clear_outputs(out: Path) -> None:
    for pattern in OUTPUT_GLOBS:
        for path in out.glob(pattern):
            path.unlink()
