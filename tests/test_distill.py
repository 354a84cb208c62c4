"""--distill chunk-likelihood, the math: the binarised KL by hand, the chunked label log-probs and
their gradients against dense ones, the batch term against a dense reference (full logits,
log_softmax, gather, the same formula) on tiny models, zero loss and gradient when the teacher is
the student, and no [*, vocab] block of more than `chunk` rows."""

import math

import pytest
import torch
from test_loss import VocabShapes, examples, lora_grads, lora_model
from transformers import AutoTokenizer

from q2g.examples import IGNORE_INDEX, Collator
from q2g.finetune.distill.chunk_kl import NO_CHUNK, binarised_kl, distill_sum, label_logprobs, log1mexp
from q2g.scoring import logit_transform, split_causal_lm

TOL = 1e-5


def test_binarised_kl_by_hand():
    # p_t = 0.5, p_s = 0.25: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    want = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    got = binarised_kl(
        torch.tensor([math.log(0.25)], dtype=torch.float64), torch.tensor([math.log(0.5)], dtype=torch.float64)
    )
    assert abs(got.item() - want) < 1e-12 and abs(want - 0.1438410362) < 1e-9


def test_binarised_kl_is_zero_with_zero_gradient_at_equality_and_finite_at_certainty():
    t = torch.tensor([-3.0, -0.5, -1e-3, -30.0], dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    kl = binarised_kl(s, t)
    kl.sum().backward()
    assert kl.abs().max().item() < 1e-15 and s.grad.abs().max().item() < 1e-12
    # d KL / d l_s = (p_s - p_t) / (1 - p_s)
    s2 = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    binarised_kl(s2, torch.tensor([-2.0])).backward()
    p_s, p_t = math.exp(-1.0), math.exp(-2.0)
    assert abs(s2.grad.item() - (p_s - p_t) / (1 - p_s)) < 1e-9
    certain = binarised_kl(torch.tensor([0.0]), torch.tensor([-0.7]))  # fp32 rounding: l_s = 0
    assert torch.isfinite(certain).all() and certain.item() > 0


def test_log1mexp_matches_the_plain_formula():
    x = torch.tensor([-1e-8, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    want = torch.log(1 - torch.exp(x.to(torch.float64)))
    assert torch.allclose(log1mexp(x)[1:], want[1:], rtol=1e-12)
    assert abs(log1mexp(x)[0].item() - math.log(1e-8)) < 1e-7  # the plain formula loses it


@pytest.mark.parametrize("cap,scale", [(None, 1.0), (2.0, 0.5)])
def test_label_logprobs_and_their_gradients_equal_dense(cap, scale):
    torch.manual_seed(0)
    h = torch.randn(10, 6, requires_grad=True)
    w, b = torch.randn(13, 6, requires_grad=True), torch.randn(13, requires_grad=True)
    y, g = torch.randint(0, 13, (10,)), torch.randn(10)  # each row its own incoming gradient
    z = (h @ w.t() + b) * scale
    z = cap * torch.tanh(z / cap) if cap else z
    want = torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]
    want_grads = torch.autograd.grad((want * g).sum(), (h, w, b))
    got = label_logprobs(h, w, y, b, chunk_size=3, softcap=cap, scale=scale)
    got_grads = torch.autograd.grad((got * g).sum(), (h, w, b))
    assert (got - want).abs().max().item() < 1e-5
    for a, c in zip(want_grads, got_grads):
        assert (a - c).abs().max().item() < 1e-5


def chunked_batch(pad, n_chunks=3):
    """The test_loss examples collated, with chunks over each example's label tokens: the first
    three tokens, then pairs, as a byte alignment of two tokenizations would group them."""
    batch = Collator(pad)(examples())
    ids = torch.full_like(batch["labels"], NO_CHUNK)
    for i, row in enumerate(batch["labels"]):
        pos = (row != IGNORE_INDEX).nonzero()[:, 0].tolist()
        groups = [pos[:3]] + [pos[k : k + 2] for k in range(3, len(pos), 2)]
        for c, group in enumerate(groups[:n_chunks]):
            ids[i, group] = c
    return batch, ids


def dense_chunk_loglik(model, batch, ids):
    """[B, C] chunk log-likelihoods from the full [B, T, V] logits (log_softmax, gather, sum)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:].clamp(min=0)
    lp = torch.log_softmax(logits.float(), -1).gather(2, labels[..., None])[..., 0]
    width = int(ids.max()) + 1
    out = torch.zeros(ids.shape[0], width)
    for c in range(width):
        out[:, c] = (lp * (ids[:, 1:] == c)).sum(1)
    return out


def ours(model, batch, ids, teacher, chunk_size=5):
    decoder, head, config = split_causal_lm(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return distill_sum(hidden, batch["labels"], ids, teacher, head, logit_transform(config), chunk_size)


@pytest.mark.parametrize("kind,softcap", [("qwen2", None), ("gemma3", 3.0)])
def test_distill_term_equals_dense_reference_value_and_grads(request, kind, softcap):
    path = request.getfixturevalue("tiny_gemma_dir" if kind == "gemma3" else "tiny_qwen_dir")
    batch, ids = chunked_batch(AutoTokenizer.from_pretrained(path).pad_token_id)
    model = lora_model(path, softcap)
    g = torch.Generator().manual_seed(1)
    teacher = -(torch.rand(4, 3, generator=g) * 2.9 + 0.1)  # p_t in [0.05, 0.9]: far from the random student
    teacher[0, 2] = float("nan")  # an example with fewer chunks: padding
    want = binarised_kl(dense_chunk_loglik(model, batch, ids)[~teacher.isnan()], teacher[~teacher.isnan()]).sum()
    want.backward()
    want_grads = lora_grads(model)
    model.zero_grad()
    got = ours(model, batch, ids, teacher)
    got.backward()
    assert want.item() > 1e-3
    assert abs(got.item() - want.item()) <= TOL * max(1.0, want.item())
    for name, grad in lora_grads(model).items():
        assert want_grads[name].abs().max() > 0, name
        assert (grad - want_grads[name]).abs().max().item() <= TOL, name


def test_teacher_equal_to_student_gives_zero_loss_and_gradient(tiny_gemma_dir):
    batch, ids = chunked_batch(0)
    model = lora_model(tiny_gemma_dir, 3.0)
    with torch.no_grad():
        teacher = dense_chunk_loglik(model, batch, ids)  # the student scores its own chunks
    got = ours(model, batch, ids, teacher)
    got.backward()
    assert abs(got.item()) < 1e-9
    assert max(g.abs().max().item() for g in lora_grads(model).values()) < 1e-6


def test_hand_computed_value_on_a_tiny_model(tiny_qwen_dir):
    """One example, two chunks; the student's token probabilities read from the full logits,
    the KL written out with math.log on probabilities (no log1mexp)."""
    model = lora_model(tiny_qwen_dir)
    ex = {"input_ids": [5, 9, 17, 33, 41, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 17, 33, 41, 7]}
    batch = Collator(0)([ex])
    ids = torch.tensor([[NO_CHUNK, NO_CHUNK, 0, 0, 1, NO_CHUNK]])  # chunk 0 = 17 33, chunk 1 = 41
    teacher = torch.tensor([[math.log(0.5), math.log(0.1)]])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=batch["input_ids"]).logits[0], -1)
        p0 = probs[1, 17].item() * probs[2, 33].item()
        p1 = probs[3, 41].item()
    kl = lambda pt, ps: pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))  # noqa: E731
    want = kl(0.5, p0) + kl(0.1, p1)
    got = ours(model, batch, ids, teacher).item()
    assert abs(got - want) <= 1e-5 * want


def test_no_chunk_in_the_batch_gives_zero_with_a_graph(tiny_gemma_dir):
    batch, ids = chunked_batch(0)
    model = lora_model(tiny_gemma_dir)
    got = ours(model, batch, torch.full_like(ids, NO_CHUNK), torch.full((4, 1), float("nan")))
    got.backward()
    assert got.item() == 0.0


def test_distill_path_never_builds_full_logits(tiny_gemma_dir):
    batch, ids = chunked_batch(0)
    model = lora_model(tiny_gemma_dir)
    decoder, head, config = split_causal_lm(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    teacher = torch.full((4, 3), -2.0)
    with VocabShapes(head.weight.shape[0]) as mode:
        distill_sum(hidden, batch["labels"], ids, teacher, head, chunk_size=4).backward()
    weight = {tuple(head.weight.shape), tuple(head.weight.t().shape)}
    shapes = [s for s in mode.shapes if s not in weight]
    assert shapes and all(len(s) == 2 and s[0] <= 4 for s in shapes), set(shapes)
