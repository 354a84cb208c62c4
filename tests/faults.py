"""Faults the tests inject into a q2g subprocess; q2g itself reads no test hook (issue 25).

    env = faults_env(tmp_path, delay("q2g.backends.reference", "ReferenceBackend.generate", 0.3))
    subprocess.Popen([sys.executable, "-m", "q2g.cli", ...], env=env)

`faults_env` writes the given code as a `sitecustomize.py` into a folder of its own and puts that
folder first on the subprocess's PYTHONPATH: Python runs it at start-up, before the command, so it
can wrap a q2g function (sleep before it, SIGKILL at its n-th call). Every process of the
subprocess's tree (torchrun's workers too) inherits it.
"""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def faults_env(tmp_path: Path, code: str, env: dict | None = None) -> dict:
    folder = tmp_path / "faults"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(code, encoding="utf-8")
    env = dict(os.environ if env is None else env)
    paths = [str(folder), str(SRC), str(TESTS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def delay(module: str, attribute: str, seconds: float, when: str = "True") -> str:
    """sitecustomize code: sleep `seconds` before every call of module.attribute (`Class.method`
    allowed) for which the Python expression `when` (over the call's `a`, `k`) is true."""
    owner, _, name = f"{module}.{attribute}".rpartition(".")
    head, _, cls = owner.partition(f"{module}.") if owner != module else (owner, "", "")
    return f"""
import functools, importlib, time
_m = importlib.import_module({module!r})
_owner = getattr(_m, {cls!r}) if {cls!r} else _m
_f = getattr(_owner, {name!r})

@functools.wraps(_f)
def _delayed(*a, **k):
    if {when}:
        time.sleep({seconds})
    return _f(*a, **k)

setattr(_owner, {name!r}, _delayed)
"""
