"""q2g.evaluation's newer metrics: the held-out solution loss against a hand-computed masked NLL,
the lm-eval perplexity protocols against lm-evaluation-harness itself (HFLM on the tiny model),
and `--eval-backend vllm` against a stand-in `vllm` module (vLLM needs a CUDA GPU; the stand-in
checks the calls q2g makes: LLM(enable_lora=...), SamplingParams, LoRARequest per adapter)."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import finetune_argv, reference_dataset

from q2g import examples as sft_data
from q2g import models, prompts
from q2g.data import loaders, splits
from q2g.evaluation import pass_at_1 as decoding_vllm
from q2g.evaluation.config import EvalConfig
from q2g.evaluation.core import evaluate_model
from q2g.evaluation.heldout_loss import heldout_loss
from q2g.evaluation.pass_at_1 import math_pass_at_1
from q2g.evaluation.perplexity import perplexity, rolling_windows, wikitext_detokenize, wikitext_documents


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return models.load_model(str(tiny_gemma_dir)).eval(), models.load_tokenizer(str(tiny_gemma_dir))


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return models.load_model(str(tiny_qwen_dir)).eval(), models.load_tokenizer(str(tiny_qwen_dir))


@pytest.fixture(params=["gemma", "qwen"])
def model_tok(request):
    return request.getfixturevalue(request.param)


def _record(i, source, solution, answer="4"):
    return {
        "id": f"{source}/t/{i}",
        "source": source,
        "subject": None if source == "gsm8k" else "algebra",
        "level": None,
        "problem": f"What is {i} + {i}? Explain.",
        "answer": answer,
        "reference_solution": solution,
    }


RECORDS = [
    _record(1, "gsm8k", "We add 1 and 1.\nThe final answer is $\\boxed{2}$."),
    _record(2, "math", "Since $2 + 2 = 4$, the answer is $\\boxed{4}$. " * 3),
]


# ---------------------------------------------------------------- held-out solution loss


def _hand_loss(model, tok, records, max_seq_len):
    """Each example alone through the model's own loss (shift + mask by labels), weighted by its
    labelled-token count."""
    nll, n = 0.0, 0
    for r in records:
        ex = sft_data.build_example(tok, r["problem"], r["reference_solution"], max_seq_len)
        k = sum(label != sft_data.IGNORE_INDEX for label in ex["labels"][1:])
        with torch.no_grad():
            out = model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
        nll, n = nll + out.loss.item() * k, n + k
    return nll / n, n


@pytest.mark.parametrize("batch_size", [1, 2])
def test_heldout_loss_equals_hand_masked_mean(model_tok, batch_size):
    model, tok = model_tok
    loss, n = _hand_loss(model, tok, RECORDS, 1024)
    r = heldout_loss(model, tok, RECORDS, EvalConfig(eval_batch_size=batch_size), progress=False)
    assert r["heldout_tokens"] == n and r["heldout_n"] == 2 and r["heldout_skipped"] == 0
    assert r["heldout_loss"] == pytest.approx(loss, abs=1e-5)
    # the labelled tokens are the solution + end token only: the prompt carries no loss
    target = [len(prompts.student_target_ids(tok, x["reference_solution"])) for x in RECORDS]
    assert n == sum(target)


def test_heldout_loss_cut_skipped_and_in_the_row(gemma):
    model, tok = gemma
    prompt_len = len(prompts.student_prompt_ids(tok, RECORDS[1]["problem"]))
    cfg = EvalConfig(heldout_max_seq_len=prompt_len + 5)
    r = heldout_loss(model, tok, RECORDS + [_record(3, "gsm8k", "")], cfg, progress=False)
    assert r["heldout_tokens"] == 5 + 5 and r["heldout_skipped"] == 1  # both cut to 5 targets; no solution: skipped
    assert r["heldout_loss"] == pytest.approx(_hand_loss(model, tok, RECORDS, prompt_len + 5)[0], abs=1e-5)
    out = evaluate_model(model, tok, RECORDS, None, EvalConfig(eval_max_new_tokens=2), progress=False)
    assert out["row"]["heldout_loss"] == pytest.approx(_hand_loss(model, tok, RECORDS, 1024)[0], abs=1e-5)
    assert out["row"]["heldout_n"] == 2 and out["row"]["answer_format_rate"] is not None
    off = evaluate_model(
        model, tok, RECORDS, None, EvalConfig(eval_max_new_tokens=2, heldout_loss_limit=0), progress=False
    )
    assert off["heldout"] is None and off["row"]["heldout_loss"] is None


# ---------------------------------------------------------------- lm-eval perplexity protocols


def _excerpt() -> str:
    """Two short WikiText articles: the first rows of the packaged file's first two articles."""
    docs = wikitext_documents(loaders.load_wikitext("packaged"))
    return "".join("\n".join(d.split("\n")[:n]) + "\n" for d, n in zip(docs, (3, 2)))


