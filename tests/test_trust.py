"""Issue 26, trust by design: the output guard, the folder lock, the strict config loader.

- every command (finetune, merge, export, evaluate, generate) refuses an --out that is, lies inside
  or holds each of its inputs, and writes nothing;
- a second finetune on a folder a running one holds is refused at once (pid and host named), and the
  first run goes on writing correctly (metrics.jsonl holds each epoch once); a killed holder never
  blocks; a resume with other traces of the same count is refused (their content is hashed);
- the guard's pieces on their own: `~`/$VARS, empty paths, devices, fifos, link loops, renames over
  special files, an empty $Q2G_CACHE; YAML merge keys accepted, a pipe read once, messages bounded.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, finetune_argv, reference_dataset
from refusal import snapshot

from q2g import cli
from q2g.errors import BadInput, ConfigError
from q2g.io import atomic_write_text, cache_dir
from q2g.out_guard import check_output, expand, hold_lock


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("trust-ds"), limit=3)


@pytest.fixture(scope="module")
def adapter(tiny_gemma_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("trust-adapter")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gemma_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------- --out against every input of every command

EVAL = ["--eval-limit", "1", "--eval-max-new-tokens", "2", "--ppl-max-tokens", "32", "--data-dir", "packaged"]
# command -> (its argv with {input} placeholders, the inputs: label in the message -> placeholder, output kind)
COMMANDS = {
    "finetune": (["--base-model", "{model}", "--traces", "{ds}", *EVAL], {"--base-model": "model", "--traces": "ds"}),
    "merge": (["--adapter", "{adapter}", "--base-model", "{model}"], {"--adapter": "adapter", "base model": "model"}),
    "export": (["--traces", "{ds}", "--format", "messages"], {"--traces": "ds"}),
    "evaluate": (
        ["--model", "{model}", "--adapter", "{adapter}", "--split", "{ds}/split.json", *EVAL],
        {"--model": "model", "--adapter": "adapter", "--split": "split"},
    ),
    "generate": (["--backend", "reference", "--data-dir", "{data}", "--limit", "2"], {"--data-dir": "data"}),
}
CASES = [
    (cmd, label, how) for cmd, (_, inputs) in COMMANDS.items() for label in inputs for how in ("is", "in", "holds")
]


def place_inputs(root: Path, dataset, tiny_gemma_dir, adapter) -> dict:
    """Each input copied into a folder of its own (so 'holds' names exactly one input)."""
    paths = {}
    for name, src in (
        ("model", tiny_gemma_dir),
        ("ds", dataset),
        ("adapter", adapter),
        ("data", REPO / "src/q2g/assets/data"),
    ):
        paths[name] = root / f"box-{name}" / name
        shutil.copytree(src, paths[name])
    paths["split"] = paths["ds"] / "split.json"
    return paths


@pytest.mark.parametrize("cmd,label,how", CASES, ids=[f"{c}-{lab.strip('-')}-{h}" for c, lab, h in CASES])
def test_out_never_meets_an_input(cmd, label, how, tmp_path, dataset, tiny_gemma_dir, adapter, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = place_inputs(tmp_path, dataset, tiny_gemma_dir, adapter)
    argv_t, inputs = COMMANDS[cmd]
    target = paths[inputs[label]]
    out = {"is": target, "in": target / "sub" if target.is_dir() else target.parent / "sub", "holds": target.parent}[
        how
    ]
    if cmd == "export" and how == "is":
        out = target / "traces.jsonl"  # export writes a file: the traces file itself
    words = {"is": "is the", "in": "lies inside the", "holds": "holds the"}[how]
    if how == "in" and not target.is_dir():  # a file input: its folder holds it, out beside is fine; test 'is' instead
        out, words = target, "is the"
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv_t] + ["--out", str(out)]
    before = snapshot(tmp_path)
    code = cli.call(cmd, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "q2g never writes onto what it reads" in err, err
    assert f"{words} {label}" in err or (cmd == "export" and "the --traces" in err), err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


# ---------------------------------------------------------------- the lock: a second finetune is refused


PAUSE = """
import sys, time, pathlib
from q2g.finetune import stage
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
train_all = stage.train_all
def paused(run, base):  # the lock is held here: config.json written, training about to start
    ready.write_text("ready")
    t0 = time.time()
    while not go.exists() and time.time() - t0 < 300:
        time.sleep(0.1)
    return train_all(run, base)
