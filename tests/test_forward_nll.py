"""q2g.scoring: the held-out loss and perplexity sums without full logits equal the
logits path (computed here from `model(...).logits`, as evaluation did before) (tiny random Gemma3 and Qwen2, a peft model, chunk sizes that split
rows), and the prompt positions never reach the LM head."""

import pytest
import torch

from q2g import models
from q2g import scoring as forward_nll


@pytest.fixture(scope="module", params=["gemma", "qwen"])
def model(request, tiny_gemma_dir, tiny_qwen_dir):
    folder = tiny_gemma_dir if request.param == "gemma" else tiny_qwen_dir
    return models.load_model(str(folder)).eval()


def _logits_examples_nll(model, batch) -> tuple[float, int]:
    """The reference: full logits, shifted by one, cross-entropy over the labelled positions."""
    from q2g.examples import Collator

    cols = Collator(0)(batch)
    logits = model(input_ids=cols["input_ids"], attention_mask=cols["attention_mask"]).logits.float()
    target = cols["labels"][:, 1:]
    keep = target != -100
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep], reduction="sum")
    return float(nll), int(keep.sum())


def _logits_windows_nll(model, batch) -> float:
    """The reference: each window's targets scored from its full logits."""
    total = 0.0
    for inputs, targets, tail in batch:
        logits = model(input_ids=torch.tensor([inputs])).logits[0].float()
        end = len(inputs) - tail
        preds = logits[end - len(targets) : end]
        total += float(torch.nn.functional.cross_entropy(preds, torch.tensor(targets), reduction="sum"))
    return total


def _examples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in ((30, 12), (21, 5), (9, 4)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("chunk", [7, 256])
def test_heldout_sum_equals_the_logits_path(model, chunk):
    from q2g.examples import Collator

    batch = _examples(model.config.vocab_size)
    cols = Collator(0)(batch)
    with torch.inference_mode():
        old, n_old = _logits_examples_nll(model, batch)
        new, n_new = forward_nll.labels_nll(model, cols["input_ids"], cols["attention_mask"], cols["labels"], chunk)
    assert n_new == n_old == sum(len(e["input_ids"]) - e["labels"].count(-100) for e in batch)
    assert new == pytest.approx(old, rel=1e-5) and new > 0


def test_perplexity_windows_equal_the_logits_path(model):
    ids = torch.randint(3, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    q2g = [(ids[:32], ids[20:32], 1), (ids[16:48], ids[32:48], 1)]  # tail 1: the last logit unused
    rolling = [([2] + ids[:31], ids[:32], 0), (ids[7:39], ids[8:40], 0)]
    with torch.inference_mode():
        for batch in (q2g, rolling):
            assert forward_nll.batch_nll(model, batch, chunk=5) == pytest.approx(
                _logits_windows_nll(model, batch), rel=1e-5
            )


def test_only_target_positions_reach_the_head(model, monkeypatch):
    rows = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    targets = torch.full((2, 10), -100)
    targets[0, 6:] = 5
    targets[1, 9] = 4
    try:
        with torch.inference_mode():
            _, n = forward_nll.aligned_nll(model, torch.ones((2, 10), dtype=torch.long), None, targets, chunk=3)
    finally:
        hook.remove()
    assert n == 5 and rows == [3, 2]


def test_shift_labels():
    labels = torch.tensor([[-100, -100, 7, 8]])
    assert forward_nll.shift_labels(labels).tolist() == [[-100, 7, 8, -100]]
