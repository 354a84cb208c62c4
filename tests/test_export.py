"""`q2g export`: only validated traces, written atomically; `datasets` reads both formats as they
are; TRL's SFTTrainer tokenizes the trl format to exactly the ids `q2g finetune` trains on, with
labels -100 on every prompt token and on nothing else, for a plain-format student (tiny Gemma 3),
a chat student without BOS (tiny Qwen2) and a Gemma-style chat template that writes its own BOS."""

import json
import shutil

import pytest

from q2g import cli
from q2g.export import export_rows, main
from q2g.prompts import end_of_turn_text, student_prompt_ids, student_target_ids

ROWS = [
    {"problem": "What is 2+3?", "qwen_trace": "2+3 = 5.\nThe final answer is $\\boxed{5}$.\n", "validated": True},
    {
        "problem": "What is 7*6?",
        "qwen_trace": "Guess 41.\nThe final answer is $\\boxed{41}$.",
        "validated": False,
        "reason": "wrong_answer",
    },
    {"problem": "Halve 48.", "qwen_trace": "<think>\n48/2 = 24\n</think>\n\nIt is $\\boxed{24}$.", "validated": True},
]
ROWS = [{**r, "answer": "5", "source": "math"} for r in ROWS]  # the trace schema q2g generate writes
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture()
def dataset(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


@pytest.fixture(scope="module")
def gemma_chat_dir(tiny_gemma_dir, tmp_path_factory):
    """Tiny Gemma 3 with a Gemma-style chat template: it writes <bos>, and ends turns with <end_of_turn>."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-gemma3-chat")
    shutil.copytree(tiny_gemma_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = GEMMA_CHAT
    tok.save_pretrained(out)
    return out


def export(dataset, tmp_path, fmt, *extra):
    out = tmp_path / f"export.{fmt}.jsonl"
    assert main(["--traces", str(dataset), "--format", fmt, "--out", str(out), *extra]) == 0
    return out


def test_messages_format_keeps_only_validated_traces_and_datasets_reads_it(dataset, tmp_path):
    from datasets import load_dataset

    out = export(dataset, tmp_path, "messages")
    assert not list(tmp_path.glob(".*.tmp-*"))  # written through a temporary file, then renamed
    data = load_dataset("json", data_files=str(out), split="train")
    assert data.column_names == ["messages"] and len(data) == 2
    assert data[1]["messages"] == [
        {"role": "user", "content": "Halve 48."},
        {"role": "assistant", "content": ROWS[2]["qwen_trace"]},
    ]


def test_no_validated_trace_is_an_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "traces.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert (
        cli.call(
            "export", ["--traces", str(tmp_path / "ds"), "--format", "messages", "--out", str(tmp_path / "x.jsonl")]
        )
        == 2
    )
    assert "traces.jsonl: none of the 1 traces is marked `validated: true`" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def sft_dataset(model_dir, out, tmp_path, **config):
    """The train dataset as TRL's SFTTrainer prepares it (tokenized; labels, or the completion mask)."""
    pytest.importorskip("trl")  # not a q2g dependency: export writes files, TRL only reads them
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", bf16=False, use_cpu=True, **config)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=load_dataset("json", data_files=str(out), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    return trainer.train_dataset, trainer.processing_class


def labels(example) -> list[int]:
    """TRL 1.x builds `labels` (-100 off the completion); older TRL keeps `completion_mask` for its collator."""
    if "labels" in example:
        return example["labels"]
    return [i if m else -100 for i, m in zip(example["input_ids"], example["completion_mask"])]


@pytest.mark.parametrize("student", ["tiny_gemma_dir", "tiny_qwen_dir", "gemma_chat_dir"])
def test_trl_format_is_tokenized_by_sft_trainer_with_the_prompt_masked(dataset, tmp_path, request, student):
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(student)
    out = export(dataset, tmp_path, "trl", "--base-model", str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    # TRL appends EOS unless the completion ends with it (Gemma chat: <end_of_turn>, then <eos>).
    extra = [] if end_of_turn_text(tok) == tok.eos_token else [tok.eos_token_id]
    data, _ = sft_dataset(model_dir, out, tmp_path)
    assert len(data) == 2
    for example, row in zip(data, [ROWS[0], ROWS[2]]):
        prompt = student_prompt_ids(tok, row["problem"])
        target = student_target_ids(tok, row["qwen_trace"]) + extra
        assert example["input_ids"] == prompt + target  # the ids q2g finetune trains on
        assert labels(example) == [-100] * len(prompt) + target  # the prompt, and only it, masked
    if student == "gemma_chat_dir":
        assert data[0]["input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]
        # With the end-of-turn as TRL's EOS the target is exactly q2g's, nothing appended.
        exact, _ = sft_dataset(model_dir, out, tmp_path, eos_token="<end_of_turn>")
        target = student_target_ids(tok, ROWS[0]["qwen_trace"])
        assert labels(exact[0])[-len(target) - 1 :] == [-100] + target


def test_messages_format_renders_like_the_student_prompt_and_target(dataset, tmp_path, tiny_qwen_dir):
    """With a chat student, TRL's rendering of `messages` starts with q2g's prompt + target ids."""
    from transformers import AutoTokenizer

    out = export(dataset, tmp_path, "messages")
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    data, _ = sft_dataset(tiny_qwen_dir, out, tmp_path)
    expected = student_prompt_ids(tok, ROWS[0]["problem"]) + student_target_ids(tok, ROWS[0]["qwen_trace"])
    assert data[0]["input_ids"][: len(expected)] == expected


def test_export_rows_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        export_rows([ROWS[0]], "csv")