def test_documents_split_at_top_level_titles():
    text = " = A = \n a b \n = = Sub = = \n c \n = B = \n d \n"
    assert wikitext_documents(text) == [" = A = \n a b \n = = Sub = = \n c ", " = B = \n d \n"]
    full = loaders.load_wikitext("packaged")
    docs = wikitext_documents(full)
    assert len(docs) == 8 and "".join(d + "\n" for d in docs[:-1]) + docs[-1] == full
    assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)


def test_detokenizer_is_lm_evals():
    lm_wikitext = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for doc in wikitext_documents(loaders.load_wikitext("packaged")):
        assert wikitext_detokenize(doc) == lm_wikitext.wikitext_detokenizer({"page": doc})


def test_rolling_windows_are_lm_evals():
    lm_utils = pytest.importorskip("lm_eval.utils")
    ids = list(range(100, 123))
    for max_length in (1, 5, 7, 23, 30):
        ours = rolling_windows(ids, max_length, prefix_id=2)
        theirs = [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(ids, prefix_token=2, max_seq_len=max_length, context_len=1)
        ]
        # HFLM feeds (context + continuation)[-(max_length + 1):][:-1] and scores the continuation
        assert [(inp, tgt) for inp, tgt, _ in ours] == [((c + t)[-(max_length + 1) :][:-1], t) for c, t in theirs]


