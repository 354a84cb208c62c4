"""q2g.evaluation: sliding-window perplexity against direct computations, pass@1 bookkeeping
with scripted generations, the fixed eval subset, and the `q2g evaluate` command end to end."""

import json
import math
import random
import re

import pytest
import torch

from q2g import cli, decoding, models, prompts
from q2g.data import loaders, splits
from q2g.data.sources import source_key
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.core import metrics_row, select_eval_subset
from q2g.evaluation.pass_at_1 import math_pass_at_1
from q2g.evaluation.perplexity import perplexity
from q2g.scoring import plan_windows

TEXT = (
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . He had a "
    "guest @-@ starring role on the television series The Bill in 2000 . This was followed by a starring "
    "role in the play Herons written by Simon Stephens , which was performed in 2001 at the Royal Court "
    "Theatre . \n = = Career = = \n In 2006 , Boulter starred alongside Whishaw in the play Citizenship "
    "written by Mark Ravenhill . He appeared on a 2006 episode of the television series , Doctors .\n"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP spin-waits make
    their 32-wide matmuls ~50x slower: run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return models.load_model(str(tiny_gemma_dir)), models.load_tokenizer(str(tiny_gemma_dir))


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return models.load_model(str(tiny_qwen_dir)), models.load_tokenizer(str(tiny_qwen_dir))


@pytest.fixture(params=["gemma", "qwen"])
def model_tok(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- perplexity


def test_plan_windows_numbers():
    # bos: 4 text tokens per window of 5; every token scored, each exactly once.
    assert plan_windows(10, 5, 2, bos=True) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # no bos: 5 text tokens per window; token 0 is context only.
    assert plan_windows(10, 5, 2, bos=False) == [(0, 5, 1), (2, 7, 5), (4, 9, 7), (6, 10, 9)]
    assert plan_windows(3, 1024, 512, bos=True) == [(0, 3, 0)]
    for bad in [(10, 5, 5), (10, 5, 0), (10, 1, 1)]:
        with pytest.raises(ValueError):
            plan_windows(*bad, bos=True)


def _plain_nll(model, tok, text):
    """Sum of -log p over the text's tokens from one plain forward (bos prefixed if it has one)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inp = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)
    nll = -sum(logp[t - 1, inp[t]].item() for t in range(1, len(inp)))
    return nll, len(inp) - 1


def test_full_window_equals_plain_forward(model_tok):
    model, tok = model_tok
    nll, n = _plain_nll(model, tok, TEXT)
    r = perplexity(model, tok, TEXT, EvalConfig(ppl_max_length=1024, ppl_stride=512), progress=False)
    assert r["n_windows"] == 1
    assert r["n_tokens_scored"] == n == r["n_tokens"] - (0 if tok.bos_token_id is not None else 1)
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def _hand_loop_nll(model, tok, text, max_length, stride):
    """The Hugging Face perplexity guide's loop, written independently: labels -100 on the
    <bos> and on tokens an earlier window scored; the model's own loss does the shift."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    budget = max_length - len(prefix)
    prev_end, nll, n = 0, 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + budget, len(ids))
        labels = [-100] * len(prefix) + [t if begin + j >= prev_end else -100 for j, t in enumerate(ids[begin:end])]
        k = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            out = model(torch.tensor([prefix + ids[begin:end]]), labels=torch.tensor([labels]))
        nll, n = nll + out.loss.item() * k, n + k
        prev_end = end
        if end == len(ids):
            break
    return nll, n


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_equals_hand_loop(model_tok, batch_size):
    model, tok = model_tok
    nll, n = _hand_loop_nll(model, tok, TEXT, max_length=24, stride=7)
    cfg = EvalConfig(ppl_max_length=24, ppl_stride=7, eval_batch_size=batch_size)
    r = perplexity(model, tok, TEXT, cfg, progress=False)
    assert r["n_tokens_scored"] == n
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["n_windows"] > 5


def test_word_byte_bits_relations(gemma):
    model, tok = gemma
    r = perplexity(model, tok, TEXT, EvalConfig(), progress=False)
    assert r["n_words"] == len(re.split(r"\s+", TEXT)) and r["n_bytes"] == len(TEXT.encode("utf-8"))
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll_sum"] / r["n_words"]))
    assert r["byte_perplexity"] == pytest.approx(math.exp(r["nll_sum"] / r["n_bytes"]))
    assert r["bits_per_byte"] == pytest.approx(math.log2(r["byte_perplexity"]))
    assert r["bos"] == "<bos>" and r["truncated"] is False


def _window_inputs(model, tok, cfg):
    seen = []
    decoder = model.get_decoder()  # perplexity runs the decoder and projects the scored positions itself
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.extend(kw["input_ids"].tolist()), with_kwargs=True
    )
    try:
        perplexity(model, tok, TEXT, cfg, progress=False)
    finally:
        handle.remove()
    return seen


