"""Bad input to `q2g evaluate` and `q2g merge`, round 3 (issue 20), in the style of test_bad_input.py:
exit 2, a one-line message naming the flag, file or field, and nothing written. Kinds: a selection
that selects nothing, damaged or foreign adapters, vLLM missing, an --out that cannot be a folder or
that holds the merge's own input. Then the non-finite metrics (RunFailed, exit 1), the MATH
answer-format rate, and lm-eval's protocols, which have no stride.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from refusal import assert_refused, fill, snapshot, write_files
from test_bad_input import BASE, C, adapter, dataset  # noqa: F401  (fixtures)

from q2g import cli, forgetting, models
from q2g.data import loaders, splits
from q2g.errors import ConfigError, RunFailed
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.core import evaluate_model
from q2g.evaluation.pass_at_1 import states_answer
from q2g.report import write_report

SPLIT_EMPTY = json.dumps({"version": 1, "settings": {}, "holdout": []})
WIKI = "ds/wikitext/wiki.test.raw"


def holdout_without_solutions() -> dict:
    """A split whose one holdout problem has no reference_solution."""
    rec = {"id": "h1", "problem": "What is 2+3?", "answer": "5", "source": "gsm8k"}
    split = {"version": 1, "settings": {}, "holdout": [{"id": "h1", "hash": splits.problem_hash(rec["problem"])}]}
    return {"ds/split.json": json.dumps(split), "ds/holdout.jsonl": json.dumps(rec) + "\n"}


def torch_bytes(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def adapter_files(folder: str, config: dict | str | None = None, weights: bytes | None = b"@") -> dict:
    """An adapter folder: the fixture's adapter_config.json (or `config`) and weights (b"@": the fixture's)."""
    files = {f"{folder}/adapter_config.json": "@@adapter_config.json" if config is None else config}
    if isinstance(config, dict):
        files[f"{folder}/adapter_config.json"] = json.dumps(config)
    if weights is not None:
        files[f"{folder}/adapter_model.safetensors"] = "@@adapter_model.safetensors" if weights == b"@" else weights
    return files


SHAPE = ("has shape [2, 64], but", "of $MODEL has 32 inputs", "an adapter of another model")
ARCH = ("transformer.h.0.attn.c_attn, which $MODEL does not have", "adapter_model.safetensors")

CASES = [
    # ------------------------------------------------------------ evaluate: a selection that selects nothing
    C(
        "ev-holdout-empty",
        "evaluate",
        ["--split", "$TMP/ds/split.json"],
        "$TMP/ds/split.json: the holdout has no problems (nothing to evaluate on",
        files={"ds/split.json": SPLIT_EMPTY, "ds/holdout.jsonl": ""},
    ),
    C(
        "ev-holdout-empty-with-limit",
        "evaluate",
        ["--split", "$TMP/ds/split.json", "--eval-limit", "50"],
        "the holdout has no problems (nothing to evaluate on",
        files={"ds/split.json": SPLIT_EMPTY, "ds/holdout.jsonl": "\n"},
    ),
    C(
        "ev-heldout-no-solution",
        "evaluate",
        ["--split", "$TMP/ds/split.json", "--heldout-loss-limit", "5"],
        "--heldout-loss-limit 5: no problem of $TMP/ds/split.json's holdout has a reference_solution",
        files=holdout_without_solutions(),
    ),
    C(
        "ev-wikitext-empty",
        "evaluate",
        ["--no-math", "--data-dir", "$TMP/ds"],
        "--data-dir $TMP/ds: its WikiText (wikitext/wiki.test.raw) holds no text to score",
        files={WIKI: ""},
    ),
    C("ev-wikitext-blank", "evaluate", ["--no-math", "--data-dir", "$TMP/ds"], "holds no text", files={WIKI: "\n \n"}),
    C(
        "ev-ppl-tokens-score-none",
        "evaluate",
        ["--model", "$QWEN", "--no-math", "--ppl-max-tokens", "1"],
        ("WikiText perplexity: 1 token(s) of text leave none to score (--ppl-max-tokens 1",),
    ),
    # ------------------------------------------------------------ evaluate: damaged or foreign adapters
    C(
        "ev-adapter-not-json",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: not valid JSON",
        files=adapter_files("a", "{not json"),
    ),
    C(
        "ev-adapter-not-utf8",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: not valid JSON",
        files={"a/adapter_config.json": b"\xff\xfe{"},
    ),
    C(
        "ev-adapter-config-list",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: expected a JSON object, got list",
        files=adapter_files("a", "[1, 2]"),
    ),
    C(
        "ev-adapter-r-text",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: r must be a positive integer (the LoRA rank), got 'sixteen'",
        files=adapter_files("a", {"r": "sixteen", "base_model_name_or_path": "x"}),
    ),
    C(
        "ev-adapter-no-weights",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a: no adapter weights (adapter_model.safetensors or adapter_model.bin)",
        files=adapter_files("a", weights=None),
    ),
    C(
        "ev-adapter-weights-damaged",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_model.safetensors: not a readable safetensors file",
        files=adapter_files("a", weights=b"\x00\x01 not safetensors"),
    ),
    C("ev-adapter-foreign-size", "evaluate", ["--adapter", "$WIDE"], SHAPE),
    C("ev-adapter-foreign-arch", "evaluate", ["--adapter", "$GPT2"], ARCH),
    C(
        "ev-adapter-is-file",
        "evaluate",
        ["--adapter", "$TMP/f.txt"],
        "--adapter $TMP/f.txt: no such folder",
        files={"f.txt": "x"},
    ),
    # ------------------------------------------------------------ evaluate: optional parts, paths
    C(
        "ev-vllm-missing",
        "evaluate",
        ["--eval-backend", "vllm"],
        "--eval-backend vllm needs the vllm package, which is not installed: pip install 'q2g[vllm]'",
    ),
    C(
        "ev-vllm-missing-yaml",
        "evaluate",
        [],
        "pip install 'q2g[vllm]'",
        yaml="evaluate:\n  eval_backend: vllm\n",
    ),
    C(
        "ev-out-parent-is-file",
        "evaluate",
        ["--out", "$TMP/f.txt/eval"],
        "--out $TMP/f.txt/eval: $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "ev-out-name-too-long",
        "evaluate",
        ["--out", "$TMP/" + "o" * 300],
        ("--out $TMP/ooo", "bytes (the file system allows"),
    ),
    # ------------------------------------------------------------ merge: damaged or foreign adapters
    C(
        "mg-adapter-config-list",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: expected a JSON object, got list",
        files=adapter_files("a", "[]"),
    ),
    C(
        "mg-base-number",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: base_model_name_or_path must be a model name (a string), got 7",
        files=adapter_files("a", {"base_model_name_or_path": 7}),
    ),
    C(
        "mg-base-list",
        "merge",
        ["--adapter", "$TMP/a"],
        "base_model_name_or_path must be a model name (a string), got ['m']",
        files=adapter_files("a", {"base_model_name_or_path": ["m"]}),
    ),
    C(
        "mg-base-missing-field",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: base_model_name_or_path is missing; pass --base-model",
        files=adapter_files("a", {"r": 2}),
    ),
    C(
        "mg-base-empty",
        "merge",
        ["--adapter", "$TMP/a"],
        "base_model_name_or_path is missing",
        files=adapter_files("a", {"base_model_name_or_path": ""}),
    ),
    C(
        "mg-r-zero",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_config.json: r must be a positive integer (the LoRA rank), got 0",
        files=adapter_files("a", {"r": 0, "base_model_name_or_path": "$MODEL"}),
    ),
    C(
        "mg-adapter-no-weights",
        "merge",
        ["--adapter", "$TMP/a"],
        "$TMP/a: no adapter weights",
        files=adapter_files("a", {"base_model_name_or_path": "$MODEL", "r": 2}, weights=None),
    ),
    C(
        "mg-adapter-weights-damaged",
        "merge",
        ["--adapter", "$TMP/a", "--base-model", "$MODEL"],
        "$TMP/a/adapter_model.safetensors: not a readable safetensors file",
        files=adapter_files("a", weights=b"{}"),
    ),
    C("mg-adapter-foreign-size", "merge", ["--adapter", "$WIDE", "--base-model", "$MODEL"], SHAPE),
    C("mg-adapter-foreign-arch", "merge", ["--adapter", "$GPT2", "--base-model", "$MODEL"], ARCH),
    # ------------------------------------------------------------ merge: an --out that would replace its input
    C("mg-out-is-adapter", "merge", ["--out", "$ADAPTER"], "--out $ADAPTER is the --adapter $ADAPTER"),
    C(
        "mg-out-holds-adapter",
        "merge",
        ["--adapter", "$TMP/ck/final", "--out", "$TMP/ck", "--base-model", "$MODEL"],
        "--out $TMP/ck holds the --adapter $TMP/ck/final: q2g never writes onto what it reads",
        files={**adapter_files("ck/final"), "ck/config.json": "{}"},
    ),
    C("mg-adapter-name-too-long", "merge", ["--adapter", "$TMP/" + "a" * 300], ("--adapter $TMP/aaa", "too long")),
    C(
        "mg-out-name-too-long",
        "merge",
        ["--out", "$TMP/" + "m" * 300],
        ("--out $TMP/mmm", "bytes (the file system allows"),
    ),
    C(
        "mg-out-parent-is-file",
        "merge",
        ["--out", "$TMP/f.txt/merged"],
        "--out $TMP/f.txt/merged: $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),  # ------------------------------------------------------------ foreign .bin adapters (issue 26)
    C(
        "ev-adapter-bin-not-torch",
        "evaluate",
        ["--adapter", "$TMP/a"],
        "$TMP/a/adapter_model.bin: not a readable PyTorch state dict",
        files={
            "a/adapter_config.json": "@@adapter_config.json",
            "a/adapter_model.bin": b"PK\x03\x04 not a torch file",
        },
    ),
    C(
        "mg-adapter-bin-not-tensors",
        "merge",
        ["--adapter", "$TMP/a", "--base-model", "$MODEL"],
        "$TMP/a/adapter_model.bin: not a state dict of named tensors",
        files={"a/adapter_config.json": "@@adapter_config.json", "a/adapter_model.bin": torch_bytes({"x": [1, 2]})},
    ),
]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, tiny_gemma_dir):
    """LoRA adapters of other models: a Qwen2 twice as wide, and a GPT-2 (other module names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("foreign")
    wide = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "wide")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(
        root / "gpt2"
    )
    return {"$WIDE": str(root / "wide"), "$GPT2": str(root / "gpt2")}


