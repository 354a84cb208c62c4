"""Which worker holds a trial: claims, the machine-wide lock, heartbeats, and the test kill points.

Workers on one machine serialise their asks under DIR/.sweep.lock, and a worker asks and claims a
trial inside that lock: so, under it, a RUNNING trial with no claim was left by a process killed
between Optuna's `ask` and its claim, and is given up at once. A claimed trial whose process is
gone (same host) or that was released on Ctrl-C is taken over. Trials of other machines are only
recoverable through an RDB storage's heartbeats (study.py).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path):
    """An exclusive lock between the processes of this machine (released if the holder dies)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def process_id(pid: int) -> str | None:
    """A live process's start time (tells a reused pid apart); None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def unclaimed(trial, unclaimed_s: float | None) -> bool:
    """(Under the lock.) A RUNNING trial that no worker claimed: its asker was killed in `ask`.
    unclaimed_s None: at once (every asker is on this machine); else after that many seconds."""
    if "worker" in trial.user_attrs and trial.user_attrs.get("claimed", trial.number) == trial.number:
        return False
    if unclaimed_s is None:
        return True
    return (datetime.datetime.now() - trial.datetime_start).total_seconds() > unclaimed_s


def orphaned(trial) -> bool:
    """A claimed RUNNING trial no live worker holds: its process died, or let go of it on Ctrl-C."""
    worker = trial.user_attrs.get("worker")
    if worker is None:
        return False
    if worker.get("released"):
        return True
    if worker["host"] != socket.gethostname():
        return False  # another machine's: its heartbeats tell (RDB storage)
    return process_id(worker["pid"]) != worker["start"]


def claim(trial) -> None:
    """This process holds `trial` now. `trial` is the number it is reported and run under (a copy
    re-queued by an RDB's retry callback keeps the dead trial's); `claimed` marks the claim done."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "start": process_id(os.getpid())})
    trial.set_user_attr("attempts", trial.user_attrs.get("attempts", 0) + 1)
    trial.set_user_attr("trial", trial.user_attrs.get("trial", trial.number))  # a re-queued copy keeps its folder
    trial.set_user_attr("claimed", trial.number)


class Heartbeat:
    """Records `trial`'s heartbeat every `interval` s while the trial runs (RDB storages only):
    Optuna does this inside study.optimize, the sweep asks and tells, so it beats itself."""

    def __init__(self, storage, trial_id: int, interval: int | None):
        self.stop = threading.Event()
        self.thread = None
        if interval:
            storage.record_heartbeat(trial_id)
            self.thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)
            self.thread.start()

    def _beat(self, storage, trial_id, interval):
        while not self.stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a lost connection: the next beat tries again
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
