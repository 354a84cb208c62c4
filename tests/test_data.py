"""The data layer: loaders, record shape, ids, the holdout split and the leakage check."""

import json

import pytest

from q2g import errors
from q2g.data import loaders, sources, splits

PACKAGED = "packaged"


def test_gsm8k_records_have_the_shared_shape():
    rows = loaders.load_gsm8k("test", PACKAGED)
    assert len(rows) == 60
    first = rows[0]
    assert set(first) == {"id", "source", "subject", "level", "problem", "answer", "reference_solution"}
    assert first["id"] == "gsm8k/test/0" and first["source"] == "gsm8k"
    assert first["answer"] == first["reference_solution"].rsplit("####", 1)[1].strip().replace(",", "")
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in rows)


def test_gsm8k_gold_strips_commas():
    assert loaders.gsm8k_gold("so 1,000 + 234\n#### 1,234") == "1234"
    with pytest.raises(ValueError):
        loaders.gsm8k_gold("no final line")


def test_math_records_subjects_levels_and_boxed_gold():
    rows = loaders.load_math("test", ["algebra"], data_dir=PACKAGED)
    assert len(rows) == 30 and {r["subject"] for r in rows} == {"algebra"}
    assert all(r["id"].startswith("math/test/algebra/") for r in rows)
    assert all(isinstance(r["level"], int) and 1 <= r["level"] <= 5 for r in rows)
    assert all(
        f"\\boxed{{{r['answer']}}}" in r["reference_solution"] or "\\boxed" in r["reference_solution"] for r in rows
    )
    only = loaders.load_math("test", ["Counting & Probability"], levels=[1, 2], data_dir=PACKAGED)
    assert only and all(r["level"] in (1, 2) and r["subject"] == "counting_and_probability" for r in only)


def test_every_subject_is_selectable_offline():
    for slug in sources.MATH_SUBJECTS:
        assert loaders.load_math("train", [slug], data_dir=PACKAGED), slug


def test_unknown_subject_and_dataset_are_named():
    with pytest.raises(errors.DataError, match="unknown MATH subject 'calculus'"):
        loaders.load_math("test", ["calculus"], data_dir=PACKAGED)
    with pytest.raises(errors.DataError, match="unknown dataset 'mmlu'"):
        loaders.load_problems(["mmlu"], data_dir=PACKAGED)


