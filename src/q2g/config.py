"""Typed stage configs: one declaration per option, used for the command line, YAML and calls.

A stage declares its options once, as a dataclass whose fields are made with `option(...)`
(default, help text, and optionally choices and a range). From that one declaration:

- `load_config(Cls, argv, ...)` builds the argparse command line (`--lora-r`; help shows the
  default and the choices), reads `--config file.yaml` (keys as the flags, dashes or underscores;
  a `q2g run` file is read at the stage's own section), and merges them: defaults < YAML <
  command line. Unknown keys, wrong types and values outside `choices` or the range are refused
  before anything loads, with a `ConfigError` naming the flag or `file.yaml: section.key`.
- `Cls(**values)` validates the same way (`Config.__post_init__`), so a stage can be called as a
  function with a typed config (the sweep does).

Why not `transformers.HfArgumentParser`: it builds the command line from dataclasses well, but a
YAML file's values reach the dataclass unchecked (no types, ranges or choices), and those checks
are what this module is for; the argparse part is ~30 lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing

from q2g.errors import BadInput, ConfigError
from q2g.yaml_strict import load_yaml, shown, spelling, yaml_section

# Options whose value is a path: `~` and $VARS are expanded (q2g.out_guard.expand) and an empty one
# refused, the same for a flag (where the shell expands them) and a YAML value (where nothing would).
PATH_FIELDS = ("out", "traces", "split", "data_dir", "adapter", "baseline_from", "model", "base_model", "teacher")
SEED_MAX = 2**32 - 1  # seeds are in [0, 2^32): what numpy, torch and vLLM accept

_MISSING = dataclasses.MISSING


# What an option's value changes (`option(results=...)`): the one declaration from which every
# "same run?" check is derived (resume, baseline reuse, the sweep's shared baseline, generation).
RESULTS = {
    "baseline": "the base model's scores (the student, its precision, the data, every result-changing eval setting)",
    "training": "the trained adapter and its scores, not the base model's",
    "traces": "which trace records generation writes",
    None: "nothing a run reports: speed, memory, paths, logging",
}


def option(
    default=_MISSING,
    *,
    help: str,
    results,
    choices=None,
    min=None,
    max=None,
    gt=None,
    flag: str | None = None,
):
    """A config field: `default` (a list default is copied per instance), `help` for --help,
    `results` (what its value changes: a key of RESULTS; required, so no option is forgotten),
    `choices` (also checked for every element of a list), `min`/`max` (inclusive), `gt` (exclusive)."""
    if results not in RESULTS:
        raise ValueError(f"option(results=) must be one of {list(RESULTS)}, not {results!r}")
    meta = {
        "help": help,
        "results": results,
        "choices": tuple(choices) if choices else None,
        "min": min,
        "max": max,
        "gt": gt,
        "flag": flag,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def result_keys(*classes, scopes=("baseline", "training", "traces")) -> tuple[str, ...]:
    """The fields of `classes` whose `option(results=...)` is one of `scopes`, in declaration order."""
    return tuple(f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("results") in scopes)


class Config:
    """Mixin for stage configs: validated when built; `check()` adds cross-field rules."""

    def __post_init__(self):
        problems = field_problems(type(self), vars(self), {})
        if not problems:
            problems = self.check()
        if problems:
            raise ConfigError("; ".join(problems))

    def check(self) -> list[str]:
        """Rules that involve several fields; each problem names its option(s)."""
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- types and checks


def field_kind(hint) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field annotation such as `list[int] | None`."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return typing.get_origin(hint) or hint, False, optional


def _type_ok(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _range_problem(value, meta) -> str | None:
    if meta["min"] is not None and value < meta["min"]:
        return f"must be >= {meta['min']}"
    if meta["max"] is not None and value > meta["max"]:
        return f"must be <= {meta['max']}"
    if meta["gt"] is not None and value <= meta["gt"]:
        return f"must be > {meta['gt']}"
    return None


def value_problem(value, hint, meta) -> str | None:
    """Why `value` is not allowed for a field (None: it is)."""
    kind, is_list, optional = field_kind(hint)
    if value is None:
        return None if optional else "must be given (null is not allowed)"
    if kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if not ok:
            return f"must be a mapping of name: value, got {shown(value)}"
        bad = next((k for k, v in value.items() if not _finite(v)), None)
        return None if bad is None else f"{bad}: must be a finite number, got {shown(value[bad])}"
    items = value if is_list else [value]
    if is_list and (not isinstance(value, (list, tuple)) or not value):
        return f"must be a non-empty list of {kind.__name__}"
    for item in items:
        if not _type_ok(item, kind):
            article = "a list of " if is_list else "an " if kind.__name__[0] in "aeiou" else "a "
            return f"must be {article}{kind.__name__}, got {shown(item)}{_yaml_number_hint(item, kind)}"
        if meta["choices"] and item not in meta["choices"]:
            close = difflib.get_close_matches(str(item)[:200], [str(c) for c in meta["choices"]], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{shown(item)} is not one of {', '.join(map(str, meta['choices']))}{hint_text}"
        if kind in (int, float) and (why := _range_problem(item, meta)):
            return f"{why}, got {item!r}"
    return None


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a value (a float in a `trainer:` field, a list of them...)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _yaml_number_hint(item, kind) -> str:
    """YAML 1.1 (PyYAML) reads `1e-4` as text: a number needs a dot and a signed exponent."""
    if kind is not float or not isinstance(item, str):
        return ""
    try:
        float(item)
    except ValueError:
        return ""
    mantissa, _, exponent = item.strip().lower().partition("e")
    if not exponent:
        return " (a number: write it without quotes)"
    mantissa = mantissa if "." in mantissa else mantissa + ".0"
    exponent = exponent if exponent[0] in "+-" else "+" + exponent
    return f" (YAML reads {item} as text; write {mantissa}e{exponent})"


def fields_of(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def field_problems(cls, values: dict, labels: dict) -> list[str]:
    """One message per bad value, each starting with the option's label (flag or YAML key)."""
    problems = []
    for name, (f, hint) in fields_of(cls).items():
        if name in values and (why := value_problem(values[name], hint, f.metadata)):
            problems.append(f"{labels.get(name, name)}: {why}")
    return problems


