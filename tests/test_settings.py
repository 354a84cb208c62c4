"""Every "same run?" check is derived from the options' own `results=` declarations."""

import pytest

from q2g.config import option, result_keys
from q2g.evaluation.config import EvalConfig
from q2g.finetune.config import FinetuneConfig, run_keys
from q2g.generate.config import GenerateConfig


def test_an_option_must_say_what_it_changes():
    with pytest.raises(TypeError, match="results"):
        option(1, help="x")
    with pytest.raises(ValueError, match="must be one of"):
        option(1, help="x", results="speed")


def test_resume_keys_cover_every_result_changing_option():
    keys = run_keys(("baseline", "training"))
    for k in ("base_model", "lora_r", "lr", "group_by_length", "trainer", "eval_limit", "ppl_protocol"):
        assert k in keys
    # resolved values are compared, not the request ("auto")
    assert "precision_used" in keys and "precision" not in keys and "traces_sha256" in keys
    assert "n_train_examples" not in keys  # a resume compares the traces' content, not their count
    for k in ("out", "device", "eval_batch_size", "resume", "report_to", "vllm_gpu_memory_utilization"):
        assert k not in keys


def test_baseline_keys_are_the_student_and_the_evaluation_only():
    keys = run_keys(("baseline",))
    assert {"base_model", "precision_used", "split_file", "data_dir", "eval_limit", "ppl_stride"} <= set(keys)
    assert not {"lora_r", "lr", "epochs", "eval_batch_size"} & set(keys)
    assert result_keys(FinetuneConfig, scopes=("baseline",)) == ("base_model", "split", "precision", "data_dir")
    assert set(result_keys(EvalConfig, scopes=("baseline",))) < set(keys)


def test_generation_keys():
    keys = result_keys(GenerateConfig, scopes=("traces",))
    assert {"teacher", "temperature", "holdout_fraction", "reasoning", "seed"} <= set(keys)
    assert not {"batch_size", "concurrency", "api_key", "out", "device"} & set(keys)
