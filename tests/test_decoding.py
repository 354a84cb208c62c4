"""q2g.decoding: the refill loop (finished rows leave, new prompts take their slots) gives the
same greedy tokens as one `model.generate` per batch, on tiny random Gemma3 (sliding-window
layers, <bos>) and Qwen2 (chat template), with rows ending at end tokens, stop strings and the cap."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from q2g import decoding, models, prompts
from q2g.decoding import refill as decoding_refill


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gemma", "qwen"])
def model_tok(request, tiny_gemma_dir, tiny_qwen_dir):
    folder = tiny_gemma_dir if request.param == "gemma" else tiny_qwen_dir
    return models.load_model(str(folder)).eval(), models.load_tokenizer(str(folder), padding_side="left")


def _prompts(tok):
    # lengths from ~15 to ~90 tokens: the tiny Gemma's 64-token sliding window is crossed
    problems = [f"What is {i} plus {i * 7}? " * (1 + i % 5) for i in range(9)]
    return [prompts.student_prompt_ids(tok, p) for p in problems]


def test_refill_equals_static_token_for_token(model_tok):
    model, tok = model_tok
    ids = _prompts(tok)
    free = decoding.generate_static(model, tok, ids, max_new_tokens=30, batch_size=9)
    # End tokens and a stop string taken from the free runs, so rows end at different steps.
    end_ids = sorted({g.token_ids[4 + 3 * k] for k, g in enumerate(free[:3])})
    stop = free[4].text[8:10] or "zz"
    for batch_size in (1, 3, 4, 9):  # 9: the first prefill is cut into groups of similar length
        kw = dict(max_new_tokens=30, end_ids=end_ids, stop_strings=(stop,), batch_size=batch_size)
        old = decoding.generate_static(model, tok, ids, **kw)
        new = decoding.generate_refill(model, tok, ids, **kw)
        assert [g.token_ids for g in new] == [g.token_ids for g in old]
        assert new == old  # text, n_tokens, stopped too
    assert any(g.stopped for g in new)
    if tok.bos_token_id is not None:  # the tiny Qwen writes "\n" from every prompt; the Gemma varies
        assert len({g.n_tokens for g in new}) >= 3 and any(not g.stopped for g in new)


def test_prompts_of_very_different_lengths_are_prefilled_in_groups(model_tok, monkeypatch):
    model, tok = model_tok
    ids = _prompts(tok)
    sizes, real = [], decoding_refill._prefill

    def counting(model, prompts_, rows, pad_id, device):
        sizes.append(len(rows) * max(len(p) for p in prompts_))
        return real(model, prompts_, rows, pad_id, device)

    monkeypatch.setattr(decoding_refill, "_prefill", counting)
    decoding.generate_refill(model, tok, ids, max_new_tokens=2, batch_size=9)
    total, longest = sum(len(p) for p in ids), max(len(p) for p in ids)
    assert len(sizes) > 1 and sum(sizes) <= 1.25 * total < len(ids) * longest


@given(st.lists(st.integers(1, 400), min_size=1, max_size=40), st.sampled_from([0.0, 0.25, 1.0]))
def test_low_padding_groups_cover_every_prompt_within_the_padding_allowed(lengths, waste):
    from q2g.decoding.rows import low_padding_groups

    lengths = sorted(lengths, reverse=True)
    groups = low_padding_groups(lengths, waste)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # consecutive, each once
    for g in groups:
        assert len(g) * lengths[g[0]] <= (1 + waste) * sum(lengths[i] for i in g) + 1e-9
    for a, b in zip(groups, groups[1:]):  # a group ends only where the next prompt would break the bound
        assert (len(a) + 1) * lengths[a[0]] > (1 + waste) * (sum(lengths[i] for i in a) + lengths[b[0]])


def test_timeline_stays_as_long_as_the_longest_row(model_tok, monkeypatch):
    """Rows that joined late share the timeline; columns no row needs any more are cut off."""
    model, tok = model_tok
    ids, widths = _prompts(tok), []
    step = decoding_refill._step
    monkeypatch.setattr(decoding_refill, "_step", lambda m, run: widths.append(run.mask.shape[1]) or step(m, run))
    free = decoding.generate_static(model, tok, ids, max_new_tokens=20, batch_size=9)
    end_ids = sorted({free[k].token_ids[4 + 4 * k] for k in range(1, 4)})
    kw = dict(max_new_tokens=20, end_ids=end_ids, batch_size=3)
    assert decoding.generate_refill(model, tok, ids, **kw) == decoding.generate_static(model, tok, ids, **kw)
    assert max(widths, default=0) <= max(len(p) for p in ids) + 20


def test_rows_end_where_they_should(model_tok):
    model, tok = model_tok
    ids = _prompts(tok)[:4]
    free = decoding.generate(model, tok, ids, max_new_tokens=12, batch_size=2)
    assert all(g.n_tokens == 12 and not g.stopped and len(g.token_ids) == 12 for g in free)
    end = free[0].token_ids[5]
    got = decoding.generate(model, tok, ids, max_new_tokens=12, end_ids=[end], batch_size=2)
    first = free[0].token_ids.index(end) + 1
    assert got[0].token_ids == free[0].token_ids[:first] and got[0].stopped and got[0].n_tokens == first
    # a stop string: the text is cut before it, the row ends at the token that completed it
    stop = free[1].text[3:6]
    got = decoding.generate(model, tok, ids, max_new_tokens=12, stop_strings=(stop,), batch_size=2)
    assert got[1].stopped and stop not in got[1].text and free[1].text.startswith(got[1].text)
    assert got[1].token_ids == free[1].token_ids[: got[1].n_tokens]


def test_progress_counts_every_prompt_once(model_tok):
    model, tok = model_tok
    seen = []
    gens = decoding.generate(
        model, tok, _prompts(tok), max_new_tokens=6, batch_size=4, progress=lambda n, k: seen.append((n, k))
    )
    assert sum(n for n, _ in seen) == 9 and sum(k for _, k in seen) == sum(g.n_tokens for g in gens)


def test_sampling_and_penalties_use_static_batches(model_tok, monkeypatch):
    model, tok = model_tok
    calls = []
    monkeypatch.setattr(decoding, "generate_static", lambda *a, **kw: calls.append(kw) or [])
    decoding.generate(model, tok, _prompts(tok), temperature=0.7, seed=3)
    assert calls and calls[0]["temperature"] == 0.7 and calls[0]["seed"] == 3
    assert decoding.plain_greedy(model)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.05)  # as Qwen2.5-Instruct ships
    assert not decoding.plain_greedy(model)
    decoding.generate(model, tok, _prompts(tok))
    assert len(calls) == 2 and calls[1]["temperature"] == 0.0


def test_refill_with_a_peft_model(tiny_gemma_dir):
    """The training callback evaluates the peft-wrapped model: same tokens there too."""
    from peft import LoraConfig, get_peft_model

    tok = models.load_tokenizer(str(tiny_gemma_dir), padding_side="left")
    model = get_peft_model(
        models.load_model(str(tiny_gemma_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.eval()
    ids = _prompts(tok)[:5]
    kw = dict(max_new_tokens=20, end_ids=[5, 9], batch_size=2)
    assert decoding.generate_refill(model, tok, ids, **kw) == decoding.generate_static(model, tok, ids, **kw)