def test_bos_rule_every_window(gemma, qwen):
    cfg = EvalConfig(ppl_max_length=16, ppl_stride=8, eval_batch_size=4)
    model, tok = gemma
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    rows = _window_inputs(model, tok, cfg)
    assert all(row[0] == tok.bos_token_id and len(row) <= 16 for row in rows)
    assert rows[0] == [tok.bos_token_id] + ids[:15] and rows[1] == [tok.bos_token_id] + ids[8:23]
    model, tok = qwen
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    rows = _window_inputs(model, tok, cfg)
    assert rows[0] == ids[:16] and rows[1] == ids[8:24]


def test_ppl_max_tokens_caps_and_recounts(gemma):
    model, tok = gemma
    r = perplexity(model, tok, TEXT, EvalConfig(ppl_max_tokens=40), progress=False)
    cut = tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"][:40])
    assert r["n_tokens_scored"] == 40 and r["truncated"] is True
    assert r["n_bytes"] == len(cut.encode("utf-8")) < len(TEXT.encode("utf-8"))
    assert r["n_words"] == len(re.split(r"\s+", cut))


# ---------------------------------------------------------------- pass@1


def _record(i, source, subject, answer):
    return {
        "id": f"{source}/{subject}/{i}",
        "source": source,
        "subject": subject,
        "level": None,
        "problem": f"Problem number {i}: what is {answer}?",
        "answer": answer,
        "reference_solution": "",
    }


SCRIPT = [  # (record, generated text, correct?)
    (_record(0, "gsm8k", None, "18"), "She makes 9 * 2 = 18 dollars.\nThe final answer is $\\boxed{18}$.", True),
    (_record(1, "gsm8k", None, "3"), "So it takes 4 bolts.", False),  # found by last_number: not stated
    (_record(2, "math", "algebra", "5"), "Solving, $x = 5$. The final answer is $\\boxed{5}$.", True),
    (_record(3, "math", "algebra", "\\frac{1}{2}"), "The final answer is $\\boxed{\\frac{1}{2}}$.", True),
    (_record(4, "math", "algebra", "7"), "The final answer is $\\boxed{8}$.", False),
    (_record(5, "math", "counting_and_probability", "10"), "I cannot tell.", False),
]