@pytest.fixture(scope="module")
def lm_eval_result(tiny_gemma_dir):
    """lm-eval's wikitext numbers for the excerpt, from HFLM itself (max_length 32, CPU)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    lm = HFLM(pretrained=str(tiny_gemma_dir), device="cpu", batch_size=2, max_length=32, dtype="float32")
    docs = wikitext_documents(_excerpt())
    out = {}
    for protocol, target in (("lm-eval", lambda d: wikitext_detokenizer({"page": d})), ("lm-eval-raw", lambda d: d)):
        reqs = [
            Instance(request_type="loglikelihood_rolling", doc={"page": d}, arguments=(target(d),), idx=0)
            for d in docs
        ]
        lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
        counts = [process_results({"page": d}, [ll]) for d, ll in zip(docs, lls)]
        words = sum(c["word_perplexity"][1] for c in counts)
        n_bytes = sum(c["byte_perplexity"][1] for c in counts)
        out[protocol] = {
            "nll": -sum(lls),
            "word_perplexity": math.exp(-sum(lls) / words),
            "byte_perplexity": math.exp(-sum(lls) / n_bytes),
            "bits_per_byte": -sum(lls) / n_bytes / math.log(2),
        }
    return out


@pytest.mark.parametrize("protocol", ["lm-eval", "lm-eval-raw"])
def test_lm_eval_protocols_match_lm_eval(gemma, lm_eval_result, protocol):
    model, tok = gemma
    cfg = EvalConfig(ppl_protocol=protocol, ppl_max_length=32, ppl_stride=16, eval_batch_size=3)
    r = perplexity(model, tok, _excerpt(), cfg, progress=False)
    theirs = lm_eval_result[protocol]
    assert r["protocol"] == protocol and r["n_documents"] == 2 and r["n_windows"] > 4
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert r[key] == pytest.approx(theirs[key], rel=5e-3)  # the brief's 0.5%; in fact ~1e-6
        assert r[key] == pytest.approx(theirs[key], rel=1e-4)
    assert r["nll_sum"] == pytest.approx(theirs["nll"], rel=1e-4)


def test_lm_eval_protocol_truncates_at_whole_words(gemma):
    model, tok = gemma
    full = perplexity(model, tok, _excerpt(), EvalConfig(ppl_protocol="lm-eval"), progress=False)
    cut = perplexity(model, tok, _excerpt(), EvalConfig(ppl_protocol="lm-eval", ppl_max_tokens=40), progress=False)
    assert full["truncated"] is False and cut["truncated"] is True
    assert 30 <= cut["n_tokens_scored"] <= 40 < full["n_tokens_scored"] and cut["n_words"] < full["n_words"]


# ---------------------------------------------------------------- --eval-backend vllm (stand-in module)


class FakeVLLM:
    """Records what q2g asks of vLLM; answers every prompt with one scripted completion."""

    def __init__(self, tokenizer):
        self.built, self.calls, self.tokenizer = [], [], tokenizer
        fake = self

        class LLM:
            def __init__(self, **kw):
                fake.built.append(kw)

            def generate(self, prompts, params, use_tqdm=True, lora_request=None):
                folder = lora_request and Path(lora_request.lora_path)
                fake.calls.append(
                    {
                        "prompts": prompts,
                        "params": params.kw,
                        "lora": lora_request,
                        "adapter_config": folder and json.loads((folder / "adapter_config.json").read_text()),
                        "weights": folder and (folder / "adapter_model.safetensors").read_bytes(),
                    }
                )
                out = types.SimpleNamespace
                return [
                    out(
                        outputs=[
                            out(
                                text="So 2 + 2 = 4.\nThe final answer is $\\boxed{4}$.",
                                token_ids=[7] * 5,
                                finish_reason="stop",
                            )
                        ]
                    )
                    for _ in prompts
                ]

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LoRARequest:
            def __init__(self, lora_name, lora_int_id, lora_path):
                self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

        self.modules = {
            "vllm": types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams),
            "vllm.lora": types.SimpleNamespace(),
            "vllm.lora.request": types.SimpleNamespace(LoRARequest=LoRARequest),
        }


@pytest.fixture()
def fake_vllm(monkeypatch, gemma):
    fake = FakeVLLM(gemma[1])
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(decoding_vllm, "_ENGINES", {})
    return fake


def test_vllm_backend_needs_vllm(monkeypatch, gemma):
    model, tok = gemma
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'q2g\[vllm\]'"):
        math_pass_at_1(model, tok, RECORDS, EvalConfig(eval_backend="vllm"), progress=False)


def test_vllm_backend_base_then_adapters(fake_vllm, gemma, tiny_gemma_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = gemma
    cfg = EvalConfig(eval_backend="vllm", eval_max_new_tokens=33, heldout_loss_limit=0)
    fp32 = models.resolve_precision("fp32", "cpu")  # the run's decision, not the parameters' dtype
    base = evaluate_model(model, tok, RECORDS, None, cfg, progress=False, precision=fp32)
    assert base["math"]["pass@1"] == 1.0 and base["row"]["eval_backend"] == "vllm"
    assert base["row"]["answer_format_rate"] == 1.0 and base["math"]["generations"][0]["n_tokens"] == 5
    (built,) = fake_vllm.built
    assert built["model"] == str(tiny_gemma_dir) and built["enable_lora"] is True and built["max_loras"] == 1
    assert built["dtype"] == "float32" and built["max_lora_rank"] == 64 and built["gpu_memory_utilization"] == 0.4
    call = fake_vllm.calls[0]
    assert call["lora"] is None  # the base model: no adapter
    assert call["prompts"] == [{"prompt_token_ids": prompts.student_prompt_ids(tok, r["problem"])} for r in RECORDS]
    assert call["params"] == {
        "temperature": 0.0,
        "max_tokens": 33,
        "stop": list(prompts.STUDENT_STOP_STRINGS),
        "stop_token_ids": sorted(prompts.end_token_ids(tok)),
        "seed": 0,
    }

    peft_model = get_peft_model(models.load_model(str(tiny_gemma_dir)), LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "epoch-1")
    evaluate_model(peft_model, tok, RECORDS, None, cfg, False, fp32, tmp_path / "epoch-1")
    evaluate_model(peft_model, tok, RECORDS, None, cfg, False, fp32)  # no folder: saved to a temp one
    assert len(fake_vllm.built) == 1  # one engine for the whole run
    first, second = fake_vllm.calls[1]["lora"], fake_vllm.calls[2]["lora"]
    assert first.lora_path == str(tmp_path / "epoch-1") and first.lora_int_id == 1
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path  # a new id: never a stale cached adapter
    assert fake_vllm.calls[2]["adapter_config"]["r"] == 4


def test_vllm_dtype_is_the_runs_precision():
    """fp32 weights under bf16 autocast compute in bf16: vLLM gets bfloat16, not the weights' float32."""
    from q2g.models import vllm_dtype

    assert vllm_dtype(models.Precision(torch.float32, "bf16", "cpu bf16")) == "bfloat16"
    assert vllm_dtype(models.Precision(torch.bfloat16, "bf16", "bf16")) == "bfloat16"
    assert vllm_dtype(models.Precision(torch.float16, "fp16", "fp16")) == "float16"
    assert vllm_dtype(models.resolve_precision("fp32", "cpu")) == "float32"


