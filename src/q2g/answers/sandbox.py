"""math-verify in a time-boxed worker process: the symbolic check and the fallback extraction.

math-verify's own timeout uses signal.alarm, which fails off the main thread, and only killing a
process stops a runaway sympy computation; so both run in a separate worker process with a hard
time budget per request (`CHECK_TIMEOUT_S`, or the caller's), and a request that overruns gets
None (the check: wrong) and a fresh worker. Starting the worker (once, and again after a request
overran) imports sympy in about 1-2 s that no check's budget pays for; requests from several
threads take turns. Where no process can be spawned, requests run in a thread instead.
`too_deep_or_huge` screens out inputs that would make sympy build astronomically large numbers.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0  # per symbolic check; worker start-up is not counted
START_TIMEOUT_S = 60.0  # to spawn the worker and import sympy in it
MAX_SYMBOLIC_CHARS = 2000
MAX_SYMBOLIC_DEPTH = 8  # MATH golds nest 3 deep at most; latex2sympy is exponential in it
_SRC = str(Path(__file__).resolve().parents[2])  # puts q2g on the worker's path
_BRACKET_RE = re.compile(r"[{}()\[\]]")

_TOWER_RE = re.compile(r"\^\s*(?:\{[^{}]*|[\w(]+)\^")  # `9^{9^9}`, `2^2^2`: exponents of exponents
_HUGE_RE = re.compile(r"\^\s*\{?\s*-?\d{6}|\d{6}\s*!")  # `10^{1000000}`, `100000!`


def too_deep_or_huge(s: str) -> bool:
    if _TOWER_RE.search(s) or _HUGE_RE.search(s):
        return True
    depth = 0
    for m in _BRACKET_RE.finditer(s):
        depth += 1 if m.group() in "{([" else -1
        if depth > MAX_SYMBOLIC_DEPTH:
            return True
    return False


# ---------------------------------------------------------------- symbolic check worker


def _symbolic_check(pred: str, gold: str) -> bool:
    """math-verify's verdict, with its signal-based timeouts off (the caller enforces one).

    Only its LaTeX parser: the plain-expression one goes through sympy's parse_expr, an eval.
    """
    try:
        from math_verify import LatexExtractionConfig, parse, verify

        config = [LatexExtractionConfig()]
        gold_parsed = parse("\\boxed{" + gold + "}", config, parsing_timeout=None)
        pred_parsed = parse("\\boxed{" + pred + "}", config, parsing_timeout=None)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # a parser or sympy failure on odd input is a wrong answer, not a crash
        return False


def _mv_extract(text: str) -> tuple[str, str] | None:
    """(answer, `mv_latex` or `mv_expr`) as math-verify's own extraction reads `text`, else None.

    Its expression extractor hands parse_expr (an eval) only what its regex admits: digits,
    spaces, `.` and `+-*/^()`, so no name in the model output can reach eval.
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

        both = parse(text, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if len(both) < 2 or not both[1].strip():  # [value, the string first tried]: nothing read
            return None
        latex = parse(text, [LatexExtractionConfig()], parsing_timeout=None)
        if len(latex) > 1 and latex[1] == both[1]:
            return _joined(latex[1]), "mv_latex"
        expr = parse(text, [ExprExtractionConfig()], parsing_timeout=None)
        return (expr[1], "mv_expr") if len(expr) > 1 else (_joined(both[1]), "mv_latex")
    except Exception:
        return None


def _joined(latex: str) -> str:
    """Several `$..$` groups read as one set come back joined by " and "."""
    parts = latex.split(" and ")
    return ", ".join(parts) if len(parts) > 1 else latex


_OPS = {"verify": _symbolic_check, "extract": _mv_extract}


def serve(fd: int) -> None:
    """Worker process loop: answer (op, *args) requests on socket `fd` until the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we enforce one
    conn = Connection(fd)
    _symbolic_check("1", "1")  # import sympy now, not inside the first check's budget
    _mv_extract("$1$")
    conn.send("ready")
    while True:
        try:
            op, *args = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_OPS[op](*args))


class _Worker:
    """One worker process running math-verify; killed and replaced when a request overruns.

    A plain subprocess, not multiprocessing: that would re-import the caller's __main__ (fails
    for stdin scripts, re-runs unguarded ones) and is refused inside daemonic Pool workers.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = self.conn = None
        self.ready = False
        self.can_spawn = True

    def call(self, request: tuple, timeout: float):
        """The worker's answer to `request`, or None when it overran `timeout` or died."""
        with self.lock:
            if not self._wait_ready():
                return _call_in_thread(request, timeout)
            try:
                self.conn.send(request)
                if self.conn.poll(timeout):
                    return self.conn.recv()
            except (EOFError, OSError):  # the worker died, e.g. out of memory
                pass
            self._stop()
            self._start()  # warm up the replacement while the caller gets on with its work
            return None

    def check(self, pred: str, gold: str, timeout: float) -> bool:
        return bool(self.call(("verify", pred, gold), timeout))

    def _start(self) -> None:
        parent, child = socket.socketpair()
        code = (
            f"import sys; sys.path.insert(0, {_SRC!r}); from q2g.answers.sandbox import serve; serve({child.fileno()})"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
            )
            self.conn = Connection(parent.detach())
        except (OSError, ValueError) as err:
            logger.warning("answer-check worker not started (%s); checking in a thread", err)
            parent.close()
            self.can_spawn, self.proc = False, None
        finally:
            child.close()

    def _wait_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:  # died while idle
            self._stop()
        if self.proc is None and self.can_spawn:
            self._start()
        if self.proc is None:
            return False
        try:
            self.ready = self.ready or (self.conn.poll(START_TIMEOUT_S) and self.conn.recv() == "ready")
        except (EOFError, OSError):
            self.ready = False
        if not self.ready:
            logger.warning("answer-check worker did not start; checking in a thread")
            self._stop()
            self.can_spawn = False
        return self.ready

    def close(self) -> None:
        if self.proc is not None:
            self._stop()

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()
        self.proc = self.conn = None
        self.ready = False


def _call_in_thread(request: tuple, timeout: float):
    """Fallback where no process can be spawned: give up waiting after `timeout` (it runs on)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    op, *args = request
    result = []
    thread = threading.Thread(target=lambda: result.append(_OPS[op](*args)), daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def _check_in_thread(pred: str, gold: str, timeout: float) -> bool:
    return bool(_call_in_thread(("verify", pred, gold), timeout))


_WORKER = _Worker()


def start_worker() -> bool:
    """Start the math-verify worker now (up to START_TIMEOUT_S), so no later check waits for it.

    Benchmarks and timing tests call it; graders need not: the first check starts it. False
    where no process can be started (checks then run in a thread).
    """
    with _WORKER.lock:
        return _WORKER._wait_ready()


def _reset_worker() -> None:
    global _WORKER
    _WORKER = _Worker()  # a forked child must not share its parent's socket


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_worker)
atexit.register(lambda: _WORKER.close())


@lru_cache(maxsize=8192)
def worker_call(request: tuple, timeout: float):
    """The worker's answer to `request` (None past `timeout`); no time left means no request."""
    return _WORKER.call(request, timeout) if timeout > 0 else None


def symbolic_equal(pred: str, gold: str, timeout: float) -> bool:
    return bool(worker_call(("verify", pred, gold), timeout))