# ---------------------------------------------------------------- command line


def _flag(name: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse option per field; defaults are suppressed so only given flags show up."""
    for name, (f, hint) in fields_of(cls).items():
        kind, is_list, _ = field_kind(hint)
        meta, default = f.metadata, f.default_factory() if f.default is _MISSING else f.default
        help_text = meta["help"] + ("" if default is None else f" (default: {default})")
        kw = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if kind is bool:  # --flag (and --no-flag where the default is on)
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif kind is dict:  # --flag key=value, repeated; values read as YAML scalars
            kw.update(action="append", type=_key_value, metavar="KEY=VALUE")
        else:
            kw.update(
                type=kind,
                metavar=(meta["choices"] and "{" + ",".join(map(str, meta["choices"])) + "}") or name.upper(),
            )
            if is_list:
                kw["nargs"] = "+"
        parser.add_argument(_flag(name, f), **kw)


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {shown(text)}")
    try:
        return key.strip(), yaml.safe_load(value) if value else ""
    except (yaml.YAMLError, RecursionError):
        raise argparse.ArgumentTypeError(f"{key.strip()}: the value is not a YAML scalar: {shown(value)}") from None


def build_parser(classes, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of options (keys as the flags); flags given here win")
    for cls in classes:
        add_options(parser, cls)
    return parser


def normalise_keys(data: dict, known: set, path, prefix: str, prog: str) -> dict:
    out, given = {}, {}
    for key, value in data.items():
        name = spelling(key)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown option {prefix + str(key)[:200]!r} for {prog}{hint}")
        if name in out:
            raise ConfigError(f"{path}: {prefix}{key} is given twice (also as {prefix}{given[name]})")
        out[name], given[name] = value, key
    return out


def load_config(classes, argv=None, *, prog: str, description: str | None = None, section: str | None = None):
    """Parse argv (+ its `--config` YAML) into one instance of each class in `classes` (a class or a
    tuple of them, whose fields split the options between them). Raises ConfigError naming the
    flag or file key of every bad value; argparse itself exits 2 on a malformed command line."""
    single = not isinstance(classes, (tuple, list))
    classes = (classes,) if single else tuple(classes)
    parser = build_parser(classes, prog, description)
    given = vars(parser.parse_args(argv))
    path = given.pop("config", None)
    values, labels = {}, {name: _flag(name, f) for cls in classes for name, (f, _) in fields_of(cls).items()}
    if path:
        data, prefix = yaml_section(load_yaml(path), section, path, set(labels))
        values = normalise_keys(data, set(labels), path, prefix, prog)
        labels.update({k: f"{path}: {prefix}{k}" for k in values})
    for name, value in given.items():  # flags win; KEY=VALUE flags add to the file's mapping
        values[name] = (
            {**(values.get(name) or {}), **dict(value)}
            if isinstance(value, list) and value and isinstance(value[0], tuple)
            else value
        )
    labels.update({k: _flag(k, fields_of_any(classes, k)) for k in given})
    expand_paths(values, labels)
    problems = [p for cls in classes for p in field_problems(cls, values, labels)]
    if problems:
        raise ConfigError("; ".join(problems))
    built = tuple(_build(cls, values, labels) for cls in classes)
    return built[0] if single else built


def expand_paths(values: dict, labels: dict) -> None:
    """`~` and $VARS in every path option expanded in place; an empty path refused (ConfigError)."""
    from q2g.out_guard import expand

    for name in PATH_FIELDS:
        if isinstance(values.get(name), str):
            try:
                values[name] = expand(values[name], labels.get(name, name))
            except BadInput as e:
                raise ConfigError(str(e)) from None


def fields_of_any(classes, name: str) -> dataclasses.Field:
    return next(fields_of(c)[name][0] for c in classes if name in fields_of(c))


def _build(cls, values: dict, labels: dict):
    names = set(fields_of(cls))
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except ConfigError as e:  # a cross-field rule: say which file set the options it names
        flags = {k: _flag(k, fields_of(cls)[k][0]) for k in names & set(values)}
        given = sorted({labels[k] for k, flag in flags.items() if flag in str(e) and labels.get(k, flag) != flag})
        where = f" (set at {', '.join(given)})" if given else ""
        raise ConfigError(f"{e}{where}") from None
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{cls.__name__}: {e}") from None
