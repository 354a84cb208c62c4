"""Small file helpers shared by the stages: atomic writes and crash-safe JSONL.

Why: every long job here must survive SIGKILL. Whole files are written to a temporary name and
renamed (atomic on POSIX), and JSONL records are appended a group at a time, flushed and fsynced,
so a killed run leaves at worst one torn last line, which `read_jsonl_tolerant` drops.

A write that fails (disk full, quota, file size limit, I/O error) leaves the file as it was: the
temporary file is removed, a failed append is cut back off. It raises RunFailed (exit 1) naming
the file, so a full disk is said as such instead of as a traceback; `writes_to` does the same for
the writes of libraries (Trainer checkpoints, safetensors, plots) under an output folder.

A path that cannot be used at all (a name longer than the file system allows, a parent that is a
file, a folder where a file is expected, no permission) is bad input, not a failed run:
`path_error` turns such an OSError into a BadInput (exit 2) naming the path, `read_input_bytes`
reads an input file that way. Whether an output path may be used at all (never onto an input, never
a device, never a folder another run holds) is q2g.out_guard's one decision; `atomic_write_text`
also refuses to rename over anything but a regular file (or a link, which is replaced, not followed).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

from q2g.errors import BadInput, DataError, Q2GError, RunFailed

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
PROBE_BYTES = 1 << 20  # a write this size must succeed for the folder to count as writable
# A path the user must change, not a disk that filled up: bad input (exit 2), not a failed run.
PATH_ERRNOS = {
    errno.ENAMETOOLONG: "name too long for the file system",
    errno.ENOTDIR: "a parent is a file, not a folder",
    errno.EISDIR: "a folder, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ELOOP: "too many symbolic links",
    errno.ENOENT: "no such file or folder",
}


def path_error(path, error: OSError, what: str = "file") -> BadInput | None:
    """The BadInput that names `path` for an OSError about the path itself (None: another kind)."""
    why = PATH_ERRNOS.get(getattr(error, "errno", None))
    if why is None:
        return None
    cls = DataError if what.startswith("input") else BadInput
    return cls(f"{what} {path}: {why}")


def read_input_bytes(path) -> bytes:
    """The bytes of an input file; a missing file, a folder, no permission... -> DataError naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission, a name too long...
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


class WriteFailed(RunFailed):
    """A file could not be written (the message says which, and whether the disk is full)."""