def test_the_corpus_covers_both_commands():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.cmd for c in CASES} == {"evaluate", "merge"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_eval(case, tmp_path, dataset, tiny_gemma_dir, tiny_qwen_dir, adapter, foreign, capsys, monkeypatch):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM absent, whatever this machine has
    subs = {
        "$OUT": str(work / "out"),
        "$TMP": str(work),
        "$DS": str(dataset),
        "$MODEL": str(tiny_gemma_dir),
        "$QWEN": str(tiny_qwen_dir),
        "$ADAPTER": str(adapter),
        "$YAML": str(work / "c.yaml"),
        **foreign,
    }
    at = {n: (Path(adapter) / c[2:]).read_bytes() if str(c).startswith("@@") else c for n, c in case.files.items()}
    write_files(work, at, subs)
    argv = [fill(a, subs) for a in BASE[case.cmd] + case.argv]
    if case.yaml is not None:
        (work / "c.yaml").write_text(fill(case.yaml, subs))
        argv += ["--config", subs["$YAML"]]
    roots = (tmp_path, dataset, tiny_gemma_dir, tiny_qwen_dir, adapter, *map(Path, foreign.values()))
    before = snapshot(*roots)

    code = cli.call(case.cmd, argv)

    assert_refused(code, capsys.readouterr().err, case.code, case.msg, subs, before, snapshot(*roots))


# ---------------------------------------------------------------- lm-eval's protocols have no stride


@pytest.mark.parametrize("protocol", ["lm-eval", "lm-eval-raw"])
def test_lm_eval_protocols_take_any_max_length(protocol, tiny_gemma_dir, tmp_path):
    assert EvalConfig(ppl_protocol=protocol, ppl_max_length=512).check() == []
    with pytest.raises(ConfigError, match=r"--ppl-stride \(512\) must be smaller than --ppl-max-length \(512\)"):
        EvalConfig(ppl_protocol="q2g", ppl_max_length=512)  # q2g's stride still applies
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_gemma_dir), "--no-math", "--data-dir", "packaged", "--out", str(out)]
    argv += ["--ppl-protocol", protocol, "--ppl-max-length", "512", "--ppl-max-tokens", "64"]
    assert cli.call("evaluate", argv) == 0
    ppl = json.loads((out / "eval.json").read_text())["ppl"]
    assert ppl["protocol"] == protocol and ppl["stride"] is None and ppl["max_length"] == 512


