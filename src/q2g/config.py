"""Command-line options with an optional YAML `--config` file (TRL style).

Each stage's `build_parser()` declares its options with defaults and help. `parse_args` reads
`--config file.yaml` first; the file's keys (dashes or underscores) become the defaults and the
flags given on the command line win. Unknown keys in the file are an error naming the file and key.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} not found") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected a mapping of option: value at the top level")
    return data


def apply_config(parser: argparse.ArgumentParser, data: dict, path) -> None:
    """Set parser defaults from a mapping of option: value; an unknown key is an error."""
    known = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise SystemExit(f"error: {path}: unknown option {key!r} for {parser.prog}")
        defaults[dest] = value
    parser.set_defaults(**defaults)


def parse_args(parser: argparse.ArgumentParser, argv=None, section: str | None = None) -> argparse.Namespace:
    """Parse argv, honouring `--config`. A `q2g run` file has one mapping per stage: a stage
    reads its own `section` of it; a flat file is read whole."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        data = load_yaml(known.config)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        else:
            data = {k: v for k, v in data.items() if not isinstance(v, dict)}
        apply_config(parser, data, known.config)
    return parser.parse_args(argv)


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (keys as the flags); flags given here win")
