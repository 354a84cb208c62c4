"""Bad input to every command: the exit code, a message that names the flag, file:line or YAML key
(and the allowed values), and nothing written.

One row per case: the command, its argv (after the command's base options, which the case's flags
override), an optional YAML file ($YAML) and files to create first, the exit code, and substrings the
one-line error must contain. Every case runs in a fresh folder (the cwd too, so default output
folders land there) and checks that no file or folder was created or changed, there or in the shared
fixtures (dataset, model, adapter). Most fail before any model loads; none trains.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import reference_dataset
from refusal import GSM, TRACE, assert_refused, fill, jl, snapshot, write_files
from trust_cases import ROWS as TRUST_ROWS

from q2g import cli

GEN = ["--backend", "reference", "--data-dir", "packaged", "--limit", "2", "--out", "$OUT"]
EVAL = [
    "--eval-limit",
    "1",
    "--eval-max-new-tokens",
    "2",
    "--ppl-max-tokens",
    "32",
    "--ppl-max-length",
    "32",
    "--ppl-stride",
    "16",
    "--data-dir",
    "packaged",
]
FT = ["--base-model", "$MODEL", "--traces", "$DS", "--out", "$OUT", *EVAL]
EV = ["--model", "$MODEL", "--split", "$DS/split.json", "--out", "$OUT", *EVAL]
MG = ["--adapter", "$ADAPTER", "--out", "$OUT"]
RUN = ["--config", "$YAML", "--out", "$OUT"]
BASE = {"generate": GEN, "finetune": FT, "evaluate": EV, "merge": MG, "run": RUN}


def traces(*rows) -> dict:
    """Files of a dataset folder $TMP/ds whose traces.jsonl holds `rows` (the split is the fixture's)."""
    return {"ds/traces.jsonl": jl(*rows), "ds/split.json": "@split.json", "ds/holdout.jsonl": "@holdout.jsonl"}


def run_yaml(generate: str = "", finetune: str = "", top: str = "") -> str:
    return (
        f"out: unused\n{top}generate:\n  backend: reference\n  teacher: reference\n  data_dir: packaged\n"
        f"{generate}finetune:\n  base_model: $MODEL\n  data_dir: packaged\n{finetune}"
    )


@dataclass
class Case:
    id: str
    cmd: str
    argv: list = field(default_factory=list)
    code: int = 2
    msg: tuple = ()
    yaml: str | None = None
    files: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    base: bool = True


def C(id, cmd, argv=(), msg=(), code=2, **kw) -> Case:
    return Case(id, cmd, list(argv), code, (msg,) if isinstance(msg, str) else tuple(msg), **kw)


CASES = [
    # ------------------------------------------------------------ generate: flags
    C("gen-batch-size-0", "generate", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    C("gen-holdout-1.5", "generate", ["--holdout-fraction", "1.5"], "--holdout-fraction: must be <= 0.9, got 1.5"),
    C("gen-holdout-neg", "generate", ["--holdout-fraction", "-0.2"], "--holdout-fraction: must be > 0, got -0.2"),
    C("gen-holdout-0", "generate", ["--holdout-fraction", "0"], "--holdout-fraction: must be > 0"),
    C("gen-limit-neg", "generate", ["--limit", "-1"], "--limit: must be >= 1, got -1"),
    C("gen-limit-0", "generate", ["--limit", "0"], "--limit: must be >= 1, got 0"),
    C("gen-temperature-neg", "generate", ["--temperature", "-1"], "--temperature: must be >= 0, got -1.0"),
    C("gen-temperature-3", "generate", ["--temperature", "3"], "--temperature: must be <= 2, got 3.0"),
    C(
        "gen-temperature-text",
        "generate",
        ["--temperature", "hot"],
        "argument --temperature: invalid float value: 'hot'",
    ),
    C("gen-top-p-0", "generate", ["--top-p", "0"], "--top-p: must be > 0"),
    C("gen-max-new-tokens-0", "generate", ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    C("gen-samples-0", "generate", ["--samples-per-problem", "0"], "--samples-per-problem: must be >= 1"),
    C("gen-dataset", "generate", ["--datasets", "gsm8k", "aime"], ("--datasets: 'aime' is not one of gsm8k, math",)),
    C(
        "gen-subject-typo",
        "generate",
        ["--math-subjects", "geometri"],
        ("--math-subjects: 'geometri' is not one of algebra,", "did you mean 'geometry'?"),
    ),
    C("gen-level-6", "generate", ["--math-levels", "2", "6"], "--math-levels: must be <= 5, got 6"),
    C(
        "gen-backend",
        "generate",
        ["--backend", "hff"],
        ("--backend: 'hff' is not one of hf, vllm, openai, reference", "did you mean 'hf'?"),
    ),
    C("gen-shard-range", "generate", ["--shard", "4/4"], "--shard must be I/N with 0 <= I < N, got '4/4'"),
    C("gen-shard-text", "generate", ["--shard", "half"], "--shard must be I/N"),
    C("gen-unknown-flag", "generate", ["--temprature", "0.3"], "unrecognized arguments: --temprature"),
    C(
        "gen-out-is-file",
        "generate",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "gen-other-run",
        "generate",
        [],
        ("$OUT holds outputs of a run with other settings", "seed: 5 there, 0 now", "--overwrite"),
        files={"out/config.json": json.dumps({"seed": 5})},
    ),
    C("gen-merge-shards-none", "generate", ["--merge-shards"], "$OUT: no shard outputs found"),
    C(
        "gen-teacher-missing-folder",
        "generate",
        ["--backend", "hf", "--teacher", "./no-such-teacher"],
        "no folder ./no-such-teacher, and ./no-such-teacher is not a hub id",
    ),
    C(
        "gen-teacher-offline",
        "generate",
        ["--backend", "hf", "--teacher", "q2g-test/not-cached-7b"],
        ("q2g-test/not-cached-7b is not in the local hub cache and the hub is offline", "HF_HUB_OFFLINE=0"),
        env={"HF_HUB_OFFLINE": "1"},
    ),
    # ------------------------------------------------------------ generate: data files
    C("gen-data-dir-missing", "generate", ["--data-dir", "$TMP/nowhere"], "data dir $TMP/nowhere does not exist"),
    C(
        "gen-data-not-utf8",
        "generate",
        ["--data-dir", "$TMP/d", "--datasets", "gsm8k"],
        "$TMP/d/gsm8k/train.jsonl:2: not UTF-8 (byte offset 70",
        files={"d/gsm8k/train.jsonl": jl(GSM).encode() + b'{"question": "\xff"}\n'},
    ),
    C(
        "gen-data-no-gold",
        "generate",
        ["--data-dir", "$TMP/d", "--datasets", "gsm8k"],
        "$TMP/d/gsm8k/train.jsonl:2: GSM8K solution has no '####' line",
        files={"d/gsm8k/train.jsonl": jl(GSM, {"question": "q", "answer": "no gold"})},
    ),
    C(
        "gen-data-question-list",
        "generate",
        ["--data-dir", "$TMP/d", "--datasets", "gsm8k"],
        "$TMP/d/gsm8k/train.jsonl:1: field 'question' must be str, got list",
        files={"d/gsm8k/train.jsonl": jl({"question": ["q"], "answer": "#### 1"})},
    ),
    C(
        "gen-data-math-missing",
        "generate",
        ["--data-dir", "$TMP/d"],
        "$TMP/d/math/train.jsonl not found",
        files={"d/gsm8k/train.jsonl": jl(GSM)},
    ),
    C(
        "gen-data-math-subject",
        "generate",
        ["--data-dir", "$TMP/d", "--datasets", "math"],
        ("$TMP/d/math/train.jsonl:1: unknown MATH subject 'Astrology'",),
        files={
            "d/math/train.jsonl": jl(
                {"problem": "p", "level": "Level 1", "type": "Astrology", "solution": "$\\boxed{1}$"}
            )
        },
    ),
    # ------------------------------------------------------------ generate: YAML
    C(
        "gen-yaml-unknown-key",
        "generate",
        [],
        ("c.yaml: unknown option 'temprature' for q2g generate", "did you mean 'temperature'?"),
        yaml="temprature: 0.3\n",
    ),
    C("gen-yaml-string-for-int", "generate", [], "c.yaml: seed: must be an int, got '5'", yaml="seed: '5'\n"),
    C(
        "gen-yaml-bool-for-int",
        "generate",
        [],
        "c.yaml: max_new_tokens: must be an int, got True",
        yaml="max_new_tokens: true\n",
    ),
    C(
        "gen-yaml-scalar-for-list",
        "generate",
        [],
        "c.yaml: datasets: must be a non-empty list of str",
        yaml="datasets: gsm8k\n",
    ),
    C(
        "gen-yaml-precision",
        "generate",
        [],
        ("c.yaml: precision: 'bf-16' is not one of auto, bf16, fp16, fp32", "did you mean 'bf16'?"),
        yaml="precision: bf-16\n",
    ),
    C("gen-yaml-nan", "generate", [], "c.yaml: temperature: must be a float, got nan", yaml="temperature: .nan\n"),
    C("gen-yaml-null", "generate", [], "c.yaml: seed: must be given (null is not allowed)", yaml="seed: null\n"),
    C("gen-yaml-list-top", "generate", [], "c.yaml: expected a mapping of option: value", yaml="- limit: 2\n"),
    C("gen-yaml-syntax", "generate", [], "c.yaml: not valid YAML", yaml="limit: [2\n"),
    C("gen-yaml-duplicate", "generate", [], "c.yaml:2: duplicate key 'seed'", yaml="seed: 2\nseed: 3\n"),
    C("gen-yaml-not-utf8", "generate", [], "c.yaml: not UTF-8 text (byte 7)", yaml=b"seed: 0\xff\n"),
    C(
        "gen-yaml-is-a-folder",
        "generate",
        ["--config", "$TMP/cfg"],
        "config file $TMP/cfg: cannot be read (Is a directory)",
        files={"cfg/a.yaml": "seed: 1\n"},
    ),
    C("gen-yaml-missing", "generate", ["--config", "$TMP/none.yaml"], "config file $TMP/none.yaml not found"),
    # ------------------------------------------------------------ finetune: flags
    C("ft-lr-neg", "finetune", ["--lr", "-1"], "--lr: must be > 0, got -1.0"),
    C("ft-lr-0", "finetune", ["--lr", "0"], "--lr: must be > 0, got 0.0"),
    C("ft-batch-size-0", "finetune", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    C("ft-epochs-neg", "finetune", ["--epochs", "-1"], "--epochs: must be > 0, got -1.0"),
    C("ft-epochs-0", "finetune", ["--epochs", "0"], "--epochs: must be > 0, got 0.0"),
    C("ft-lora-r-0", "finetune", ["--lora-r", "0"], "--lora-r: must be >= 1, got 0"),
    C("ft-dropout-1", "finetune", ["--lora-dropout", "1"], "--lora-dropout: must be <= 0.9, got 1.0"),
    C("ft-warmup-1", "finetune", ["--warmup-ratio", "1"], "--warmup-ratio: must be <= 0.99, got 1.0"),
    C("ft-max-seq-len-4", "finetune", ["--max-seq-len", "4"], "--max-seq-len: must be >= 8, got 4"),
    C("ft-optim", "finetune", ["--optim", "sgd"], "--optim: 'sgd' is not one of adamw_8bit, adamw"),
    C(
        "ft-on-forgetting",
        "finetune",
        ["--on-forgetting", "stp"],
        ("--on-forgetting: 'stp' is not one of flag, stop, reduce-rank", "did you mean 'stop'?"),
    ),
    C("ft-eval-limit-0", "finetune", ["--eval-limit", "0"], "--eval-limit: must be >= 1, got 0"),
    C(
        "ft-ppl-stride",
        "finetune",
        ["--ppl-stride", "64"],
        "--ppl-stride (64) must be smaller than --ppl-max-length (32)",
    ),
    C("ft-grad-accum-text", "finetune", ["--grad-accum", "two"], "argument --grad-accum: invalid int value: 'two'"),
    C(
        "ft-precision-fp16-cpu",
        "finetune",
        ["--precision", "fp16", "--device", "cpu"],
        "--precision fp16 needs a CUDA GPU",
    ),
    C("ft-device-name", "finetune", ["--device", "gpu"], "--device gpu: not a device (auto, cpu, cuda, cuda:N, mps)"),
    C("ft-device-no-cuda", "finetune", ["--device", "cuda:3"], "--device cuda:3: this machine has no CUDA GPU"),
    C("ft-no-trace-fits", "finetune", ["--max-seq-len", "8"], "no trace fits --max-seq-len 8"),
    C(
        "ft-target-modules",
        "finetune",
        ["--target-modules", "q_proj", "qkv_proj"],
        ("--target-modules: qkv_proj not in $MODEL", "q_proj"),
    ),
    C(
        "ft-baseline-from-missing",
        "finetune",
        ["--baseline-from", "$TMP/base.json"],
        "--baseline-from $TMP/base.json: not a saved baseline",
    ),
    C("ft-data-dir-missing", "finetune", ["--data-dir", "$TMP/nowhere"], "data dir $TMP/nowhere does not exist"),
    # ------------------------------------------------------------ finetune: the model
    C(
        "ft-model-missing-rel",
        "finetune",
        ["--base-model", "./no-such-model"],
        "no folder ./no-such-model, and ./no-such-model is not a hub id",
    ),
    C(
        "ft-model-missing-abs",
        "finetune",
        ["--base-model", "$TMP/models/gemma"],
        "no folder $TMP/models/gemma, and $TMP/models/gemma is not a hub id",
    ),
    C(
        "ft-model-three-parts",
        "finetune",
        ["--base-model", "org/name/extra"],
        "no folder org/name/extra, and org/name/extra is not a hub id",
    ),
    C(
        "ft-model-existing-parent",
        "finetune",
        ["--base-model", "models/gemma"],
        "no folder models/gemma, and models/gemma is not a hub id",
        files={"models/README": "weights go here\n"},
    ),
    C(
        "ft-model-offline",
        "finetune",
        ["--base-model", "q2g-test/not-cached-2b"],
        ("q2g-test/not-cached-2b is not in the local hub cache and the hub is offline", "download it first"),
        env={"HF_HUB_OFFLINE": "1"},
    ),
    C(
        "ft-model-is-a-file",
        "finetune",
        ["--base-model", "$TMP/f.txt"],
        "no folder $TMP/f.txt, and $TMP/f.txt is not a hub id",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "ft-model-not-a-model",
        "finetune",
        ["--base-model", "$TMP/empty"],
        "$TMP/empty has no config.json",
        files={"empty/notes.txt": "not a model\n"},
    ),
    # ------------------------------------------------------------ finetune: traces and split
    C(
        "ft-traces-not-utf8",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:2: not UTF-8 (byte offset",
        files={**traces(TRACE), "ds/traces.jsonl": jl(TRACE).encode() + b'{"problem": "\xc3("}\n'},
    ),
    C(
        "ft-trace-number",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:2: field 'qwen_trace' must be str, got int 5",
        files=traces(TRACE, {**TRACE, "qwen_trace": 5}),
    ),
    C(
        "ft-trace-null",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:1: field 'qwen_trace' must be str, got NoneType null",
        files=traces({**TRACE, "qwen_trace": None}),
    ),
    C(
        "ft-problem-list",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:1: field 'problem' must be str, got list",
        files=traces({**TRACE, "problem": ["a", "b"]}),
    ),
    C(
        "ft-answer-dict",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:1: field 'answer' must be str/int/float, got dict",
        files=traces({**TRACE, "answer": {}}),
    ),
    C(
        "ft-validated-text",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:2: field 'validated' must be bool, got str \"yes\"",
        files=traces(TRACE, {**TRACE, "validated": "yes"}),
    ),
    C(
        "ft-trace-source",
        "finetune",
        ["--traces", "$TMP/ds"],
        "trace t1: source 'aime' is not one of gsm8k, math",
        files=traces({**TRACE, "source": "aime"}),
    ),
    C(
        "ft-trace-array",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:1: expected a JSON object, got list",
        files=traces("[1, 2]"),
    ),
    C(
        "ft-trace-missing-field",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/traces.jsonl:1: missing field(s) answer",
        files=traces({k: v for k, v in TRACE.items() if k != "answer"}),
    ),
    C(
        "ft-traces-missing",
        "finetune",
        ["--traces", "$TMP/nothing"],
        "$TMP/nothing: traces file not found (run `q2g generate` first)",
    ),
    C(
        "ft-split-missing",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/split.json: split manifest not found",
        files={"ds/traces.jsonl": jl(TRACE)},
    ),
    C(
        "ft-split-not-json",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/split.json: not valid JSON",
        files={**traces(TRACE), "ds/split.json": "{oops"},
    ),
    C(
        "ft-split-holdout-not-list",
        "finetune",
        ["--traces", "$TMP/ds"],
        "$TMP/ds/split.json: 'holdout' must be a list of {id, hash} entries",
        files={**traces(TRACE), "ds/split.json": json.dumps({"version": 1, "settings": {}, "holdout": 3})},
    ),
    # ------------------------------------------------------------ finetune: the output folder
    C(
        "ft-out-is-file",
        "finetune",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "ft-out-holds-run",
        "finetune",
        [],
        "$OUT already holds a run (metrics.jsonl); pass --resume",
        files={"out/metrics.jsonl": jl({"epoch": 0}), "out/config.json": "{}"},
    ),
    C(
        "ft-resume-damaged-config",
        "finetune",
        ["--resume"],
        "$OUT/config.json is not valid JSON (a damaged output folder?)",
        files={"out/metrics.jsonl": jl({"epoch": 0}), "out/config.json": '{"lr": 0.1'},
    ),
    C(
        "ft-resume-other-settings",
        "finetune",
        ["--resume"],
        ("--resume: $OUT was made with other settings", "lr: 0.1 there, 0.0002 now"),
        files={"out/metrics.jsonl": jl({"epoch": 0}), "out/config.json": json.dumps({"lr": 0.1})},
    ),
    # ------------------------------------------------------------ finetune: YAML
    C("ft-yaml-epochs", "finetune", [], "c.yaml: epochs: must be > 0, got -2", yaml="epochs: -2\n"),
    C(
        "ft-yaml-on-forgetting",
        "finetune",
        [],
        ("c.yaml: on_forgetting: 'stp' is not one of flag, stop, reduce-rank", "did you mean 'stop'?"),
        yaml="on_forgetting: stp\n",
    ),
    C(
        "ft-yaml-precision",
        "finetune",
        [],
        "c.yaml: precision: 'bf-16' is not one of auto, bf16, fp16, fp32",
        yaml="precision: bf-16\n",
    ),
    C("ft-yaml-string-for-int", "finetune", [], "c.yaml: lora_r: must be an int, got '16'", yaml="lora_r: '16'\n"),
    C(
        "ft-yaml-float-for-int",
        "finetune",
        [],
        "c.yaml: batch_size: must be an int, got 4.5",
        yaml="batch_size: 4.5\n",
    ),
    C("ft-yaml-1e-4", "finetune", [], ("c.yaml: lr: must be a float, got '1e-4'", "write 1.0e-4"), yaml="lr: 1e-4\n"),
    C(
        "ft-yaml-unknown",
        "finetune",
        [],
        ("c.yaml: unknown option 'learning_rate' for q2g finetune",),
        yaml="learning_rate: 0.001\n",
    ),
    C(
        "ft-yaml-section-typo",
        "finetune",
        [],
        ("c.yaml: unknown option 'finetune.epoch' for q2g finetune", "did you mean 'epochs'?"),
        yaml="finetune:\n  epoch: 2\n",
    ),
    C(
        "ft-yaml-flag-wins-but-yaml-bad",
        "finetune",
        ["--lr", "0.001"],
        "c.yaml: lora_alpha: must be > 0, got 0",
        yaml="lr: 5\nlora_alpha: 0\n",
    ),
    C(
        "ft-yaml-target-modules",
        "finetune",
        [],
        "c.yaml: target_modules: must be a non-empty list of str",
        yaml="target_modules: []\n",
    ),
    # ------------------------------------------------------------ evaluate
    C("ev-no-model", "evaluate", ["--split", "$DS/split.json", "--out", "$OUT"], "--model is required", base=False),
    C(
        "ev-model-missing",
        "evaluate",
        ["--model", "./no-such-model"],
        "no folder ./no-such-model, and ./no-such-model is not a hub id",
    ),
    C(
        "ev-model-offline",
        "evaluate",
        ["--model", "google/not-cached-q2g"],
        "google/not-cached-q2g is not in the local hub cache and the hub is offline",
        env={"HF_HUB_OFFLINE": "1"},
    ),
    C("ev-nothing", "evaluate", ["--no-math", "--no-ppl"], "--no-math and --no-ppl leave nothing to evaluate"),
    C("ev-split-missing", "evaluate", ["--split", "$TMP/split.json"], "$TMP/split.json: split manifest not found"),
    C(
        "ev-holdout-changed",
        "evaluate",
        ["--split", "$TMP/ds/split.json"],
        "$TMP/ds/holdout.jsonl does not match $TMP/ds/split.json",
        files={"ds/split.json": "@split.json", "ds/holdout.jsonl": jl(TRACE)},
    ),
    C(
        "ev-holdout-is-a-folder",
        "evaluate",
        ["--split", "$TMP/ds/split.json"],
        "$TMP/ds/holdout.jsonl: cannot be read (Is a directory)",
        files={"ds/split.json": "@split.json", "ds/holdout.jsonl/x": "not a file"},
    ),
    C(
        "ev-adapter-missing",
        "evaluate",
        ["--adapter", "$TMP/adapter"],
        "--adapter $TMP/adapter: no such folder",
    ),
    C(
        "ev-out-is-file",
        "evaluate",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C("ev-eval-limit-0", "evaluate", ["--eval-limit", "0"], "--eval-limit: must be >= 1, got 0"),
    C("ev-batch-0", "evaluate", ["--eval-batch-size", "0"], "--eval-batch-size: must be >= 1, got 0"),
    C("ev-ppl-length-1", "evaluate", ["--ppl-max-length", "1"], "--ppl-max-length: must be >= 2, got 1"),
    C(
        "ev-precision-fp16-cpu",
        "evaluate",
        ["--precision", "fp16", "--device", "cpu"],
        "--precision fp16 needs a CUDA GPU",
    ),
    C(
        "ev-yaml-unknown",
        "evaluate",
        [],
        "c.yaml: unknown option 'modle' for q2g evaluate (did you mean 'model'?)",
        yaml="modle: x\n",
    ),
    C(
        "ev-yaml-precision",
        "evaluate",
        [],
        "c.yaml: evaluate.precision: 'bf-16' is not one of auto, bf16, fp16, fp32",
        yaml="evaluate:\n  precision: bf-16\n",
    ),
    C(
        "ev-yaml-ppl-stride",
        "evaluate",
        ["--model", "$MODEL", "--split", "$DS/split.json", "--ppl-stride", "16"],
        ("--ppl-stride (16) must be smaller than --ppl-max-length (8) (set at $TMP/c.yaml: ppl_max_length)",),
        yaml="ppl_max_length: 8\n",
        base=False,
    ),
    # ------------------------------------------------------------ merge
    C("mg-no-adapter", "merge", ["--out", "$OUT"], "--adapter is required", base=False),
    C("mg-no-out", "merge", ["--adapter", "$ADAPTER"], "--out is required", base=False),
    C("mg-adapter-missing", "merge", ["--adapter", "$TMP/nothing"], "--adapter $TMP/nothing: no such folder"),
    C(
        "mg-adapter-not-lora",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a: no adapter_config.json",
        files={"a/model.safetensors": "not an adapter"},
    ),
    C(
        "mg-adapter-config-bad",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: not valid JSON",
        files={"a/adapter_config.json": "{not json"},
    ),
    C(
        "mg-adapter-base-missing",
        "merge",
        ["--adapter", "$TMP/a"],
        "no folder $TMP/base-gone, and $TMP/base-gone is not a hub id",
        files={"a/adapter_config.json": json.dumps({"base_model_name_or_path": "$TMP/base-gone"})},
    ),
    C(
        "mg-base-model-missing",
        "merge",
        ["--base-model", "./no-such-base"],
        "no folder ./no-such-base, and ./no-such-base is not a hub id",
    ),
    C("mg-precision", "merge", ["--precision", "fp16"], "--precision: 'fp16' is not one of bf16, fp32"),
    C("mg-atol-neg", "merge", ["--atol", "-1"], "--atol: must be >= 0, got -1.0"),
    C(
        "mg-out-is-file",
        "merge",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "mg-out-holds-other-files",
        "merge",
        [],
        "--out $OUT holds other files and no merge_check.json; refusing to replace it",
        files={"out/thesis.tex": "years of work\n"},
    ),
    C("mg-device", "merge", ["--device", "tpu0"], "--device tpu0: not a device"),
    # ------------------------------------------------------------ run (one YAML for the pipeline)
    C(
        "run-finetune-epochs",
        "run",
        [],
        "c.yaml: finetune.epochs: must be > 0, got -2",
        yaml=run_yaml(finetune="  epochs: -2\n"),
    ),
    C(
        "run-finetune-on-forgetting",
        "run",
        [],
        ("c.yaml: finetune.on_forgetting: 'stp' is not one of flag, stop", "did you mean 'stop'?"),
        yaml=run_yaml(finetune="  on_forgetting: stp\n"),
    ),
    C(
        "run-finetune-precision",
        "run",
        [],
        "c.yaml: finetune.precision: 'bf-16' is not one of",
        yaml=run_yaml(finetune="  precision: bf-16\n"),
    ),
    C(
        "run-generate-holdout",
        "run",
        [],
        "c.yaml: generate.holdout_fraction: must be <= 0.9, got 1.5",
        yaml=run_yaml(generate="  holdout_fraction: 1.5\n"),
    ),
    C(
        "run-generate-string-int",
        "run",
        [],
        "c.yaml: generate.limit: must be an int, got 'ten'",
        yaml=run_yaml(generate="  limit: ten\n"),
    ),
    C(
        "run-unknown-top",
        "run",
        [],
        "c.yaml: unknown top-level key(s) ['evaluat']",
        yaml=run_yaml(top="evaluat: {}\n"),
    ),
    C(
        "run-unknown-stage-key",
        "run",
        [],
        ("c.yaml: unknown option 'finetune.epoch'", "did you mean 'epochs'?"),
        yaml=run_yaml(finetune="  epoch: 2\n"),
    ),
    C(
        "run-section-not-mapping",
        "run",
        [],
        "c.yaml: finetune: must be a mapping of option: value, got int",
        yaml="out: x\ngenerate:\n  backend: reference\nfinetune: 3\n",
    ),
    C(
        "run-out-not-string",
        "run",
        ["--config", "$YAML"],
        "c.yaml: out: must be a folder name, got 5",
        yaml="out: 5\ngenerate:\n  backend: reference\n",
        base=False,
    ),
    C(
        "run-duplicate-section",
        "run",
        [],
        f"c.yaml:{run_yaml().count(chr(10)) + 1}: duplicate key 'finetune'",
        yaml=run_yaml() + "finetune:\n  epochs: 3\n",
    ),
    C(
        "run-config-missing",
        "run",
        ["--config", "$TMP/none.yaml"],
        "config $TMP/none.yaml not found (shipped configs:",
        base=False,
    ),
    C(
        "run-base-model-missing",
        "run",
        [],
        "no folder $TMP/gone, and $TMP/gone is not a hub id",
        yaml=run_yaml().replace("$MODEL", "$TMP/gone"),
    ),
    C(
        "run-data-dir-missing",
        "run",
        [],
        "data dir $TMP/nowhere does not exist",
        yaml=run_yaml().replace("  data_dir: packaged\nfinetune", "  data_dir: $TMP/nowhere\nfinetune"),
    ),
    C(
        "run-out-is-file",
        "run",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        yaml=run_yaml(),
        files={"f.txt": "keep me\n"},
    ),
    C("run-yaml-list", "run", [], "c.yaml: expected a mapping of option: value", yaml="- generate\n"),
]
CASES += [Case(**row) for row in TRUST_ROWS]  # issue 26's kinds (tests/trust_cases.py)


# ---------------------------------------------------------------- fixtures and the runner


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=3)


@pytest.fixture(scope="module")
def adapter(tiny_gemma_dir, tmp_path_factory):
    """An untrained LoRA adapter of the tiny Gemma (merge only needs its files)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gemma_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    model.save_pretrained(out)
    return out


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert {c.cmd for c in CASES} == set(BASE)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, dataset, tiny_gemma_dir, adapter, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # $OUT before $TMP: it is a path inside it
    subs = {
        "$OUT": str(work / "out"),
        "$TMP": str(work),
        "$DS": str(dataset),
        "$MODEL": str(tiny_gemma_dir),
        "$ADAPTER": str(adapter),
        "$YAML": str(work / "c.yaml"),
    }
    at = {
        n: (dataset / c[1:]).read_text() if isinstance(c, str) and c.startswith("@") else c
        for n, c in case.files.items()
    }
    write_files(work, at, subs)
    argv = [fill(a, subs) for a in (BASE[case.cmd] if case.base else []) + case.argv]
    if case.yaml is not None:
        text = case.yaml if isinstance(case.yaml, bytes) else fill(case.yaml, subs).encode()
        (work / "c.yaml").write_bytes(text)
        if "--config" not in argv:
            argv += ["--config", subs["$YAML"]]
    before = snapshot(tmp_path, dataset, tiny_gemma_dir, adapter)

    code = cli.call(case.cmd, argv)

    after = snapshot(tmp_path, dataset, tiny_gemma_dir, adapter)
    assert_refused(code, capsys.readouterr().err, case.code, case.msg, subs, before, after)


# ---------------------------------------------------------------- the model-name check on its own


def fake_hub_cache(root: Path, repo_id: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/config.json}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    return root


def test_model_names(tmp_path, monkeypatch, tiny_gemma_dir):
    from huggingface_hub import constants

    from q2g import models
    from q2g.errors import BadInput

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", "org/cached")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check_model_name(str(tiny_gemma_dir))  # a model folder
    models.check_model_name("org/cached")  # in the cache: fine offline
    for name in ("./x", "/no/such/dir", "~/no-such-q2g-model", "a/b/c", "bad name!", "org/-x"):
        with pytest.raises(BadInput, match="is not a hub id"):
            models.check_model_name(name)
    with pytest.raises(BadInput, match="org/other is not in the local hub cache and the hub is offline"):
        models.check_model_name("org/other")

    # Not marked offline, but the hub does not answer (a closed local port: refused at once).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(BadInput, match="org/other is not in the local hub cache and the hub is offline"):
        models.check_model_name("org/other")
    models.check_model_name("org/cached")
