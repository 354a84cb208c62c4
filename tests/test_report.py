"""report.md from metrics rows: the seed's before/after table, the verdict, the teacher, plots."""

from q2g.report import write_report


def row(epoch, rank, gsm, alg, overall, ppl, change, flagged, adapter=None, fmt=None, loss=None):
    return {
        "epoch": epoch,
        "step": epoch * 10,
        "lora_r": rank,
        "adapter": adapter,
        "train_loss": 1.0 if epoch else None,
        "train_tokens_per_s": 100.0 if epoch else None,
        "pass@1": overall,
        "pass@1_by_source": {"gsm8k": gsm, "math/algebra": alg},
        "n_by_source": {"gsm8k": 6, "math/algebra": 4},
        "n_eval": 10,
        "token_perplexity": ppl,
        "ppl_tokens_scored": 5000,
        "ppl_change": change,
        "flagged": flagged,
        "answer_format_rate": fmt,
        "heldout_loss": loss,
        "heldout_n": 10,
        "heldout_tokens": 1234,
        "ppl_protocol": "lm-eval",
        "eval_backend": "hf",
    }


ROWS = [
    row(0, None, 0.5, 0.25, 0.4, 20.0, 0.0, False, fmt=0.2, loss=1.5),
    row(1, 16, 2 / 3, 0.25, 0.5, 20.5, 0.025, False, "epoch-1", fmt=0.6, loss=1.25),
    row(2, 16, 5 / 6, 0.5, 0.7, 22.0, 0.1, True, "epoch-2", fmt=0.9, loss=1.125),
]
INFO = {
    "base_model": "pypi:gemma3-270m",
    "budget": 0.05,
    "policy": "stop",
    "lora_r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"],
    "epochs": 2,
    "teachers": [{"teacher": "reference", "backend": "reference", "n": 40}],
}


def test_table_uses_the_kept_adapter(tmp_path):
    path = write_report(tmp_path, ROWS, {**INFO, "final": {"adapter": "epoch-1"}})
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "| metric | baseline | after fine-tune (epoch-1) | change |" in text
    assert "| pass@1 gsm8k (n=6) | 50.0% | 66.7% | +16.7 pp |" in text
    assert "| pass@1 math/algebra (n=4) | 25.0% | 25.0% | +0.0 pp |" in text
    assert "| pass@1 overall | 40.0% | 50.0% | +10.0 pp |" in text
    assert "| WikiText perplexity (token) | 20.000 | 20.500 | +2.5% |" in text
    assert "- Kept adapter: within budget: WikiText perplexity +2.5% (<= 5% allowed)." in text
    assert "- Epochs over budget: 1 of 2: epoch-2 (+10.0%)." in text
    assert "the datasets' own reference solutions (backend `reference`: no teacher model was run; 40 traces)" in text
    assert "10 holdout problems scored" in text and "5000 WikiText tokens scored" in text
    assert "| answer format rate (final answer stated) | 20.0% | 60.0% | +40.0 pp |" in text
    assert "| held-out solution loss (nats/token) | 1.500 | 1.250 | -0.250 |" in text
    assert "| 2 | 16 | 20 | 1.0000 | 100 | 70.0% | 90.0% | 1.1250 | 22.000 | +10.0% | **yes** |" in text
    assert "10 reference solutions (1234 tokens) scored for the held-out loss" in text
    assert "protocol `lm-eval`: lm-evaluation-harness's wikitext task" in text and "generated with hf" in text
    for png in ("pass_at_1.png", "answer_format.png", "heldout_loss.png", "perplexity.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in text


def test_rows_from_before_the_new_metrics(tmp_path):
    """metrics.jsonl rows written before answer_format_rate / heldout_loss existed still report."""
    old = [
        {k: v for k, v in r.items() if k not in ("answer_format_rate", "heldout_loss", "ppl_protocol")} for r in ROWS
    ]
    text = write_report(tmp_path, old, {**INFO, "final": {"adapter": "epoch-1"}}).read_text()
    assert "answer format rate" not in text and "held-out solution loss" not in text
    assert "| 1 | 16 | 10 | 1.0000 | 100 | 50.0% | n/a | n/a | 20.500 | +2.5% | no |" in text
    assert "protocol `q2g`" in text and not (tmp_path / "heldout_loss.png").exists()


def test_no_adapter_within_budget(tmp_path):
    text = write_report(tmp_path, ROWS[:1] + ROWS[2:], {**INFO, "final": {"adapter": None}}).read_text()
    assert "| metric | baseline | last epoch (epoch-2, not kept) | change |" in text
    assert "OVER BUDGET: WikiText perplexity +10.0% > 5% allowed" in text
    assert "**No adapter stayed within budget: the base model is the result**" in text


def test_model_teacher_and_no_eval(tmp_path):
    rows = [
        {
            "epoch": 1,
            "step": 5,
            "lora_r": 16,
            "adapter": "epoch-1",
            "pass@1": None,
            "token_perplexity": None,
            "ppl_change": None,
            "flagged": False,
        }
    ]
    info = {
        **INFO,
        "teachers": [{"teacher": "Qwen/Qwen2.5-7B-Instruct", "backend": "vllm", "n": 7}],
        "final": {"adapter": "epoch-1"},
    }
    text = write_report(tmp_path, rows, info).read_text()
    assert "Evaluation was skipped (`--no-eval`)." in text
    assert "`Qwen/Qwen2.5-7B-Instruct` via `vllm` (7 traces)" in text
    assert not (tmp_path / "pass_at_1.png").exists()
