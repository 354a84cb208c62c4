"""Issue 26's property test: whatever the input, a command succeeds or exits 2 with one line, never a
traceback, and never changes a file it was given to read.

Hypothesis draws random YAML configs (option names in both spellings, sections, stray and non-text
keys, NaN, huge numbers, `~`, unset $VARS, nesting), random JSONL records of the input kinds (traces,
holdout: wrong types, blank text, duplicate ids, deep nesting, broken lines) and random flag values.
Commands run in-process through the CLI entry (`cli.call`). A run that gets past every check is
stopped where the tiny model would load (a sentinel raised by AutoModelForCausalLM.from_pretrained),
which counts as accepted: the property is about what happens before that point. `generate` with the
reference teacher and `export` run to the end. ~1-2 minutes on 2 CPU cores.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, reference_dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from q2g import cli

PACKAGED = REPO / "src" / "q2g" / "assets" / "data"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


class Reached(BaseException):
    """Raised where a model would load: every check before it passed."""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", reached)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("prop-ds"), limit=3)


def digest(*roots: Path) -> dict:
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        found.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths})
    return found


def run(cmd: str, argv: list, capsys, *inputs: Path) -> None:
    """The property: exit 0 or 2 (or reached the model load), one error line, inputs unchanged."""
    before = digest(*inputs)
    try:
        code = cli.call(cmd, [str(a) for a in argv])
    except Reached:
        code = 0
    err = capsys.readouterr().err
    event(f"{cmd} exit {code}")  # (--hypothesis-show-statistics: both outcomes are drawn)
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 2), (code, err[-3000:])
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
        assert len(errors) == 1 and len(errors[0]) < 6000, err[-3000:]
    assert digest(*inputs) == before, "an input was changed"


# ---------------------------------------------------------------- strategies

NAMES = ["seed", "limit", "holdout_fraction", "out", "data_dir", "lora_r", "max_steps", "epochs", "trainer"]
NAMES += ["eval_seed", "shard", "datasets", "base_url", "temperature", "max_seq_len", "base_model", "traces"]
KEYS = st.sampled_from(NAMES + [n.replace("_", "-") for n in NAMES] + ["generate", "finetune", "evaluate", "<<"])
TEXT = st.sampled_from(["", " ", "~", "~/x", "$HOME/x", "$Q2G_UNSET_X/y", "/dev/null", ".nan", "1e-4", "0/2", "gsm8k"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(KEYS | st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
DOCS = st.dictionaries(KEYS | st.text(max_size=6) | st.integers(), VALUES, max_size=5)


def yaml_text(doc) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return "x: 1\n"


RAW_YAML = st.one_of(
    DOCS.map(yaml_text),
    st.text(max_size=80),
    st.integers(1, 3000).map(lambda n: "a: " + "[" * n + "]" * n + "\n"),
    st.just("generate:\n  <<: &d {seed: 3}\n  seed-x: 1\n"),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
FIELD = (
    JSON
    | st.sampled_from(["", " ", "t1", "What is 2+3?", "gsm8k", "math", "5"])
    | st.integers(1, 4000).map(lambda n: [[]] if n < 2 else json.loads("[" * n + "]" * n) if n < 900 else "x" * n)
)
TRACE = st.fixed_dictionaries(
    {},
    optional={k: FIELD for k in ("id", "problem", "qwen_trace", "answer", "source", "validated", "teacher")},
)
VALID = st.builds(
    lambda i, t: {
        "id": f"t{i}",
        "problem": f"What is {i}+3?",
        "qwen_trace": t,
        "answer": "5",
        "source": "gsm8k",
        "validated": True,
    },
    st.integers(0, 3),
    st.text(max_size=10),
)
LINES = st.lists((TRACE | VALID).map(lambda r: json.dumps(r, allow_nan=True)) | st.text(max_size=30), max_size=4)


def deep_safe(line: str) -> str:
    return line.replace("\n", " ")


# ---------------------------------------------------------------- the properties


@settings(max_examples=40, **SETTINGS)
@given(text=RAW_YAML, cmd=st.sampled_from(["generate", "finetune", "evaluate", "export", "merge", "run", "sweep"]))
def test_random_yaml_configs(text, cmd, capsys):
    work = Path(tempfile.mkdtemp(dir="."))
    config = work / "c.yaml"
    config.write_text(text)
    argv = ["--config", config] + (["--out", work / "o"] if cmd not in ("run", "sweep") else [])
    run(cmd, argv, capsys, config)


@settings(max_examples=25, **SETTINGS)
@given(lines=LINES, cmd=st.sampled_from(["export", "finetune"]))
def test_random_trace_records(lines, cmd, dataset, tiny_gemma_dir, capsys):
    work = Path(tempfile.mkdtemp(dir="."))
    ds = work / "ds"
    shutil.copytree(dataset, ds)
    (ds / "traces.jsonl").write_text("".join(deep_safe(line) + "\n" for line in lines))
    if cmd == "export":
        argv = ["--traces", ds, "--format", "messages", "--out", work / "x.jsonl"]
    else:
        argv = ["--base-model", tiny_gemma_dir, "--traces", ds, "--out", work / "ck", "--data-dir", "packaged"]
    run(cmd, argv, capsys, ds, tiny_gemma_dir)


@settings(max_examples=15, **SETTINGS)
@given(rows=st.lists(TRACE, max_size=3))
def test_random_holdout_records(rows, dataset, tiny_gemma_dir, capsys):
    work = Path(tempfile.mkdtemp(dir="."))
    ds = work / "ds"
    shutil.copytree(dataset, ds)
    (ds / "holdout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", tiny_gemma_dir, "--split", ds / "split.json", "--no-ppl", "--out", work / "ev"]
    run("evaluate", argv, capsys, ds, tiny_gemma_dir)


INT_TEXT = st.integers(-(2**40), 2**40).map(str) | st.sampled_from(["0", "1", "-1", "x", "", "1e3", "nan"])
GEN_FLAGS = st.dictionaries(
    st.sampled_from(["--seed", "--limit", "--holdout-fraction", "--shard", "--batch-size", "--temperature", "--out"]),
    INT_TEXT
    | TEXT
    | st.floats(allow_nan=True).map(str)
    | st.tuples(st.integers(-2, 5), st.integers(-2, 10**9)).map(lambda t: f"{t[0]}/{t[1]}"),
    max_size=3,
)


@settings(max_examples=25, **SETTINGS)
@given(flags=GEN_FLAGS, datasets=st.lists(st.sampled_from(["gsm8k", "math", "x"]), min_size=1, max_size=3))
def test_random_generate_flags(flags, datasets, capsys):
    work = Path(tempfile.mkdtemp(dir="."))
    argv = ["--backend", "reference", "--data-dir", "packaged", "--limit", "2", "--out", work / "g"]
    argv += ["--datasets", *datasets] + [a for k, v in flags.items() for a in (k, v)]
    run("generate", argv, capsys, PACKAGED)


FT_FLAGS = st.dictionaries(
    st.sampled_from(["--seed", "--lora-r", "--max-steps", "--epochs", "--max-seq-len", "--trainer-arg", "--out"]),
    INT_TEXT | TEXT | st.sampled_from(["weight_decay=.nan", "ddp_timeout=.inf", "warmup_steps=[1", "x=1", "=2"]),
    max_size=3,
)


@settings(max_examples=15, **SETTINGS)
@given(flags=FT_FLAGS)
def test_random_finetune_flags(flags, dataset, tiny_gemma_dir, capsys):
    work = Path(tempfile.mkdtemp(dir="."))
    argv = ["--base-model", tiny_gemma_dir, "--traces", dataset, "--out", work / "ck", "--data-dir", "packaged"]
    argv += [a for k, v in flags.items() for a in (k, v)]
    run("finetune", argv, capsys, dataset, tiny_gemma_dir)


def test_the_sentinel_is_reached_by_valid_input(dataset, tiny_gemma_dir, capsys):
    """The stand-in for a model load is where a valid finetune gets to (so `Reached` means accepted)."""
    argv = ["--base-model", tiny_gemma_dir, "--traces", dataset, "--out", Path("ck"), "--data-dir", "packaged"]
    with pytest.raises(Reached):
        cli.call("finetune", [str(a) for a in argv])
    assert os.path.exists("ck/config.json")  # every check passed, the run began