def write_failed(path, error: BaseException, hint: str = "") -> WriteFailed:
    """The error that reports a failed write of `path`."""
    full = isinstance(error, OSError) and error.errno in FULL_ERRNOS
    why = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return WriteFailed(
        f"{'disk full' if full else 'write failed'}: {path} ({why}); the files written before it "
        f"are intact{'; ' + hint if hint else ''}"
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def refuse_special(path: Path) -> None:
    """A rename replaces what is at `path`: allowed for a regular file or a link, never a device or pipe."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or not reachable: the write itself says why)
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise BadInput(
            f"output file {path} is a folder, device or other special file: q2g replaces only regular files"
        )


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    refuse_special(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the temporary name itself was unusable (e.g. too long): nothing was created
        raise (path_error(path, e, "output file") or write_failed(path, e)) from None


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path, rows: list[dict]) -> None:
    """Append rows in one write, then flush and fsync: a group lands whole or (torn) last."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise (path_error(path, e, "output file") or write_failed(path, e)) from None
    try:
        start = os.fstat(fd).st_size
        _write_all(fd, data)
    except OSError as e:
        try:  # cut off what part of the group did land: the file ends on its last whole line again
            os.ftruncate(fd, start)
        except OSError:
            pass  # then the reader drops the torn line (read_jsonl_tolerant)
        raise write_failed(path, e) from None
    finally:
        os.close(fd)


def folder_write_problem(folder) -> OSError | None:
    """Why `folder` cannot take a write of PROBE_BYTES now (None: it can)."""
    probe = Path(folder) / f".q2g-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, bytes(PROBE_BYTES))
        finally:
            os.close(fd)
        return None
    except OSError as e:
        return e
    finally:
        probe.unlink(missing_ok=True)


@contextmanager
def writes_to(folder, hint: str = ""):
    """Inside: an error raised while writing under `folder` (by q2g or by a library, whose errors
    for a full disk are often not OSErrors, e.g. torch.save's RuntimeError) becomes a RunFailed
    that says so. An error is taken for a write failure when it is an OSError with a write errno
    or when a probe write into `folder` fails right after it; anything else is raised as it was."""
    try:
        yield
    except WriteFailed as e:
        if hint and hint not in str(e):
            raise WriteFailed(f"{e}; {hint}") from None
        raise
    except Q2GError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            raise write_failed(e.filename or folder, e, hint) from e
        existing = next((p for p in (Path(folder), *Path(folder).parents) if p.is_dir()), None)
        problem = folder_write_problem(existing) if existing is not None else None
        if problem is None:
            raise
        raise write_failed(getattr(e, "filename", None) or folder, problem, hint) from e


def read_jsonl_tolerant(path, repair: bool = False) -> list[dict]:
    """Rows of a JSONL file being appended to; a torn *last* line is dropped with a warning.

    A bad line anywhere else is corruption, not a crash artefact, and raises ValueError naming
    the line. With repair=True the torn tail is also cut from the file so appends stay clean.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = read_input_bytes(path)
    lines = raw.split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
            good_bytes += len(line) + 1
        except json.JSONDecodeError:
            if not (is_last and not raw.endswith(b"\n")) and not is_last:
                raise ValueError(f"{path}:{i + 1}: not valid JSON (file corrupted?)") from None
            warnings.warn(
                f"{path}:{i + 1}: dropping a torn last line ({len(line)} bytes) left by an interrupted run",
                stacklevel=2,
            )
            if repair:
                try:
                    with open(path, "r+b") as f:
                        f.truncate(min(good_bytes, len(raw)))
                except OSError as e:
                    raise write_failed(path, e) from None
            break
    return rows


def write_jsonl(path, rows: list[dict]) -> None:
    """A whole JSONL file, written atomically (a reader never sees half of it)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def settings_diff(path, config: dict, keys) -> list[str]:
    """How `config` differs on `keys` from the settings saved at `path` (a config.json); empty when
    they agree or nothing was saved. The one "same run?" check: every stage resumes only on []."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        old = json.loads(read_input_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{path} is not valid JSON (a damaged output folder?)"]
    if not isinstance(old, dict):
        return [f"{path} holds a JSON {type(old).__name__}, not a q2g config (another tool's file?)"]
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples vs lists, paths)
    return [
        f"{k}: {repr(old.get(k))[:200]} there, {repr(norm(config.get(k)))[:200]} now"
        for k in keys
        if norm(old.get(k)) != norm(config.get(k))
    ]


def expand(value, label: str) -> str:
    """`value` with `~` and `$VAR` / `${VAR}` expanded; refused when empty or naming an unset variable."""
    text = os.fspath(value)
    if not text.strip():
        raise BadInput(f"{label}: an empty path (name a file or folder)")
    for match in _VAR.finditer(text):
        name = match[1].strip("{}")
        if not os.environ.get(name):
            raise BadInput(f"{label} {text[:200]}: ${name} is not set (or empty)")
    return os.path.expanduser(os.path.expandvars(text))


CACHE_ENV = "Q2G_CACHE"


def cache_dir() -> Path:
    """Where q2g keeps what it can rebuild (the converted demo model, baseline rows): $Q2G_CACHE or
    ~/.cache/q2g. An empty $Q2G_CACHE counts as unset (as XDG does for $XDG_CACHE_HOME), never as
    the current folder; `~` and $VARS in it are expanded like any other path (out_guard.expand)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(expand(value, "$" + CACHE_ENV)) if value else Path.home() / ".cache" / "q2g"