stage.train_all = paused
from q2g.cli import main
sys.exit(main(["finetune", *sys.argv[3:]]))
"""


def test_a_second_finetune_is_refused_while_the_first_writes_on(tmp_path, dataset, tiny_gemma_dir, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    out, ready, go = tmp_path / "ck", tmp_path / "ready", tmp_path / "go"
    argv = finetune_argv(tiny_gemma_dir, ds, out, epochs=2)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TQDM_DISABLE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSE, str(ready), str(go), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        t0 = time.time()
        while not ready.exists():
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.2)
        before = snapshot(out)
        assert cli.call("finetune", argv) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another q2g run (pid {first.pid} on host {socket.gethostname()})" in err, err
        assert "Traceback" not in err and snapshot(out) == before
        go.write_text("go")
        log = first.communicate(timeout=600)[0].decode()
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, log[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(epochs) == [0, 1, 2]  # each epoch once: the second run wrote nothing

    # a resume with other traces of the same count is refused: the content is compared, not the count
    rows = [json.loads(line) for line in (ds / "traces.jsonl").read_text().splitlines()]
    rows[0]["qwen_trace"] += " (edited)"
    (ds / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(out)
    assert cli.call("finetune", [*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "traces_sha256" in err and "Traceback" not in err, err
    assert snapshot(out) == before


def test_a_killed_holder_never_blocks(tmp_path, capsys):
    code = "import sys, time; from q2g.out_guard import hold_lock\nwith hold_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(300)"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "f")], env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(BadInput, match=f"in use by another q2g run \\(pid {holder.pid} on host "):
            with hold_lock(tmp_path / "f"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_lock(tmp_path / "f") as folder:  # the kernel dropped the lock with the process
        assert (folder / ".q2g.lock").read_text().startswith(f"{os.getpid()} ")
        with pytest.raises(BadInput, match=f"pid {os.getpid()} on host"):  # and a second holder is refused
            with hold_lock(tmp_path / "f"):
                pass


# ---------------------------------------------------------------- the guard's pieces


def test_paths_expand_the_same_on_the_command_line_and_in_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("Q2G_T_DIR", str(tmp_path / "v"))
    assert expand("~/x", "--out") == str(tmp_path / "x")
    assert expand("$Q2G_T_DIR/y", "--out") == expand("${Q2G_T_DIR}/y", "--out") == str(tmp_path / "v" / "y")
    for bad, why in (("", "an empty path"), ("  ", "an empty path"), ("$Q2G_T_UNSET/x", "$Q2G_T_UNSET is not set")):
        with pytest.raises(BadInput, match=why.replace("$", r"\$")):
            expand(bad, "--out")
    from q2g.generate.config import parse

    (tmp_path / "g.yaml").write_text("out: ~/runs/$Q2G_T_DIR_NAME\n")
    monkeypatch.setenv("Q2G_T_DIR_NAME", "a")
    assert parse(["--config", str(tmp_path / "g.yaml")]).out == str(tmp_path / "runs" / "a")  # not a folder named ~
    assert parse(["--out", "~/runs/a"]).out == str(tmp_path / "runs" / "a")


def test_an_empty_q2g_cache_counts_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("Q2G_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "q2g"  # never ./ (it wrote ./baselines)
    monkeypatch.setenv("Q2G_CACHE", "~/c")
    assert cache_dir() == tmp_path / "c"


def test_special_files_and_link_loops_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for out, folder, why in (
        ("/dev/null", False, "is a device or special file"),
        ("/dev/full", True, "is a device or special file"),
        (tmp_path / "fifo", False, "is a device or special file"),
        (tmp_path / "a", True, "is a loop of symbolic links"),
        (tmp_path / "a" / "x", True, "is a loop of symbolic links"),
    ):
        with pytest.raises(BadInput, match=why):
            check_output(out, folder=folder)
    with pytest.raises(BadInput, match="q2g replaces only regular files"):
        atomic_write_text(tmp_path / "fifo", "x")  # a rename never turns a fifo (or /dev/full) into a file
    assert (tmp_path / "fifo").is_fifo()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "target").write_text("kept")
    atomic_write_text(tmp_path / "link", "new")  # a link is replaced, its target is not written through
    assert (tmp_path / "target").read_text() == "kept" and (tmp_path / "link").read_text() == "new"


def test_ctrl_c_during_start_up_exits_130_with_one_line(monkeypatch, capsys):
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert cli.main(["finetune", "--help"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted:") and "Traceback" not in err


# ---------------------------------------------------------------- the config loader


def test_yaml_merge_keys_and_anchors_are_accepted(tmp_path):
    from q2g.generate.config import parse

    (tmp_path / "c.yaml").write_text(
        "generate:\n  <<: &base {seed: 3, limit: 2}\n  limit: 4\n  data_dir: &d packaged\nfinetune:\n  data_dir: *d\n"
    )
    cfg = parse(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.seed, cfg.limit, cfg.data_dir) == (3, 4, "packaged")  # merged, then overridden


def test_a_config_from_a_pipe_is_read_once(tmp_path):
    from q2g.config import load_yaml
    from q2g.generate.config import parse

    read, write = os.pipe()
    os.write(write, b"generate:\n  seed: 7\n  limit: 2\n")
    os.close(write)
    path = f"/dev/fd/{read}"
    try:
        assert load_yaml(path)["generate"]["seed"] == 7  # q2g run reads it ...
        assert parse(["--config", path]).seed == 7  # ... and so does each stage: the same bytes
    finally:
        os.close(read)


def test_an_alias_bomb_is_echoed_in_200_characters(tmp_path, capsys):
    levels = ["  - &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    (tmp_path / "c.yaml").write_text("temperature:\n" + "\n".join(levels) + "\n")  # 9^6 x once expanded
    code = cli.call("generate", ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err) < 1000, err[:2000]
    assert not (tmp_path / "o").exists()


def test_shard_layout_change_is_refused(tmp_path, capsys):
    base = ["--backend", "reference", "--data-dir", "packaged", "--limit", "2", "--out", str(tmp_path / "g")]
    assert cli.call("generate", [*base, "--shard", "0/2"]) == 0
    before = snapshot(tmp_path)
    assert cli.call("generate", [*base, "--shard", "0/3"]) == 2
    err = capsys.readouterr().err
    assert "--shard 0/3: " in err and "holds shards of 2" in err and snapshot(tmp_path) == before


def test_config_errors_are_config_errors():
    from q2g.finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match="--max-steps: must be >= 1, or -1 for no limit"):
        FinetuneConfig(max_steps=0)
