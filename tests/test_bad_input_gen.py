"""Bad input to generate and export, round 3 (issue 20): what selects nothing, paths the file system
refuses, export onto its own input, missing optional packages, foreign or old artefacts, encodings.

Same shape as tests/test_bad_input.py: one row per case (command, argv after the command's base
options, files to create first), run through the CLI in a fresh folder; each must exit 2 with a
one-line message naming the file, field or flag, no traceback, and nothing created or changed.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import reference_dataset
from refusal import GSM, TRACE, assert_refused, fill, jl, snapshot, write_files

from q2g import cli

GEN = ["--backend", "reference", "--data-dir", "packaged", "--limit", "2", "--out", "$OUT"]
GEN_LOCAL = ["--backend", "reference", "--data-dir", "$TMP/d", "--datasets", "gsm8k", "--out", "$OUT"]
MATH_LOCAL = ["--backend", "reference", "--data-dir", "$TMP/d", "--datasets", "math", "--out", "$OUT"]
EXPORT = ["--traces", "$TMP/ds", "--format", "messages", "--out", "$TMP/x.jsonl"]
BASE = {"generate": GEN, "export": EXPORT}
LONG = "n" * 300  # over NAME_MAX (255 bytes) on every common file system

MATH_ROW = {"problem": "1+1?", "level": "Level 1", "type": "Algebra", "solution": "So $\\boxed{2}$."}


def gsm_dir(train: str | bytes, test: str | bytes = jl(GSM)) -> dict:
    """A --data-dir $TMP/d whose gsm8k files hold `train` and `test`."""
    return {"d/gsm8k/train.jsonl": train, "d/gsm8k/test.jsonl": test}


def traces(text: str | bytes) -> dict:
    return {"ds/traces.jsonl": text}


@dataclass
class Case:
    id: str
    cmd: str
    argv: list
    msg: tuple
    files: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # link name -> target (relative to the work folder)
    hide: tuple = ()  # modules made unimportable (as if not installed)
    base: bool = True


def C(id, cmd, argv, msg, **kw) -> Case:
    return Case(id, cmd, list(argv), (msg,) if isinstance(msg, str) else tuple(msg), **kw)


CASES = [
    # ------------------------------------------------------------ a selection of nothing
    C(
        "gen-empty-gsm8k-file",
        "generate",
        GEN_LOCAL,
        "--datasets gsm8k selected no problem in $TMP/d/gsm8k/train.jsonl",
        files=gsm_dir(""),
        base=False,
    ),
    C(
        "gen-blank-lines-gsm8k-file",
        "generate",
        GEN_LOCAL,
        "--datasets gsm8k selected no problem in $TMP/d/gsm8k/train.jsonl",
        files=gsm_dir("\n\n  \n"),
        base=False,
    ),
    C(
        "gen-math-level-selects-nothing",
        "generate",
        [*MATH_LOCAL, "--math-levels", "5"],
        "--datasets math with --math-subjects algebra counting_and_probability, --math-levels 5 selected no problem",
        files={"d/math/train.jsonl": jl(MATH_ROW, MATH_ROW)},
        base=False,
    ),
    C(
        "gen-math-subject-selects-nothing",
        "generate",
        [*MATH_LOCAL, "--math-subjects", "geometry"],
        "--datasets math with --math-subjects geometry selected no problem in $TMP/d/math/train.jsonl",
        files={"d/math/train.jsonl": jl(MATH_ROW)},
        base=False,
    ),
    C(
        "gen-math-no-gold-answer",
        "generate",
        MATH_LOCAL,
        "--datasets math with --math-subjects algebra counting_and_probability selected no problem",
        files={"d/math/train.jsonl": jl({**MATH_ROW, "solution": "no box here"})},
        base=False,
    ),
    C(
        "gen-limit-all-held-out",
        "generate",
        ["--limit", "1", "--holdout-fraction", "0.9", "--datasets", "gsm8k"],
        ("no training problem left: all 1 selected problem(s) are in the holdout", "--limit 1"),
    ),
    C(
        "gen-official-test-empty",
        "generate",
        [*GEN_LOCAL, "--holdout", "official-test"],
        "--datasets gsm8k selected no problem in $TMP/d/gsm8k/test.jsonl",
        files=gsm_dir(jl(GSM), ""),
        base=False,
    ),
    C(
        "export-no-validated-trace",
        "export",
        [],
        "$TMP/ds/traces.jsonl: none of the 1 traces is marked `validated: true`",
        files=traces(jl({**TRACE, "validated": False})),
    ),
    C("export-empty-traces", "export", [], "$TMP/ds/traces.jsonl: no traces (the file is empty)", files=traces("")),
    # ------------------------------------------------------------ paths the file system refuses
    C("gen-out-name-too-long", "generate", ["--out", f"$TMP/{LONG}"], ("--out $TMP/nnnn", "is 300 bytes")),
    C(
        "gen-out-path-too-long",
        "generate",
        ["--out", "$TMP/" + "/".join(["p" * 200] * 21)],
        ("error: --out /", "...: the path is 4", "bytes (the file system allows 4095)"),
    ),
    C(
        "gen-data-dir-is-file",
        "generate",
        ["--data-dir", "$TMP/f.txt"],
        "data dir $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "export-traces-folder-without-traces",
        "export",
        ["--traces", "$TMP/empty"],
        "$TMP/empty/traces.jsonl: traces file not found",
        files={"empty/x.txt": ""},
    ),
    C(
        "gen-out-parent-is-file",
        "generate",
        ["--out", "$TMP/f.txt/sub"],
        "--out $TMP/f.txt/sub: $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "gen-out-grandparent-is-file",
        "generate",
        ["--out", "$TMP/f.txt/a/b"],
        "$TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "gen-out-is-file",
        "generate",
        ["--out", "$TMP/f.txt"],
        "--out $TMP/f.txt is a file, not a folder",
        files={"f.txt": "keep me\n"},
    ),
    C(
        "gen-data-file-is-folder",
        "generate",
        GEN_LOCAL,
        "$TMP/d/gsm8k/train.jsonl is a folder, not a file",
        files={"d/gsm8k/train.jsonl/x": "", "d/gsm8k/test.jsonl": jl(GSM)},
        base=False,
    ),
    C(
        "gen-data-latin1",
        "generate",
        GEN_LOCAL,
        "$TMP/d/gsm8k/train.jsonl:1: not UTF-8 (byte offset",
        files=gsm_dir(
            json.dumps({"question": "Caf\u00e9 costs?", "answer": "#### 5"}, ensure_ascii=False).encode("latin-1")
        ),
        base=False,
    ),
    C(
        "gen-data-nul",
        "generate",
        GEN_LOCAL,
        "$TMP/d/gsm8k/train.jsonl:2: not valid JSON",
        files=gsm_dir(jl(GSM) + '{"question": "a\x00b", "answer": "#### 1"}\n'),
        base=False,
    ),
    C(
        "gen-data-utf16",
        "generate",
        GEN_LOCAL,
        "$TMP/d/gsm8k/train.jsonl:1: not UTF-8",
        files=gsm_dir(jl(GSM).encode("utf-16")),
        base=False,
    ),
    C(
        "gen-data-huge-line",
        "generate",
        GEN_LOCAL,
        "$TMP/d/gsm8k/train.jsonl:2: a line of more than 16,777,216 characters",
        files=gsm_dir(jl(GSM) + json.dumps({"question": "x" * (1 << 24), "answer": "#### 1"}) + "\n"),
        base=False,
    ),
    C("export-out-name-too-long", "export", ["--out", f"$TMP/{LONG}.jsonl"], "is 306 bytes", files=traces(jl(TRACE))),
    C(
        "export-out-parent-is-file",
        "export",
        ["--out", "$TMP/f.txt/x.jsonl"],
        "--out $TMP/f.txt/x.jsonl: $TMP/f.txt is a file, not a folder",
        files={**traces(jl(TRACE)), "f.txt": "keep me\n"},
    ),
    C(
        "export-out-is-folder",
        "export",
        ["--out", "$TMP/d"],
        "--out $TMP/d is a folder, not a file",
        files={**traces(jl(TRACE)), "d/keep.txt": "keep me\n"},
    ),
    C(
        "export-traces-latin1",
        "export",
        [],
        "$TMP/ds/traces.jsonl:1: not UTF-8",
        files=traces(json.dumps({**TRACE, "problem": "Caf\u00e9?"}, ensure_ascii=False).encode("latin-1")),
    ),
    C(
        "export-traces-huge-line",
        "export",
        [],
        "$TMP/ds/traces.jsonl:1: a line of more than",
        files=traces(jl({**TRACE, "qwen_trace": "y" * (1 << 24)})),
    ),
    # ------------------------------------------------------------ export onto its own input
    C(
        "export-out-is-input",
        "export",
        ["--out", "$TMP/ds/traces.jsonl"],
        "--out $TMP/ds/traces.jsonl lies inside the --traces $TMP/ds",
        files=traces(jl(TRACE)),
    ),
    C(
        "export-out-is-input-file-arg",
        "export",
        ["--traces", "$TMP/ds/traces.jsonl", "--out", "$TMP/ds/traces.jsonl"],
        "--out $TMP/ds/traces.jsonl is the --traces $TMP/ds/traces.jsonl",
        files=traces(jl(TRACE)),
    ),
    C(
        "export-out-is-input-relative",
        "export",
        ["--out", "ds/../ds/./traces.jsonl"],
        "--out ds/../ds/traces.jsonl lies inside the --traces $TMP/ds",
        files=traces(jl(TRACE)),
    ),
    C(
        "export-out-is-input-via-symlink",
        "export",
        ["--out", "$TMP/link.jsonl"],
        "--out $TMP/link.jsonl lies inside the --traces $TMP/ds",
        files=traces(jl(TRACE)),
        links={"link.jsonl": "ds/traces.jsonl"},
    ),
    C(
        "export-out-is-input-via-folder-symlink",
        "export",
        ["--out", "$TMP/alias/traces.jsonl"],
        "--out $TMP/alias/traces.jsonl lies inside the --traces $TMP/ds",
        files=traces(jl(TRACE)),
        links={"alias": "ds"},
    ),
    # ------------------------------------------------------------ optional packages not installed
    C(
        "gen-vllm-missing",
        "generate",
        ["--backend", "vllm"],
        "--backend vllm needs the vllm package, which is not installed: pip install 'q2g[vllm]'",
        hide=("vllm",),
    ),
    C(
        "gen-openai-missing",
        "generate",
        ["--backend", "openai", "--teacher", "m"],
        "--backend openai needs the openai package, which is not installed: pip install 'q2g[openai]'",
        hide=("openai",),
    ),
    C(
        "gen-openai-missing-sharded",
        "generate",
        ["--backend", "openai", "--teacher", "m", "--shard", "0/2"],
        "pip install 'q2g[openai]'",
        hide=("openai",),
    ),
    # ------------------------------------------------------------ old or foreign artefacts
    C(
        "gen-out-config-of-another-tool",
        "generate",
        [],
        "$OUT/config.json holds a JSON list, not a q2g config",
        files={"out/config.json": "[1, 2]\n"},
    ),
    C(
        "gen-out-config-not-json",
        "generate",
        [],
        "$OUT/config.json is not valid JSON",
        files={"out/config.json": "epochs = 3\n"},
    ),
    C(
        "gen-out-stray-traces",
        "generate",
        [],
        "traces.jsonl exist(s) without a config.json",
        files={"out/traces.jsonl": jl(TRACE)},
    ),
    C(
        "export-traces-without-validated-field",
        "export",
        [],
        "$TMP/ds/traces.jsonl: none of the 1 traces is marked `validated: true`",
        files=traces(jl({k: v for k, v in TRACE.items() if k != "validated"})),
    ),
]


def test_the_corpus_covers_every_kind():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=3)


def prepare(case: Case, work: Path, subs: dict) -> list[str]:
    write_files(work, case.files, subs)
    for name, target in case.links.items():
        (work / name).symlink_to(work / target)
    return [fill(a, subs) for a in (BASE[case.cmd] if case.base else []) + case.argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gen(case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for name in case.hide:
        monkeypatch.setitem(sys.modules, name, None)
    subs = {"$OUT": str(work / "out"), "$TMP": str(work)}
    argv = prepare(case, work, subs)
    before = snapshot(tmp_path)

    code = cli.call(case.cmd, argv)

    assert_refused(code, capsys.readouterr().err, 2, case.msg, subs, before, snapshot(tmp_path))


# ---------------------------------------------------------------- rows that need a finished run first


def test_resume_over_traces_of_an_older_q2g_is_refused(tmp_path, capsys):
    """A traces.jsonl without the fields resume reads (an older q2g's) is refused, named, untouched."""
    out = tmp_path / "out"
    argv = ["--backend", "reference", "--data-dir", "packaged", "--limit", "3", "--out", str(out)]
    assert cli.call("generate", argv) == 0
    path = out / "traces.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(jl(*({k: v for k, v in r.items() if k != "problem_id"} for r in rows)))
    before = snapshot(out)
    capsys.readouterr()
    assert cli.call("generate", argv) == 2
    err = capsys.readouterr().err
    assert f"{path}: record 1 has no field 'problem_id'" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_resume_over_a_foreign_summary_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--backend", "reference", "--data-dir", "packaged", "--limit", "3", "--out", str(out)]
    assert cli.call("generate", argv) == 0
    (out / "summary.json").write_text("[]\n")
    before = snapshot(out)
    capsys.readouterr()
    assert cli.call("generate", argv) == 2
    assert f"{out / 'summary.json'}: not a q2g summary" in capsys.readouterr().err
    assert snapshot(out) == before


def test_split_of_another_version_is_refused(tmp_path, dataset, capsys):
    from q2g.data.splits import load_holdout

    manifest = json.loads((dataset / "split.json").read_text())
    for version, msg in ((2, "split manifest version 2, this q2g reads version 1"), ("1", "version '1'")):
        (tmp_path / "split.json").write_text(json.dumps({**manifest, "version": version}))
        (tmp_path / "holdout.jsonl").write_text((dataset / "holdout.jsonl").read_text())
        with pytest.raises(Exception, match=msg) as info:
            load_holdout(tmp_path / "split.json")
        assert info.value.exit_code == 2
    (tmp_path / "split.json").write_text(json.dumps({**manifest, "holdout": []}))
    with pytest.raises(Exception, match="the holdout has no problems") as info:
        load_holdout(tmp_path)
    assert info.value.exit_code == 2


def test_a_data_file_with_a_bom_or_crlf_reads_like_plain_utf8(tmp_path):
    """Encodings that are not errors: a UTF-8 BOM (Windows editors) and CRLF line ends."""
    from q2g.data.loaders import load_gsm8k

    (tmp_path / "gsm8k").mkdir()
    plain = jl(GSM, {**GSM, "question": "Caf\u00e9: 1+1?", "answer": "#### 2"})
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode())
    rows = load_gsm8k("test", tmp_path)
    assert [r["answer"] for r in rows] == ["5", "2"] and rows[1]["problem"] == "Caf\u00e9: 1+1?"
