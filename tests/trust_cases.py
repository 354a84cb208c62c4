"""Corpus rows for issue 26 (trust by design), one or more per kind of input the issue names; run by
tests/test_bad_input.py's runner (exit 2, the message, no traceback, nothing written or changed).

The kinds: outputs onto inputs or special files; config keys in two spellings, beside the sections,
not text, nested too deep; options out of bounds; input records that are blank, duplicated, of the
wrong type or nested too deep; URLs that cannot be right; optional parts not installed.
"""

from refusal import TRACE, jl

from q2g.data.loaders import packaged_data_dir


def C(id, cmd, argv=(), msg=(), code=2, **kw) -> dict:
    """A row as test_bad_input.Case's fields (that module builds the Case)."""
    return dict(id=id, cmd=cmd, argv=list(argv), code=code, msg=(msg,) if isinstance(msg, str) else tuple(msg), **kw)


def traces(*rows) -> dict:
    return {"ds/traces.jsonl": jl(*rows), "ds/split.json": "@split.json", "ds/holdout.jsonl": "@holdout.jsonl"}


DS = ["--traces", "$TMP/ds"]
HOLDOUT = {"id": "h1", "problem": "What is 1+1?", "answer": "2", "source": "gsm8k"}
DEEP = '{"id": "t9", "problem": ' + "[" * 5000 + "]" * 5000 + "}"
PACKAGED = str(packaged_data_dir())

