"""--rehearsal-fraction: F=0 leaves today's dataset as it is; F>0 adds the expected number of
examples written by the base model, every token labelled, stored in q2g's cache (never in the
input dataset's folder) with their settings and reused on a rerun (and not reused when a setting
changes)."""

import json
from pathlib import Path

import pytest
from helpers import finetune_argv, reference_dataset
from transformers import AutoTokenizer

from q2g import cli
from q2g.examples import IGNORE_INDEX, build_dataset, read_traces
from q2g.finetune import rehearsal as rh
from q2g.finetune.config import FinetuneConfig
from q2g.models import resolve_precision


@pytest.fixture()
def setup(tiny_gemma_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("Q2G_CACHE", str(tmp_path / "cache"))
    ds = reference_dataset(tmp_path / "ds", limit=5)
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    examples, stats = build_dataset(tok, read_traces(ds / "traces.jsonl")[1], 128)
    return ds, tok, examples, stats


def add(cfg, setup):
    ds, tok, examples, stats = setup
    return rh.add_rehearsal(cfg, tok, examples, stats, "cpu", resolve_precision("fp32", "cpu"))


def test_rehearsal_count_is_the_fraction_of_all_examples():
    assert rh.rehearsal_count(90, 0.1) == 10 and rh.rehearsal_count(7, 0.0) == 0
    assert rh.rehearsal_count(8, 0.3) == 3  # 3 / 11 = 0.27, the nearest


def test_fraction_zero_is_todays_dataset(tiny_gemma_dir, setup):
    ds, _, examples, stats = setup
    got, got_stats = add(FinetuneConfig(base_model=str(tiny_gemma_dir)), setup)
    assert got is examples and got_stats is stats
    assert not list(ds.glob("rehearsal-*"))


def test_rehearsal_examples_are_labelled_everywhere_and_reused(tiny_gemma_dir, setup, monkeypatch):
    ds, tok, examples, stats = setup
    cfg = FinetuneConfig(base_model=str(tiny_gemma_dir), rehearsal_fraction=0.3, rehearsal_max_tokens=12, seed=3)
    got, got_stats = add(cfg, setup)
    n = rh.rehearsal_count(len(examples), 0.3)
    assert n == 3 and len(got) == len(examples) + n and got[: len(examples)] == examples
    for ex in got[len(examples) :]:
        assert ex["labels"] == ex["input_ids"] and IGNORE_INDEX not in ex["labels"]
        assert ex["input_ids"][0] == tok.bos_token_id and 2 <= len(ex["input_ids"]) <= 13
    assert got_stats["n_rehearsal_examples"] == n
    assert got_stats["n_train_examples"] == stats["n_train_examples"] + n
    texts = Path(got_stats["rehearsal_file"])
    assert texts.parent == ds.parent / "cache" / "rehearsal" and texts.exists() and not list(ds.glob("rehearsal-*"))
    settings = json.loads(texts.with_suffix(".json").read_text())
    assert settings["n"] == n and settings["seed"] == 3 and settings["max_new_tokens"] == 12
    assert settings["sampling"]["do_sample"] is True

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(rh, "generate_texts", no_generation)
    again, again_stats = add(cfg, setup)  # same settings: the stored texts
    assert again == got and again_stats["rehearsal_file"] == str(texts)
    with pytest.raises(AssertionError, match="generated again"):
        add(cfg.replace(seed=4), setup)  # another seed: other texts


def test_sampled_texts_depend_on_the_seed(tiny_gemma_dir):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    one = rh.generate_texts(model, tok, rh.rehearsal_settings("m", 3, 10, seed=0))
    assert one == rh.generate_texts(model, tok, rh.rehearsal_settings("m", 3, 10, seed=0))
    assert one != rh.generate_texts(model, tok, rh.rehearsal_settings("m", 3, 10, seed=1))
    assert len({tuple(r["input_ids"]) for r in one}) == 3  # sampled, not the same greedy text thrice


def test_finetune_with_rehearsal_records_it(tiny_gemma_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("Q2G_CACHE", str(tmp_path / "cache"))
    ds = reference_dataset(tmp_path / "ds", limit=5)
    out = tmp_path / "ck"
    argv = finetune_argv(tiny_gemma_dir, ds, out, "--rehearsal-fraction", "0.2", "--no-eval", epochs=1)
    assert cli.call("finetune", argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rehearsal_fraction"] == 0.2 and config["n_rehearsal_examples"] == 2  # 8 traces: 2 / 10
    assert Path(config["rehearsal_file"]).parent == tmp_path / "cache" / "rehearsal"
    assert not list(ds.glob("rehearsal-*"))  # nothing written into the input dataset