def test_bad_jsonl_names_file_line_and_field(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(errors.DataError, match=r"test.jsonl:2: missing field\(s\) answer"):
        loaders.load_gsm8k("test", tmp_path)
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(errors.DataError, match=r"test.jsonl:2: not valid JSON"):
        loaders.load_gsm8k("test", tmp_path)
    with pytest.raises(errors.DataError, match="train.jsonl not found"):
        loaders.load_gsm8k("train", tmp_path)


def test_data_dir_env_variable(monkeypatch):
    monkeypatch.setenv(loaders.DATA_DIR_ENV, str(loaders.packaged_data_dir()))
    assert len(loaders.load_gsm8k("test")) == 60
    monkeypatch.setenv(loaders.DATA_DIR_ENV, "/nonexistent/q2g")
    with pytest.raises(errors.DataError, match="does not exist"):
        loaders.load_gsm8k("test")


def test_wikitext_is_nonempty_rows_with_lf():
    text = loaders.load_wikitext(PACKAGED)
    assert text.startswith(" = Robert Boulter = \n")
    assert "\r" not in text and "\n\n" not in text and text.endswith("\n")


def test_normalised_hash_ignores_case_space_and_dollars():
    assert splits.problem_hash("What is $2 + 2$?") == splits.problem_hash("what is 2+2 ?")
    assert splits.problem_hash("What is 2+2?") != splits.problem_hash("What is 2+3?")


def _split(**kw):
    return splits.select_split(data_dir=PACKAGED, **kw)


def test_split_is_deterministic_stratified_and_disjoint():
    train, held, settings = _split(fraction=0.2, seed=0)
    train2, held2, _ = _split(fraction=0.2, seed=0)
    assert [r["id"] for r in held] == [r["id"] for r in held2]
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    by = lambda rows, key: sum(1 for r in rows if sources.source_key(r) == key)  # noqa: E731
    for key, n in [("gsm8k", 240), ("math/algebra", 120), ("math/counting_and_probability", 120)]:
        assert by(held, key) == round(0.2 * n), key
        assert by(train, key) + by(held, key) == n
    _, held3, _ = _split(fraction=0.2, seed=1)
    assert {r["id"] for r in held3} != {r["id"] for r in held}
    assert settings["holdout_fraction"] == 0.2 and settings["seed"] == 0


def test_split_keeps_duplicate_problems_on_one_side():
    base = loaders.load_gsm8k("train", PACKAGED)[:50]
    dupes = [dict(r, id=r["id"] + "-dup", problem=r["problem"].upper() + "  ") for r in base]
    train, held = splits.split_holdout(base + dupes, 0.2, seed=0)
    assert not {splits.problem_hash(r["problem"]) for r in train} & {splits.problem_hash(r["problem"]) for r in held}
    assert len(held) == 20  # 10 groups of two


def test_manifest_roundtrip_and_leak_report(tmp_path):
    train, held, settings = _split(limit=20)
    path = splits.write_split(tmp_path, train, held, settings)
    manifest = splits.read_split(path)
    assert manifest["settings"]["limit"] == 20
    assert [e["id"] for e in manifest["holdout"]] == [r["id"] for r in held]
    assert [r["id"] for r in splits.load_holdout(path)] == [r["id"] for r in held]
    assert splits.find_leaks(train, manifest) == []
    # a training record that is a reworded copy (case/spacing) of a holdout problem is caught by hash
    sneaky = dict(train[0], problem="  " + held[0]["problem"].lower())
    leaks = splits.find_leaks([sneaky, train[1]], manifest)
    assert leaks == [
        {
            "id": train[0]["id"],
            "holdout_id": held[0]["id"],
            "hash": splits.problem_hash(held[0]["problem"]),
            "by": "problem_hash",
        }
    ]


def test_holdout_tampering_is_detected(tmp_path):
    train, held, settings = _split(limit=10)
    path = splits.write_split(tmp_path, train, held, settings)
    rows = (tmp_path / "holdout.jsonl").read_text().splitlines()
    rows[0] = json.dumps(dict(json.loads(rows[0]), problem="something else"))
    (tmp_path / "holdout.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(errors.DataError, match="does not match"):
        splits.load_holdout(path)


def test_official_test_holdout_uses_test_split():
    train, held, settings = _split(holdout="official-test", datasets=["gsm8k"])
    assert all(r["id"].startswith("gsm8k/test/") for r in held) and len(held) == 60
    assert all(r["id"].startswith("gsm8k/train/") for r in train) and len(train) == 240
    assert settings["holdout"] == "official-test"


def test_official_test_holdout_drops_train_duplicates_of_test_problems(shared_data):
    # MATH's train and test splits share some problems verbatim or up to spacing/case.
    train, held, _ = splits.select_split(
        datasets=["math"], math_subjects=list(sources.MATH_SUBJECTS), holdout="official-test", data_dir=shared_data
    )
    manifest = splits.make_manifest(train, held, {})
    assert splits.find_leaks(train, manifest) == []
    full = loaders.load_problems(
        ["math"], split="train", math_subjects=list(sources.MATH_SUBJECTS), data_dir=shared_data
    )
    dropped = len(full) - len(train)
    assert dropped == len(splits.find_leaks(full, manifest)) and dropped > 0


def test_full_data_loads_with_gold_answers(shared_data):
    assert len(loaders.load_gsm8k("test", shared_data)) == 1319
    assert len(loaders.load_gsm8k("train", shared_data)) == 7473
    math_test = loaders.load_math("test", list(sources.MATH_SUBJECTS), data_dir=shared_data)
    assert len(math_test) == 5000  # every MATH test solution has a \boxed{} answer
