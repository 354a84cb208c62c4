"""Stage 1's options (`q2g generate --help`) and their parsing.

from q2g.generate.config import parse
args = parse(["--backend", "reference", "--data-dir", "packaged"])
"""

from __future__ import annotations

from dataclasses import dataclass

from q2g import backends
from q2g.backends import BACKENDS, DEFAULT_BATCH_SIZE
from q2g.config import SEED_MAX, Config, load_config, option
from q2g.data.sources import DEFAULT_MATH_SUBJECTS, MATH_SUBJECTS, SOURCES
from q2g.data.splits import HOLDOUT_FRACTION
from q2g.generate.shards import parse_shard
from q2g.models import PRECISIONS

DESCRIPTION = "Stage 1: a teacher's step-by-step traces for GSM8K / MATH, kept only when the answer is right."


@dataclass
class GenerateConfig(Config):
    """Stage 1's options."""

    teacher: str = option(
        "Qwen/Qwen2.5-7B-Instruct",
        results="traces",
        help="hub id, local folder, or the model's name on an openai server",
    )
    backend: str = option(
        "hf", choices=BACKENDS, results="traces", help="where the traces come from (see q2g.backends)"
    )
    datasets: list[str] = option(
        list(SOURCES), choices=SOURCES, results="traces", help="benchmarks to draw problems from"
    )
    math_subjects: list[str] = option(
        list(DEFAULT_MATH_SUBJECTS), choices=tuple(MATH_SUBJECTS), results="traces", help="MATH subjects"
    )
    math_levels: list[int] | None = option(
        None, min=1, max=5, results="traces", help="MATH levels to keep (default: all)"
    )
    temperature: float = option(0.3, min=0, max=2, results="traces", help="0 = greedy")
    top_p: float = option(0.95, gt=0, max=1, results="traces", help="nucleus sampling mass")
    max_new_tokens: int = option(
        1024, min=1, results="traces", help="token cap per sample (a capped sample is rejected as truncated)"
    )
    samples_per_problem: int = option(
        1, min=1, results="traces", help="k samples per problem; every distinct correct one is kept"
    )
    out: str = option("dataset", results=None, help="output folder")
    holdout: str = option(
        "random",
        choices=("random", "official-test"),
        results="traces",
        help="holdout: a random share of train, or the official test splits",
    )
    holdout_fraction: float = option(
        HOLDOUT_FRACTION, gt=0, max=0.9, results="traces", help="share of the problems held out (--holdout random)"
    )
    limit: int | None = option(
        None, min=1, results="traces", help="problems per stratum before splitting (quick runs)"
    )
    seed: int = option(0, min=0, max=SEED_MAX, results="traces", help="split and sampling seed")
    shard: str | None = option(None, results=None, help="I/N: generate only shard I of N (0-based)")
    merge_shards: bool = option(False, results=None, help="merge complete shard files into traces.jsonl and exit")
    batch_size: int | None = option(
        None,
        min=1,
        results=None,
        help="problems per batch (one write, the unit of resume); default "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH_SIZE.items()),
    )
    data_dir: str | None = option(
        None, results="traces", help="local data folder; 'packaged' = the subsets shipped with q2g (default: hub)"
    )
    overwrite: bool = option(False, results=None, help="delete the outputs in --out and start again")
    base_url: str | None = option(
        None, results=None, help="openai: server URL (default $OPENAI_BASE_URL or http://localhost:8000/v1)"
    )
    api_key: str | None = option(
        None, results=None, help="openai: API key (default $OPENAI_API_KEY or $Q2G_API_KEY); never saved"
    )
    concurrency: int = option(8, min=1, results=None, help="openai: requests in flight")
    timeout: float = option(600.0, gt=0, results=None, help="openai: seconds per request")
    max_retries: int = option(6, min=0, results=None, help="openai: retries on 429/5xx/connection errors")
    reasoning: str = option(
        backends.DEFAULT_REASONING,
        choices=backends.REASONING_MODES,
        results="traces",
        help="thinking teachers: the trace is <think>reasoning</think> + answer, or the answer only",
    )
    teacher_logprobs: int = option(
        0,
        min=0,
        max=20,
        results="traces",
        help="keep the teacher's log-prob of every trace token and its top K alternatives in teacher_logprobs.jsonl "
        "(0 = off; hf by a forward pass, vllm and openai from the generation; reference has no model)",
    )
    score_traces: str | None = option(
        None,
        results=None,
        help="score the traces of FILE (a traces.jsonl) with the teacher into --out/teacher_logprobs.jsonl, "
        "generating nothing (hf: a forward pass; vllm: prompt log-probs; openai: /completions with echo)",
    )
    tensor_parallel_size: int = option(1, min=1, results=None, help="vllm: GPUs per model")
    precision: str = option("auto", choices=PRECISIONS, results=None, help="hf/vllm weights")
    device: str = option("auto", results=None, help="hf: cuda, cpu, mps or auto")

    def check(self) -> list[str]:
        twice = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if twice:
            return [f"--datasets: {', '.join(twice)} given twice (each holdout problem would be listed twice)"]
        if self.base_url is not None and not self.base_url.lower().startswith(("http://", "https://")):
            return [f"--base-url: must start with http:// or https://, got {self.base_url[:200]!r}"]
        if self.teacher_logprobs and self.backend == "reference":
            return [
                "--teacher-logprobs: the reference backend has no model, so no log-probs; use --backend hf, "
                "vllm or openai, or score the reference traces afterwards with --backend hf --score-traces FILE"
            ]
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except ValueError as e:
                return [str(e)]
        return []


def parse(argv=None) -> GenerateConfig:
    args = load_config(GenerateConfig, argv, prog="q2g generate", section="generate", description=DESCRIPTION)
    return args.replace(batch_size=args.batch_size or DEFAULT_BATCH_SIZE[args.backend])
