"""models.py: the one precision decision and the demo model's conversion check."""

import pytest
import torch

from q2g import demo_model, models
from q2g.errors import RunFailed


def test_conversion_check_refuses_a_model_far_from_the_known_perplexity(tiny_gemma_dir):
    """A random model stands in for a broken conversion (the 5.17 GGUF loader gave ~600)."""
    model, tok = models.load_model(str(tiny_gemma_dir)), models.load_tokenizer(str(tiny_gemma_dir))
    with pytest.raises(
        RunFailed,
        match=r"scores perplexity \d+\.\d on the shipped WikiText excerpt where a good "
        r"conversion scores 14.48: transformers 5\.\d+",
    ):
        demo_model.check_demo_model(model, tok)


def test_conversion_check_passes_within_tolerance(tiny_gemma_dir, monkeypatch):
    model, tok = models.load_model(str(tiny_gemma_dir)), models.load_tokenizer(str(tiny_gemma_dir))
    for ppl, ok in ((14.48 * 1.49, True), (14.48 / 1.49, True), (14.48 * 1.51, False)):
        monkeypatch.setattr(demo_model, "token_perplexity", lambda *a, _p=ppl, **k: _p)
        if ok:
            assert demo_model.check_demo_model(model, tok)["wikitext_excerpt_ppl"] == ppl
        else:
            with pytest.raises(RunFailed):
                demo_model.check_demo_model(model, tok)


def test_precision_autocast_context():
    fp32 = models.resolve_precision("fp32", "cpu")
    assert fp32.context("cpu").__class__.__name__ == "nullcontext"
    bf16 = models.resolve_precision("bf16", "cpu")
    with bf16.context("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