def test_vllm_engine_rebuilt_for_a_higher_rank(fake_vllm):
    for rank in (0, 16, 64, 100, 8):  # the base model first, then adapters
        decoding_vllm.vllm_engine("m", dtype="bfloat16", lora_r=rank, gpu_memory_utilization=0.3)
    assert [b["max_lora_rank"] for b in fake_vllm.built] == [64, 128]


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def split_path(tmp_path_factory):
    train, held, settings = splits.select_split(data_dir="packaged", limit=10, fraction=0.5, seed=0)
    return splits.write_split(tmp_path_factory.mktemp("dataset"), train, held, settings)


def test_cli_lm_eval_protocol_named_in_eval_json(tmp_path, tiny_gemma_dir):
    from q2g import cli

    out = tmp_path / "eval"
    argv = [
        "--model",
        str(tiny_gemma_dir),
        "--no-math",
        "--data-dir",
        "packaged",
        "--ppl-protocol",
        "lm-eval",
        "--ppl-max-tokens",
        "200",
        "--ppl-max-length",
        "64",
        "--ppl-stride",
        "32",
        "--out",
        str(out),
    ]
    assert cli.call("evaluate", argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["ppl_protocol"] == result["ppl"]["protocol"] == result["eval_config"]["ppl_protocol"] == "lm-eval"
    assert result["ppl"]["n_documents"] == 1 and result["ppl"]["truncated"] is True
    assert result["ppl"]["n_tokens_scored"] <= 200 and result["ppl"]["stride"] is None


def test_cli_vllm_backend_uses_the_adapter_folder(tmp_path, tiny_gemma_dir, split_path, fake_vllm):
    from peft import LoraConfig, get_peft_model

    from q2g import cli

    get_peft_model(models.load_model(str(tiny_gemma_dir)), LoraConfig(r=8, target_modules=["v_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    argv = [
        "--model",
        str(tiny_gemma_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--split",
        str(split_path),
        "--no-ppl",
        "--eval-backend",
        "vllm",
        "--eval-limit",
        "3",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert cli.call("evaluate", argv) == 0
    (call,) = fake_vllm.calls
    assert call["lora"].lora_path == str(tmp_path / "adapter") and len(call["prompts"]) == 3
    assert fake_vllm.built[0]["max_lora_rank"] == 64
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["math"]["backend"] == "vllm" and result["heldout"]["heldout_n"] == 3


def test_finetune_with_vllm_backend_and_lm_eval_protocol(tmp_path, tiny_gemma_dir, fake_vllm):
    """The per-epoch callback, unchanged: every epoch's row gets the new metrics; vLLM sees the
    base model, then each epoch's adapter (the weights saved in epoch-N/) as a LoRARequest."""
    from q2g import cli

    ds = reference_dataset(tmp_path / "dataset", limit=5)
    out = tmp_path / "ck"
    argv = finetune_argv(
        tiny_gemma_dir, ds, out, eval_backend="vllm", ppl_protocol="lm-eval", ppl_max_length=64, ppl_stride=32
    )
    assert cli.call("finetune", argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(
        r["eval_backend"] == "vllm"
        and r["ppl_protocol"] == "lm-eval"
        and r["answer_format_rate"] == 1.0
        and r["heldout_n"] == 2
        and r["heldout_loss"] > 0
        for r in rows
    )
    assert rows[2]["heldout_loss"] != rows[0]["heldout_loss"]  # training moved it
    assert len(fake_vllm.built) == 1 and [c["lora"] is None for c in fake_vllm.calls] == [True, False, False]
    for call, epoch in zip(fake_vllm.calls[1:], (1, 2)):
        assert call["weights"] == (out / f"epoch-{epoch}" / "adapter_model.safetensors").read_bytes()
    report = (out / "report.md").read_text()
    assert "| held-out solution loss (nats/token) |" in report and "protocol `lm-eval`" in report
