"""What every bad-input corpus (tests/test_bad_input*.py) shares: the rows it writes, the
placeholders it fills, and the one check of a refusal: the exit code, no traceback, each expected
message, and nothing written or changed under the watched folders.

    before = snapshot(*roots)
    code = cli.call(cmd, argv)
    assert_refused(code, capsys.readouterr().err, want_code, msgs, subs, before, snapshot(*roots))
"""

import hashlib
import json
import os
from pathlib import Path

GSM = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
TRACE = {
    "id": "t1",
    "problem": "What is 2+3?",
    "qwen_trace": "2+3=5. The final answer is $\\boxed{5}$.",
    "answer": "5",
    "source": "gsm8k",
    "validated": True,
}


def jl(*rows) -> str:
    """JSON Lines of `rows` (a str row is written as it is: a broken line on purpose)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def fill(text: str, subs: dict) -> str:
    """`text` with every placeholder of `subs` ($OUT, $TMP, ...) replaced, in the dict's order."""
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def write_files(work: Path, files: dict, subs: dict) -> None:
    """Each name -> content under `work`: bytes as they are, text with its placeholders filled."""
    for name, content in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else fill(content, subs).encode())


def snapshot(*roots: Path) -> dict:
    """Every file and folder under `roots` -> a digest of its bytes (None for a folder or a link)."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                found[os.path.join(dirpath, name)] = None
            for name in filenames:
                path = os.path.join(dirpath, name)
                found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest() if os.path.isfile(path) else None
    return found


def assert_refused(code: int, err: str, want_code: int, msgs, subs: dict, before: dict, after: dict) -> None:
    """The command exited `want_code` without a traceback, said every one of `msgs`, and wrote nothing."""
    assert code == want_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for text in msgs:
        assert fill(text, subs) in err, err[-3000:]
    assert sorted(set(after) - set(before)) == [], "written although refused"
    assert {k for k in before if after.get(k, "gone") != before[k]} == set(), "changed although refused"