def test_stride_help_says_it_is_for_the_q2g_protocol_only(capsys):
    assert cli.call("evaluate", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "q2g protocol only: lm-eval's windows are disjoint and have no stride" in text


# ---------------------------------------------------------------- non-finite metrics stop the run


def test_forgetting_refuses_non_finite_perplexities():
    with pytest.raises(RunFailed, match=r"the baseline WikiText perplexity is nan, not a number"):
        forgetting.relative_change(float("nan"), 20.0)
    with pytest.raises(RunFailed, match=r"the baseline WikiText perplexity is inf"):
        forgetting.relative_change(float("inf"), 20.0)
    for current in (float("nan"), float("inf")):
        with pytest.raises(RunFailed, match=rf"WikiText perplexity is {current} after training \(baseline 20\)"):
            forgetting.relative_change(20.0, current)
    for change in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(RunFailed, match="not a number: the run stops"):
            forgetting.over_budget(change, 0.05)
        with pytest.raises(RunFailed):
            forgetting.verdict(change, 0.05)
    assert forgetting.over_budget(None, 0.05) is False and forgetting.relative_change(20.0, 21.0) == pytest.approx(
        0.05
    )


def test_report_reads_a_nan_row_as_not_available(tmp_path):
    rows = [
        {"epoch": 0, "pass@1": 0.1, "token_perplexity": float("nan"), "flagged": False},
        {"epoch": 1, "pass@1": 0.2, "token_perplexity": 20.0, "flagged": False, "adapter": "epoch-1"},
    ]
    text = write_report(tmp_path, rows, {"budget": 0.05, "policy": "flag", "final": {"epoch": 1}}).read_text()
    assert "nan%" not in text and "| WikiText perplexity (token) |" in text


def nan_logits(monkeypatch, value=float("nan")):
    """Every Gemma 3 decoder forward returns non-finite hidden states, so every logit (the full
    logits of decoding and the head-on-hidden-states path of the loss and perplexity) is non-finite:
    a diverged or broken model."""
    from transformers import Gemma3TextModel

    forward = Gemma3TextModel.forward

    def broken(self, *a, **k):
        out = forward(self, *a, **k)
        out.last_hidden_state = torch.full_like(out.last_hidden_state, value)
        return out

    monkeypatch.setattr(Gemma3TextModel, "forward", broken)


RECORDS = [
    {
        "id": "a",
        "source": "gsm8k",
        "subject": None,
        "problem": "What is 2+3?",
        "answer": "5",
        "reference_solution": "#### 5",
    }
]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_evaluate_model_stops_on_non_finite_metrics(tiny_gemma_dir, monkeypatch, value):
    model, tok = models.load_model(str(tiny_gemma_dir)), models.load_tokenizer(str(tiny_gemma_dir), "left")
    nan_logits(monkeypatch, value)
    cfg = EvalConfig(eval_max_new_tokens=2, ppl_max_tokens=32, ppl_max_length=32, ppl_stride=16)
    with pytest.raises(RunFailed, match=r"evaluation gave a non-finite held-out loss (nan|inf) over \d+ tokens"):
        evaluate_model(model, tok, RECORDS, None, cfg, progress=False)
    with pytest.raises(RunFailed, match=r"non-finite WikiText perplexity (nan|inf) over 32 tokens"):
        evaluate_model(model, tok, None, loaders.load_wikitext("packaged"), cfg, progress=False)


def test_evaluate_model_stops_on_an_overflowing_perplexity(tiny_gemma_dir, monkeypatch):
    """Finite logits whose NLL overflows exp(): math.exp would raise OverflowError; it is inf, refused."""
    from q2g import scoring

    model, tok = models.load_model(str(tiny_gemma_dir)), models.load_tokenizer(str(tiny_gemma_dir))
    monkeypatch.setattr(scoring, "batch_nll", lambda model, batch: 1e6)
    cfg = EvalConfig(ppl_max_tokens=32, ppl_max_length=32, ppl_stride=16)
    with pytest.raises(RunFailed, match="non-finite WikiText perplexity inf"):
        evaluate_model(model, tok, None, loaders.load_wikitext("packaged"), cfg, progress=False)


def test_evaluate_cli_exits_1_on_nan_and_writes_nothing(tiny_gemma_dir, tmp_path, monkeypatch, capsys):
    nan_logits(monkeypatch)
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_gemma_dir), "--no-math", "--data-dir", "packaged", "--out", str(out)]
    argv += ["--ppl-max-tokens", "32", "--ppl-max-length", "32", "--ppl-stride", "16"]
    assert cli.call("evaluate", argv) == 1
    err = capsys.readouterr().err
    assert "non-finite WikiText perplexity nan" in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- the MATH answer-format rate


def test_math_format_rate_counts_stated_answers_only():
    from q2g.answers.extract import extract_answer_with_rule

    def row(text, source="math"):
        extracted, rule = extract_answer_with_rule(text, source)
        return {"extracted": extracted, "rule": rule}

    unstated = [
        "We add 12 and 7 to get 19 apples.",
        "So x = 4 and then y = 9",
        "The sum of $3$ and $4$ is $7$ here",
        "Roughly 3.14 times 2",
    ]
    for text in unstated:
        r = row(text)
        assert r["extracted"] is not None and r["rule"] in ("mv_expr", "mv_latex"), r  # math-verify reads a number
        assert not states_answer(r), text
    stated = ["So the final answer is $19$.", "Thus $\\boxed{19}$.", "The answer is 19.", "Answer: 19"]
    for text in stated:
        assert states_answer(row(text)), text
    assert not states_answer(row("She has 12 then 7, 19 total", "gsm8k"))  # GSM8K's last number
    assert states_answer(row("12 + 7 = 19\n#### 19", "gsm8k"))
    assert math.isclose(sum(states_answer(row(t)) for t in unstated + stated) / 8, 0.5)
