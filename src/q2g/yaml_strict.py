"""The one strict reader of q2g's YAML files (`--config`, `q2g run`, `q2g sweep`).

    data = load_yaml("configs/x.yaml")             # a dict; ConfigError naming file:line on any problem
    section, prefix = yaml_section(data, "finetune", path, known)   # the stage's own options

What it refuses, each as one ConfigError (exit 2) naming the file (and line where YAML knows it):
a key given twice in one mapping (`holdout_fraction` and `holdout-fraction` are the same key), a
key that is not text (`1: x`, `? [a, b]`), nesting deeper than MAX_DEPTH, a value that is not a
mapping at the top, and text that is not YAML or not UTF-8. Merge keys and anchors (`<<: *defaults`)
are accepted: a merged key that the mapping sets again is an override, not a duplicate.

A file is read exactly once per process (cached by path and identity), so `--config <(...)` (a
pipe, empty on a second read) works for `q2g run`, whose stages read the same file again.
Every value echoed back in a message is cut to 200 characters (`shown`).
"""

from __future__ import annotations

import os
from pathlib import Path

from q2g.errors import ConfigError

MAX_DEPTH = 16  # a q2g config nests 3 deep (section, trainer:, a value list)
SHOWN_CHARS = 200
SECTIONS = ("generate", "finetune", "evaluate", "export", "merge", "sweep")  # the stages of a run file
_read_cache: dict = {}


def shown(value) -> str:
    """repr(value), cut to SHOWN_CHARS characters (an alias-expanded YAML value can be megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def spelling(key) -> str:
    return str(key).replace("-", "_")


def _loader_class():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: merged below by PyYAML; later keys override it
                where = f"{self.name}:{key_node.start_mark.line + 1}"
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(f"{where}: a key must be text, not a {key_node.id}")
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ConfigError(f"{where}: a key must be text, got {type(key).__name__} {shown(key)}")
                if spelling(key) in seen:
                    raise ConfigError(f"{where}: duplicate key {key!r} (also given as {seen[spelling(key)]!r})")
                seen[spelling(key)] = key
            return super().construct_mapping(node, deep)

    return Loader


def depth(value, limit: int = MAX_DEPTH) -> int:
    """How deep `value` nests (stops counting past `limit`)."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((depth(v, limit - 1) for v in items), default=0)


def read_once(path: Path) -> bytes:
    """The bytes of `path`, read once per process and file (a pipe cannot be read twice)."""
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key in _read_cache:
        return _read_cache[key]
    with open(path, "rb") as f:
        data = f.read()
    if key is not None:
        _read_cache.clear()  # one file at a time is all a run needs
        _read_cache[key] = data
    return data


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    try:
        loader = _loader_class()(read_once(path).decode("utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as e:  # a folder, no permission...
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:400]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    if depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels)")
    return data


def yaml_section(data: dict, section: str | None, path="config", known=()) -> tuple[dict, str]:
    """The stage's own mapping of a run file (one with stage sections), or a flat file's keys.

    In a run file every top-level key is `out` or a section: an option of this stage written beside
    the sections is refused, saying it belongs in `section:` (it would be silently dropped)."""
    if not any(k in SECTIONS for k in data):
        return dict(data), ""
    for key in data:
        if key == "out" or key in SECTIONS:
            continue
        fits = f"; it belongs in the {section}: section" if spelling(key) in known else ""
        raise ConfigError(
            f"{path}: top-level key {key!r} beside the stage sections{fits} (expected out, {', '.join(SECTIONS)})"
        )
    mapping = data.get(section) if section else None
    if mapping is None:
        return {}, f"{section}."
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: {section}: must be a mapping of option: value, got {type(mapping).__name__}")
    return mapping, f"{section}."