ROWS = [
    # ------------------------------------------------------------ outputs onto inputs, special files
    C("t-gen-out-empty", "generate", ["--out", ""], "--out: an empty path"),
    C("t-gen-out-unset-var", "generate", ["--out", "$Q2G_NO_SUCH_VAR/x"], "$Q2G_NO_SUCH_VAR is not set"),
    C("t-gen-out-dev-null", "generate", ["--out", "/dev/null"], "--out /dev/null is a device or special file"),
    C("t-gen-out-in-data-dir", "generate", ["--out", PACKAGED + "/x"], f"lies inside the --data-dir {PACKAGED}"),
    C("t-gen-out-yaml-empty", "generate", [], "c.yaml: out: an empty path", yaml='out: ""\n', base=False),
    C("t-ft-out-is-model", "finetune", ["--out", "$MODEL"], "--out $MODEL is the --base-model $MODEL"),
    C("t-ft-out-is-traces", "finetune", ["--out", "$DS"], "--out $DS is the --traces $DS"),
    C("t-ft-out-in-traces", "finetune", ["--out", "$DS/ck"], "--out $DS/ck lies inside the --traces $DS"),
    C("t-ft-out-in-model", "finetune", ["--out", "$MODEL/ck"], "--out $MODEL/ck lies inside the --base-model $MODEL"),
    C("t-ft-out-dev-null", "finetune", ["--out", "/dev/null"], "--out /dev/null is a device or special file"),
    C("t-ft-out-empty", "finetune", ["--out", ""], "--out: an empty path"),
    C("t-ev-out-is-model", "evaluate", ["--out", "$MODEL"], "--out $MODEL is the --model $MODEL"),
    C("t-ev-out-is-split", "evaluate", ["--out", "$DS/split.json"], "--out $DS/split.json is the --split"),
    C("t-mg-out-is-base", "merge", ["--base-model", "$MODEL", "--out", "$MODEL"], "--out $MODEL is the base model"),
    C("t-mg-out-dev-null", "merge", ["--out", "/dev/null"], "--out /dev/null is a device or special file"),
    C("t-run-out-empty", "run", ["--out", ""], "--out: an empty path", yaml="out: x\ngenerate:\n  limit: 2\n"),
    # ------------------------------------------------------------ config: spellings, sections, keys, nesting
    C(
        "t-yaml-two-spellings",
        "generate",
        [],
        "c.yaml:2: duplicate key 'holdout-fraction' (also given as 'holdout_fraction')",
        yaml="holdout_fraction: 0.2\nholdout-fraction: 0.3\n",
    ),
    C(
        "t-yaml-two-spellings-in-section",
        "finetune",
        [],
        "duplicate key 'max-seq-len' (also given as 'max_seq_len')",
        yaml="finetune:\n  max_seq_len: 64\n  max-seq-len: 32\n",
    ),
    C(
        "t-yaml-key-beside-sections",
        "finetune",
        [],
        "top-level key 'epochs' beside the stage sections; it belongs in the finetune: section",
        yaml="epochs: 3\nfinetune:\n  lora_r: 4\n",
    ),
    C("t-yaml-int-key", "generate", [], "c.yaml:1: a key must be text, got int 1", yaml="1: x\n"),
    C("t-yaml-complex-key", "generate", [], "c.yaml:1: a key must be text, not a sequence", yaml="? [a, b]\n: 1\n"),
    C("t-yaml-deep", "generate", [], "c.yaml: nested too deeply", yaml="a: " + "[" * 3000 + "]" * 3000 + "\n"),
    C("t-yaml-deep-mapping", "generate", [], "c.yaml: nested too deeply", yaml="a: " + "{b: " * 40 + "1" + "}" * 40),
    C(
        "t-yaml-flat-trainer-kept",
        "finetune",
        [],
        "trainer: weight_decay: must be a finite number, got nan",
        yaml="trainer:\n  weight_decay: .nan\n",
    ),
    C(
        "t-yaml-long-value-cut",
        "generate",
        [],
        "... (100,002 characters)",
        yaml="temperature: " + "x" * 100_000 + "\n",
    ),
    C(
        "t-trainer-arg-broken-yaml",
        "finetune",
        ["--trainer-arg", "warmup_steps=[1, 2"],
        "warmup_steps: the value is not a YAML scalar",
    ),
    C(
        "t-trainer-arg-nan",
        "finetune",
        ["--trainer-arg", "weight_decay=.nan"],
        "--trainer-arg: weight_decay: must be a finite number",
    ),
    C(
        "t-trainer-arg-inf-timeout",
        "finetune",
        ["--trainer-arg", "ddp_timeout=.inf"],
        "ddp_timeout: must be a finite number",
    ),
    C("t-world-size-junk", "finetune", [], "$WORLD_SIZE must be a whole number", env={"WORLD_SIZE": "two"}),
    # ------------------------------------------------------------ bounds
    C("t-gen-seed-neg", "generate", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    C("t-gen-seed-2-32", "generate", ["--seed", str(2**32)], "--seed: must be <= 4294967295"),
    C("t-ft-seed-neg", "finetune", ["--seed", "-5"], "--seed: must be >= 0, got -5"),
    C("t-ev-seed-huge", "evaluate", ["--eval-seed", str(2**40)], "--eval-seed: must be <= 4294967295"),
    C("t-ft-max-steps-0", "finetune", ["--max-steps", "0"], "--max-steps: must be >= 1, or -1 for no limit, got 0"),
    C("t-ft-lora-r-huge", "finetune", ["--lora-r", "1000000"], "--lora-r: must be <= the model's hidden size"),
    C("t-gen-shard-huge", "generate", ["--shard", "0/1000000000"], "1000000000 shards for"),
    C("t-gen-datasets-twice", "generate", ["--datasets", "gsm8k", "gsm8k"], "--datasets: gsm8k given twice"),
    # ------------------------------------------------------------ input records
    C(
        "t-trace-empty-problem",
        "finetune",
        DS,
        "traces.jsonl:1: field 'problem' is blank",
        files=traces({**TRACE, "problem": " "}),
    ),
    C(
        "t-trace-blank-trace",
        "finetune",
        DS,
        "traces.jsonl:1: field 'qwen_trace' is blank",
        files=traces({**TRACE, "qwen_trace": "\n"}),
    ),
    C(
        "t-trace-duplicate-id",
        "finetune",
        DS,
        "traces.jsonl:2: duplicate record (id 't1'; first at line 1)",
        files=traces(TRACE, {**TRACE, "problem": "What is 3+3?"}),
    ),
    C(
        "t-trace-id-list",
        "finetune",
        DS,
        "traces.jsonl:1: field 'id' must be str, got list",
        files=traces({**TRACE, "id": ["t1"]}),
    ),
    C(
        "t-trace-problem-number",
        "finetune",
        DS,
        "traces.jsonl:1: field 'problem' must be str, got int",
        files=traces({**TRACE, "problem": 5}),
    ),
    C("t-trace-deep-json", "finetune", DS, "traces.jsonl:1: JSON nested too deeply", files=traces(DEEP)),
    C(
        "t-trace-nan-answer",
        "finetune",
        DS,
        "traces.jsonl:1: field 'answer' must be a finite number",
        files=traces(
            '{"id": "t1", "problem": "p", "qwen_trace": "t", "answer": NaN, "source": "gsm8k", "validated": true}'
        ),
    ),
    C(
        "t-holdout-blank-problem",
        "evaluate",
        ["--split", "$TMP/ds/split.json"],
        "holdout.jsonl:1: field 'problem' is blank",
        files={"ds/split.json": "@split.json", "ds/holdout.jsonl": jl({**HOLDOUT, "problem": ""})},
    ),
    C(
        "t-holdout-duplicate-id",
        "evaluate",
        ["--split", "$TMP/ds/split.json"],
        "holdout.jsonl:2: duplicate record (id 'h1'",
        files={"ds/split.json": "@split.json", "ds/holdout.jsonl": jl(HOLDOUT, HOLDOUT)},
    ),
    C(
        "t-baseline-from-other-settings",
        "finetune",
        ["--baseline-from", "$TMP/b.json"],
        ("--baseline-from $TMP/b.json was made with other settings (base_model",),
        files={"b.json": '{"settings": {"base_model": "other/model"}, "row": {"epoch": 0}}'},
    ),
    # ------------------------------------------------------------ left over: URLs, optional parts
    C(
        "t-gen-base-url-no-scheme",
        "generate",
        ["--backend", "openai", "--teacher", "m", "--base-url", "localhost:8000/v1"],
        "--base-url: must start with http:// or https://, got 'localhost:8000/v1'",
    ),
    C(
        "t-ft-eval-backend-vllm",
        "finetune",
        ["--eval-backend", "vllm"],
        "--eval-backend vllm needs the vllm package, which is not installed: pip install",
    ),
]
