"""The output guard: the one check every command's outputs pass, and the lock a run holds on its folder.

    out = check_output(args.out, "--out", inputs={"--model": args.model, "--split": args.split})
    ...every other check of the run...
    with hold_lock(out):        # the folder is made and locked; only now does anything get written
        write(...)

`check_output` refuses (BadInput, exit 2, naming both paths) an output that cannot be right:
- empty, or naming an environment variable that is not set (`~` and `$VARS` are expanded by
  `expand`, the same for a flag and a YAML value, since the shell expands only the former);
- the same as, inside, or holding any input of the same run (model folder, adapter, traces, split,
  data folder, cache): q2g never writes onto what it reads (links and `..` are resolved first);
- a device, pipe or socket (an atomic rename would turn `/dev/full` into a regular file);
- a path through a loop of symbolic links;
- a name longer than the file system allows, a parent that is a file, a folder where a file goes
  (or a file where a folder goes), a parent that cannot be written.

`hold_lock` takes an advisory `fcntl.flock` on `.q2g.lock` inside the folder (or beside a file
output) for the whole run. The kernel drops it when the process ends, however it ends, so a killed
run never blocks `--resume`; a second run on the same folder is refused at once, naming the pid and
host of the one that holds it (q2g does not wait: two runs into one folder is a mistake to fix,
not a queue). The lock file is removed at the end while still held; a run that opened it just before checks,
once it holds a lock, that the file at the path is still the one it locked, else takes the new one.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from q2g.errors import BadInput
from q2g.io import cache_dir, expand, path_error, write_failed

__all__ = ["check_output", "check_inputs", "expand", "hold_lock", "lock_beside", "refuse_if_held"]
PACKAGED_DATA = Path(__file__).resolve().parent / "assets" / "data"

LOCK_NAME = ".q2g.lock"
DEFAULT_NAME_MAX, DEFAULT_PATH_MAX = 255, 4096


def check_loop(path: Path, label: str) -> None:
    """Refuse a path that runs through a loop of symbolic links (ELOOP), before anything uses it."""
    for p in (path, *path.parents):
        if os.path.islink(p):
            try:
                os.stat(p)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise BadInput(f"{label} {path}: {p} is a loop of symbolic links") from None


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_name_lengths(path: Path, flag: str) -> None:
    """Refuse a path whose name (or whole) is longer than the file system allows, before any use."""
    existing = next((p for p in (path.absolute(), *path.absolute().parents) if os.path.lexists(p)), Path("/"))
    there = existing if existing.is_dir() else existing.parent
    limit = _limit(there, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        size = len(os.fsencode(long))
        raise BadInput(f"{flag} {path}: the name {long[:40]}... is {size} bytes (the file system allows {limit})")
    whole, path_max = len(os.fsencode(os.path.abspath(path))), _limit(there, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    if whole >= path_max:
        raise BadInput(
            f"{flag} {str(path)[:60]}...: the path is {whole} bytes (the file system allows {path_max - 1})"
        )


def check_inputs(inputs: dict) -> None:
    """Input paths (flag -> path; None skipped) the file system could never open: too long, a link loop."""
    for flag, given in inputs.items():
        if given:
            path = Path(expand(given, flag))
            check_name_lengths(path, flag)
            check_loop(path, flag)


def _check_shape(path: Path, flag: str, folder: bool) -> None:
    """The file system's own refusals, said before anything is written."""
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), Path("."))
    if existing == path:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:  # a link to nothing, no permission to look
            raise BadInput(f"{flag} {path}: {e.strerror or e}") from None
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise BadInput(f"{flag} {path} is a device or special file, not a {'folder' if folder else 'file'}")
    if existing != path and not existing.is_dir():
        raise BadInput(f"{flag} {path}: {existing} is a file, not a folder")
    if existing == path and folder and not path.is_dir():
        raise BadInput(f"{flag} {path} is a file, not a folder")
    if existing == path and not folder and path.is_dir():
        raise BadInput(f"{flag} {path} is a folder, not a file")
    writable = existing if existing.is_dir() else existing.parent
    if (existing != path or not folder) and not os.access(writable, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: {writable} is not writable (permission denied)")


def overlap(out: Path, given: Path) -> str | None:
    """How `out` meets the input `given` ("is", "lies inside", "holds"), or None when they are apart."""
    a, b = Path(os.path.realpath(out)), Path(os.path.realpath(given))
    if a == b or (a.exists() and b.exists() and os.path.samefile(a, b)):
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "holds"
    return None


def input_path(given) -> Path:
    """Where an input named on the command line lies on disk (`pypi:` models and `packaged` data included)."""
    if str(given).startswith("pypi:"):  # a model converted into the cache (models.DEMO_MODEL)
        return cache_dir()
    if str(given) == "packaged":  # --data-dir packaged: the subsets shipped inside q2g
        return PACKAGED_DATA  # (= data.loaders.packaged_data_dir(); the guard sits below data/)
    return Path(os.path.expanduser(os.path.expandvars(os.fspath(given))))


def check_apart(path: Path, flag: str, inputs: dict) -> None:
    """Refuse `path` when it is, lies inside or holds one of `inputs` (label -> path or None)."""
    for label, given in inputs.items():
        if given is None or not str(given).strip():
            continue
        source = input_path(given)
        if not os.path.lexists(source):
            continue  # a hub id, or an input that is not there (its own check says so)
        how = overlap(path, source)
        if how:
            raise BadInput(
                f"{flag} {path} {how} the {label} {source}: q2g never writes onto what it reads; choose another {flag}"
            )


def check_output(out, flag: str = "--out", *, inputs: dict | None = None, folder: bool = True) -> Path:
    """The output path `out` (expanded), refused when it cannot be right (see the module docstring).
    `inputs` maps each input's flag to its path (None, or a name that is not on disk, is skipped)."""
    path = Path(expand(out, flag))
    check_name_lengths(path, flag)
    check_loop(path, flag)
    check_apart(path, flag, inputs or {})
    _check_shape(path, flag, folder)
    if folder:
        refuse_if_held(path, flag)
    return path


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        return f"pid {text[0]} on host {text[1]}" if len(text) >= 2 else "another process"
    except OSError:
        return "another process"


def refuse_if_held(folder: Path, flag: str = "--out", name: str = LOCK_NAME) -> None:
    """Refuse at once (before a run spends time on its checks) a folder whose lock another run holds."""
    import fcntl

    try:
        fd = os.open(folder / name, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has held it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BadInput(in_use(folder, flag, fd)) from None
    except OSError:
        return  # a file system without flock: hold_lock says so when it matters
    finally:
        os.close(fd)  # (and with it the probe's own lock)


def in_use(folder: Path, flag: str, fd: int) -> str:
    return f"{flag} {folder} is in use by another q2g run ({_holder(fd)}); wait for it to end or choose another {flag}"


def _open_locked(folder: Path, flag: str, name: str) -> int:
    """A descriptor of `folder/name` holding its exclusive lock. A lock file that the previous holder
    removed between our open and our lock is not the lock any more: take the one now at the path."""
    import fcntl

    path = folder / name
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise (path_error(folder, e, "output folder") or write_failed(path, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = os.stat(path).st_ino
        except BlockingIOError:
            message = in_use(folder, flag, fd)
            os.close(fd)
            raise BadInput(message) from None
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)
    raise BadInput(f"{flag} {folder}: its lock file {name} keeps changing (another run starting and stopping?)")


@contextmanager
def hold_lock(folder, flag: str = "--out", name: str = LOCK_NAME):
    """Make `folder` and hold an exclusive advisory lock on `folder/name` until the block ends;
    refused at once (BadInput naming the holder's pid and host) when another run holds it. The
    lock file is removed at the end, while still held (a killed run leaves it, unlocked: harmless)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (path_error(folder, e, "output folder") or write_failed(folder, e)) from None
    fd = _open_locked(folder, flag, name)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        yield folder
    finally:
        try:
            os.unlink(folder / name)  # under the lock: a run that opened it sees it was removed, retries
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the lock


def lock_beside(path) -> tuple[Path, str]:
    """The folder and lock name for a file output (export --out file.jsonl): `.NAME.q2g.lock` beside it."""
    path = Path(path)
    return path.parent, f".{path.name}.q2g.lock"