def test_pass_at_1_scripted(gemma, monkeypatch):
    model, tok = gemma
    records = [r for r, _, _ in SCRIPT]
    calls = {}

    def fake_generate(m, t, prompt_ids, **kw):
        calls.update(kw, prompts=prompt_ids, training=m.training)
        return [
            decoding.Generation(text=text, n_tokens=10 + i, stopped=i != 5) for i, (_, text, _) in enumerate(SCRIPT)
        ]

    monkeypatch.setattr(decoding, "generate", fake_generate)
    model.train()
    model.model.embed_tokens.eval()  # a module the trainer left in eval mode stays so
    res = math_pass_at_1(model, tok, records, EvalConfig(eval_max_new_tokens=33, eval_batch_size=2), progress=False)
    assert model.training and model.model.layers[0].training and not model.model.embed_tokens.training
    model.eval()
    assert calls["prompts"] == [prompts.student_prompt_ids(tok, r["problem"]) for r in records]
    assert calls["training"] is False and calls["temperature"] == 0.0
    assert calls["max_new_tokens"] == 33 and calls["batch_size"] == 2
    assert list(calls["end_ids"]) == prompts.end_token_ids(tok)
    assert tuple(calls["stop_strings"]) == prompts.STUDENT_STOP_STRINGS
    assert [g["correct"] is True for g in res["generations"]] == [ok for _, _, ok in SCRIPT]
    assert res["n"] == 6 and res["correct"] == 3 and res["pass@1"] == pytest.approx(0.5)
    stats = {
        k: {x: v[x] for x in ("pass@1", "n", "correct", "answer_format_rate")} for k, v in res["by_source"].items()
    }
    assert stats == {
        "gsm8k": {"pass@1": 0.5, "n": 2, "correct": 1, "answer_format_rate": 0.5},
        "math/algebra": {"pass@1": pytest.approx(2 / 3), "n": 3, "correct": 2, "answer_format_rate": 1.0},
        "math/counting_and_probability": {"pass@1": 0.0, "n": 1, "correct": 0, "answer_format_rate": 0.0},
    }
    # stated: 4 of 6 (not "I cannot tell.", not the bare last number); extracted at all: 5 of 6
    assert res["answer_format_rate"] == pytest.approx(4 / 6) and res["answer_extracted_rate"] == pytest.approx(5 / 6)
    assert [g["rule"] for g in res["generations"]][:2] == ["boxed", "last_number"]
    row = metrics_row(res, None, 1.0, 0.0)
    assert row["answer_format_rate"] == pytest.approx(4 / 6) and row["answer_format_rate_by_source"]["gsm8k"] == 0.5
    g = res["generations"][0]
    assert set(g) >= {
        "id",
        "source",
        "subject",
        "problem",
        "answer",
        "generation",
        "extracted",
        "rule",
        "correct",
        "n_tokens",
        "stopped",
    }
    assert g["extracted"] == "18" and g["n_tokens"] == 10 and res["generations"][5]["stopped"] is False


def _holdout(n_gsm, n_alg, n_cnt):
    rows = [_record(i, "gsm8k", None, "1") for i in range(n_gsm)]
    rows += [_record(i, "math", "algebra", "1") for i in range(n_alg)]
    return rows + [_record(i, "math", "counting_and_probability", "1") for i in range(n_cnt)]


def test_select_eval_subset_stratified_and_fixed():
    holdout = _holdout(20, 10, 10)
    sub = select_eval_subset(holdout, 8, seed=0)
    counts = {
        k: sum(source_key(r) == k for r in sub) for k in ("gsm8k", "math/algebra", "math/counting_and_probability")
    }
    assert counts == {"gsm8k": 4, "math/algebra": 2, "math/counting_and_probability": 2}
    shuffled = holdout[:]
    random.Random(1).shuffle(shuffled)
    assert {r["id"] for r in select_eval_subset(shuffled, 8, seed=0)} == {r["id"] for r in sub}
    assert select_eval_subset(holdout, 8, seed=0) == sub  # same problems every epoch
    assert {r["id"] for r in select_eval_subset(holdout, 8, seed=1)} != {r["id"] for r in sub}
    assert [r["id"] for r in sub] == [r["id"] for r in holdout if r in sub]  # holdout order
    # small limits still cover every stratum; tiny strata are never over-drawn
    assert {source_key(r) for r in select_eval_subset(_holdout(50, 1, 1), 3)} == set(counts)
    assert len(select_eval_subset(_holdout(50, 1, 1), 10)) == 10
    assert select_eval_subset(holdout, None) == holdout == select_eval_subset(holdout, 100)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def split_path(tmp_path_factory):
    train, held, settings = splits.select_split(data_dir="packaged", limit=10, fraction=0.5, seed=0)
    return splits.write_split(tmp_path_factory.mktemp("dataset"), train, held, settings)


def _run(tmp_path, model_dir, split, *extra):
    out = tmp_path / "eval"
    argv = [
        "--model",
        str(model_dir),
        "--split",
        str(split),
        "--data-dir",
        "packaged",
        "--eval-limit",
        "4",
        "--eval-max-new-tokens",
        "8",
        "--ppl-max-tokens",
        "256",
        "--eval-batch-size",
        "4",
        "--out",
        str(out),
        *extra,
    ]
    return cli.call("evaluate", argv), out


