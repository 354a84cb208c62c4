"""Bad input to `q2g sweep`: exit 2, a one-line message naming the flag, key or path, and nothing
written (no sweep folder, no dataset: every stage's settings, the student model and the storage are
checked before generate runs). One row per case; each runs in a fresh folder (also the cwd)."""

import os
from dataclasses import dataclass, field

import pytest

pytest.importorskip("optuna")

from refusal import fill, snapshot  # noqa: E402

from q2g import cli  # noqa: E402

FINETUNE = """  base_model: $MODEL
  data_dir: packaged
  epochs: 1
  eval_limit: 2
"""


def sweep_yaml(finetune: str = FINETUNE, sweep: str = "", generate: str = "", top: str = "") -> str:
    return (
        f"{top}generate:\n  backend: reference\n  teacher: reference\n  data_dir: packaged\n  limit: 2\n{generate}"
        f"finetune:\n{finetune}sweep:\n  sampler: grid\n{sweep}  space:\n    lora_r: [4, 8]\n"
    )


@dataclass
class Case:
    id: str
    argv: list
    msg: tuple
    yaml: str = field(default_factory=sweep_yaml)
    dirs: tuple = ()  # folders to create first
    files: tuple = ()  # files to create first
    code: int = 2


CASES = [
    Case("journal-folder-missing", ["--storage", "$TMP/nope/study.journal"], ("nope/study.journal", "does not exist")),
    Case("journal-is-a-folder", ["--storage", "$TMP/adir"], ("adir: is a folder",), dirs=("adir",)),
    Case("sqlite-folder-missing", ["--storage", "sqlite:///$TMP/nope/x.db"], ("nope/x.db", "does not exist")),
    Case("sqlite-is-a-folder", ["--storage", "sqlite:///$TMP/adir"], ("adir: is a folder",), dirs=("adir",)),
    Case("sqlite-in-memory", ["--storage", "sqlite://"], ("in-memory SQLite study is lost",)),
    Case("url-bad-port", ["--storage", "postgresql://u@host:notaport/db"], ("not a database URL", "notaport")),
    Case("url-unparsable", ["--storage", "://x"], ("not a database URL",)),
    Case("url-unknown-dialect", ["--storage", "oracle2://h/db"], ("unknown database 'oracle2'", "postgresql://")),
    Case("url-unknown-driver", ["--storage", "postgresql+nosuch://h/db"], ("unknown driver 'postgresql+nosuch'",)),
    Case("url-missing-driver", ["--storage", "mysql://u:secret@h/db"], ("driver is not installed", "pip install")),
    Case(
        "url-named-driver-missing",
        ["--storage", "postgresql+pg8000://u:secret@h/db"],
        ("postgresql driver is not installed", "pip install pg8000"),
    ),
    Case("url-no-host", ["--storage", "postgresql:///db"], ("no server host",)),
    Case(
        "server-unreachable",
        ["--storage", "postgresql://u:secret@127.0.0.1:1/db"],
        ("cannot open the database", "127.0.0.1"),
    ),
    Case("out-is-a-file", ["--out", "$TMP/afile"], ("--out", "afile is a file"), files=("afile",)),
    Case(
        "out-parent-is-a-file",
        ["--out", "$TMP/afile/sub"],
        ("--out", "afile", "is a file, not a folder"),
        files=("afile",),
    ),
    Case(
        "grace-not-longer", ["--heartbeat-interval", "5", "--grace-period", "5"], ("grace_period (5) must be longer",)
    ),
    Case("heartbeat-zero", ["--heartbeat-interval", "0"], ("--heartbeat-interval: must be >= 1",)),
    Case("n-trials-negative", ["--n-trials", "-1"], ("--n-trials: must be >= 1",)),
    Case(
        "model-missing",
        [],
        ("no folder /nonexistent/student",),
        yaml=sweep_yaml(FINETUNE.replace("$MODEL", "/nonexistent/student")),
    ),
    Case(
        "finetune-unknown-key",
        [],
        ("unknown option 'finetune.lora_rr'",),
        yaml=sweep_yaml(FINETUNE + "  lora_rr: 8\n"),
    ),
    Case(
        "finetune-bad-type",
        [],
        ("finetune.lr: must be a float, got 'fast'",),
        yaml=sweep_yaml(FINETUNE + "  lr: fast\n"),
    ),
    Case("generate-unknown-key", [], ("generate.temprature",), yaml=sweep_yaml(generate="  temprature: 0.5\n")),
    Case("sweep-unknown-key", [], ("sweep.n_trial",), yaml=sweep_yaml(sweep="  n_trial: 3\n")),
    Case("sweep-bad-grace", [], ("sweep.grace_period",), yaml=sweep_yaml(sweep="  grace_period: soon\n")),
    Case("out-not-a-name", [], ("out: must be a folder name",), yaml=sweep_yaml(top="out: [a, b]\n")),
    Case("no-sweep-section", [], ("no `sweep:` section",), yaml="finetune:\n  base_model: $MODEL\n"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_sweep_input(case, tmp_path, tiny_gemma_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subs = {"$TMP": str(tmp_path), "$MODEL": str(tiny_gemma_dir)}

    for d in case.dirs:
        (tmp_path / d).mkdir()
    for f in case.files:
        (tmp_path / f).write_text("x")
    config = tmp_path / "sweep.yaml"
    config.write_text(fill(case.yaml, subs))
    argv = ["--config", str(config), *(["--out", str(tmp_path / "out")] if "--out" not in case.argv else [])]
    before = snapshot(tmp_path)
    code = cli.call("sweep", argv + [fill(a, subs) for a in case.argv])
    err = capsys.readouterr().err
    assert code == case.code, err
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert all(fill(m, subs) in line for m in case.msg), line
    assert "Traceback" not in err and "secret" not in err  # no password in a message
    assert snapshot(tmp_path) == before  # nothing written, not even the sweep folder


def test_the_sweep_corpus_covers_storage_paths_and_stages():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert os.sep  # (rows are POSIX paths)
