"""--forgetting-check-steps: a run made to forget (learning rate 1 on the tiny model) is stopped by
the mid-epoch probe before its first epoch ends; probe rows are in metrics.jsonl marked
`"probe": true` and stay out of the stage's own rows (final/, the report, resume)."""

import json
import math

import pytest
from helpers import finetune_argv, reference_dataset

from q2g import cli
from q2g.data import loaders
from q2g.finetune.epochs import without_probes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=5)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wikitext_model(tiny_gemma_dir, tmp_path_factory):
    """The tiny Gemma trained a little on the packaged WikiText (a random model knows nothing to
    forget: its perplexity is near the vocabulary size, and fine-tuning only lowers it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    ids = torch.tensor(tok(loaders.load_wikitext("packaged"), add_special_tokens=False)["input_ids"][: 64 * 64])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = ids.view(64, 64)[torch.randint(0, 64, (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("wikitext-gemma")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_probe_stops_a_forgetting_run_mid_epoch(wikitext_model, dataset, tmp_path):
    out = tmp_path / "ck"
    argv = finetune_argv(
        wikitext_model,
        dataset,
        out,
        "--forgetting-check-steps",
        "1",
        "--on-forgetting",
        "stop",
        lr="1.0",
        batch_size=1,
        optim="adamw",
    )
    assert cli.call("finetune", argv) == 0
    steps_per_epoch = math.ceil(json.loads((out / "config.json").read_text())["n_train_examples"] / 1)
    all_rows = rows(out)
    probes = [r for r in all_rows if r.get("probe")]
    evals = without_probes(all_rows)
    assert probes[0]["step"] == 0 and probes[0]["ppl_change"] == 0.0  # the reference: the untrained adapter
    assert probes[-1]["flagged"] and not any(p["flagged"] for p in probes[:-1])  # stopped at the first crossing
    assert probes[-1]["step"] < steps_per_epoch and [p["step"] for p in probes] == list(range(len(probes)))
    assert all(p["probe_tokens"] == 128 and p["lora_r"] == 16 for p in probes)  # capped by --ppl-max-tokens
    # the partial epoch is evaluated in full: the number of record, flagged, so final/ holds no adapter
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 0), (1, probes[-1]["step"])]
    assert evals[1]["flagged"] and "probe" not in evals[1]
    assert json.loads((out / "final" / "selection.json").read_text())["adapter"] is None


def test_without_probes_keeps_the_evaluation_rows():
    rows_ = [{"epoch": 0}, {"probe": True, "epoch": 0.5}, {"epoch": 1, "probe": False}]
    assert without_probes(rows_) == [{"epoch": 0}, {"epoch": 1, "probe": False}]


def test_probe_under_reduce_rank_retrains_at_half_rank(wikitext_model, dataset, tmp_path):
    out = tmp_path / "ck"
    argv = finetune_argv(
        wikitext_model,
        dataset,
        out,
        "--forgetting-check-steps",
        "1",
        "--on-forgetting",
        "reduce-rank",
        "--min-rank",
        "8",
        lr="1.0",
        batch_size=1,
        optim="adamw",
    )
    assert cli.call("finetune", argv) == 0
    all_rows = rows(out)
    probes = [r for r in all_rows if r.get("probe")]
    assert {r["lora_r"] for r in probes} == {16, 8}
    assert [r["step"] for r in probes if r["lora_r"] == 8][0] == 0  # its own reference, at its own step 0
    evals = without_probes(all_rows)
    assert [(r["lora_r"], r["epoch"]) for r in evals][:2] == [(None, 0), (16, 1)] and evals[1]["flagged"]
    assert (out / "rank-8" / "train_done.json").exists()
