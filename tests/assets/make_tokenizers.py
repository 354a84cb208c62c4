"""Build the two tiny tokenizers committed under tests/assets (run once; output is committed).

    python tests/assets/make_tokenizers.py

- tiny-qwen2/: byte-level BPE with Qwen2.5's special tokens and a ChatML chat template
  (no BOS, EOS = <|im_end|>), like an instruct teacher or a chat student.
- tiny-gemma3/: BPE with Gemma's special tokens (<pad>=0, <eos>=1, <bos>=2), adding <bos> to
  every encoding and no chat template, like the base Gemma 3 270M.
Both are trained on the problems and WikiText shipped in the package, vocab 512.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "src" / "q2g" / "assets" / "data"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus():
    for path in sorted(DATA.rglob("*.jsonl")) + [DATA / "wikitext" / "wiki.test.raw"]:
        yield from path.read_text(encoding="utf-8").splitlines()


def train(specials, vocab=512):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def main():
    qwen = train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=qwen, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(HERE / "tiny-qwen2")

    gemma = train(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
    gemma.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=gemma, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(HERE / "tiny-gemma3")


if __name__ == "__main__":
    main()