def test_cli_end_to_end(tmp_path, tiny_gemma_dir, split_path, capsys):
    rc, out = _run(tmp_path, tiny_gemma_dir, split_path)
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) >= {"settings", "eval_config", "math", "ppl"}
    assert result["eval_config"]["eval_limit"] == 4 and result["settings"]["model"] == str(tiny_gemma_dir)
    m, p = result["math"], result["ppl"]
    assert m["n"] == 4 and isinstance(m["pass@1"], float) and "generations" not in m
    assert sum(s["n"] for s in m["by_source"].values()) == 4 and len(m["by_source"]) == 3
    assert p["n_tokens_scored"] == 256 and p["truncated"] is True and p["bos"] == "<bos>"
    assert result["ppl_protocol"] == p["protocol"] == "q2g" and 0 <= m["answer_format_rate"] <= 1
    h = result["heldout"]  # the same 4 problems' reference solutions, in the training format
    assert h["heldout_n"] == 4 and h["heldout_tokens"] > 40 and 0 < h["heldout_loss"] < 20
    assert result["row"]["heldout_loss"] == h["heldout_loss"]
    assert all(
        isinstance(p[k], float) and p[k] > 1 for k in ("token_perplexity", "word_perplexity", "byte_perplexity")
    )
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["n_tokens"] <= 8 for row in rows)
    assert {row["id"] for row in rows} <= {r["id"] for r in splits.load_holdout(split_path)}
    assert "pass@1" in capsys.readouterr().out


def test_cli_adapter_and_config(tmp_path, tiny_gemma_dir, split_path, gemma):
    from peft import LoraConfig, get_peft_model

    model, tok = gemma
    base = perplexity(
        model, tok, loaders.load_wikitext("packaged"), EvalConfig(ppl_max_tokens=256, ppl_stride=128), progress=False
    )
    peft_model = get_peft_model(
        models.load_model(str(tiny_gemma_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    )
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter): make it change the model
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "run.yaml"
    config.write_text("evaluate:\n  ppl_stride: 128\n  eval_limit: 1\n")
    rc, out = _run(
        tmp_path,
        tiny_gemma_dir,
        split_path,
        "--adapter",
        str(tmp_path / "adapter"),
        "--no-math",
        "--config",
        str(config),
    )
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["math"] is None and (out / "generations.jsonl").read_text() == ""
    assert result["ppl"]["stride"] == 128 and result["eval_config"]["eval_limit"] == 4  # the flag wins
    in_memory = perplexity(
        peft_model,
        tok,
        loaders.load_wikitext("packaged"),
        EvalConfig(ppl_max_tokens=256, ppl_stride=128),
        progress=False,
    )
    assert result["ppl"]["nll_sum"] == pytest.approx(in_memory["nll_sum"], rel=1e-5)
    # the adapter was applied: same windows, other numbers (the tiny random model is near-uniform,
    # so even a strong adapter moves the NLL sum of 256 tokens by ~0.1, far above float noise)
    assert abs(result["ppl"]["nll_sum"] - base["nll_sum"]) > 1e-3


@pytest.mark.parametrize("content", [None, "{not json", '{"version": 1}'])
def test_cli_bad_split_names_the_file(tmp_path, tiny_gemma_dir, capsys, content):
    split = tmp_path / "dataset" / "split.json"
    if content is not None:
        split.parent.mkdir()
        split.write_text(content)
    rc, _ = _run(tmp_path, tiny_gemma_dir, split)
    err = capsys.readouterr().err
    assert rc != 0 and str(split) in err and err.startswith("error:")


def test_cli_model_from_config_or_error(tmp_path, tiny_qwen_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"evaluate:\n  model: {tiny_qwen_dir}\n  no_math: true\n  ppl_max_tokens: 64\n")
    out = tmp_path / "eval"
    assert cli.call("evaluate", ["--config", str(config), "--data-dir", "packaged", "--out", str(out)]) == 0
    ppl = json.loads((out / "eval.json").read_text())["ppl"]
    assert ppl["n_tokens_scored"] == 63 and ppl["bos"] is None  # no bos: the first token is context only
    assert cli.call("evaluate", ["--data-dir", "packaged", "--no-math"]) == 2
    assert "--model is required" in capsys.readouterr().err
