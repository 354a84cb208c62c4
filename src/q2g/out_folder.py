"""Can this path become an output folder? Checked before a command loads or writes anything
(`q2g evaluate --out`, `q2g merge --out`), so the file system's refusals (a name too long, a
parent that is a file) come back as bad input naming the flag, never as an OSError traceback.
"""

from __future__ import annotations

from pathlib import Path

from q2g.errors import BadInput


def check_out_folder(out, flag: str = "--out") -> Path:
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise BadInput(f"{flag} {out} is a file, not a folder")
        parent = next((p for p in out.absolute().parents if p.exists()), None)
    except OSError as e:  # ENAMETOOLONG, a loop of links, no permission to look
        raise BadInput(f"{flag} {out}: {e.strerror or e}") from None
    if parent is not None and not parent.is_dir():
        raise BadInput(f"{flag} {out}: {parent} is a file, not a folder")
    return out
