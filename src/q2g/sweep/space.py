"""The search space of a sweep: `sweep.space` checked against FinetuneConfig, as Optuna distributions.

Each searched finetune option is a list of values (categorical) or `{low, high, log}` (a number range);
`lora_alpha_ratio` sets lora_alpha = ratio * r. Every problem is found before anything runs.
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass

from q2g.config import field_kind, fields_of, value_problem
from q2g.errors import ConfigError
from q2g.finetune.config import FinetuneConfig

RATIO = "lora_alpha_ratio"  # searched in place of lora_alpha: alpha = ratio * r
NOT_SEARCHABLE = ("out", "traces", "split", "resume", "baseline_from", "no_eval")  # set by the sweep itself


@dataclass
class Dimension:
    """One searched option: categorical `choices` (Optuna label -> value), or a numeric range."""

    kind: type
    choices: dict | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        cls = IntDistribution if self.kind is int else FloatDistribution
        return cls(self.low, self.high, log=self.log)

    def value(self, label):
        return self.choices[label] if self.choices is not None else label


def dimension(name: str, spec, fields: dict) -> Dimension:
    """The Dimension of `spec` for option `name`; ValueError says what is wrong with it."""
    if name == RATIO:
        hint, meta = float, {"choices": None, "min": None, "max": None, "gt": 0}
    elif name in NOT_SEARCHABLE:
        raise ValueError("is set by q2g sweep itself (one value for every trial)")
    elif name not in fields:
        close = difflib.get_close_matches(name, [*fields, RATIO], n=1)
        raise ValueError(
            "not a finetune option"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; evaluation settings are the same for every trial: set them in finetune:"
        )
    else:
        hint, meta = fields[name][1], fields[name][0].metadata
    kind, is_list, _ = field_kind(hint)
    if isinstance(spec, list):
        return categorical(spec, hint, meta, kind, is_list)
    if isinstance(spec, dict):
        return numeric_range(spec, hint, meta, kind, is_list)
    raise ValueError(f"give a list of values or {{low, high, log}}, got {spec!r}")


def categorical(spec: list, hint, meta, kind, is_list) -> Dimension:
    if not spec:
        raise ValueError("empty list: give at least one value")
    choices = {}
    for v in spec:
        v = [v] if is_list and isinstance(v, str) else v  # `all-linear` for a list option = [all-linear]
        if why := value_problem(v, hint, meta):
            raise ValueError(f"value {v!r}: {why}")
        label = ",".join(v) if is_list else v  # Optuna's choices are scalars
        if label in choices:
            raise ValueError(f"lists {v!r} twice")
        choices[label] = v
    return Dimension(kind, choices=choices)


def numeric_range(spec: dict, hint, meta, kind, is_list) -> Dimension:
    if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
        raise ValueError(f"a range is {{low, high}} or {{low, high, log}}, got keys {sorted(spec)}")
    if is_list or kind not in (int, float):
        raise ValueError(f"a range needs a number option, this one is {hint}: give a list of values")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for end, v in (("low", low), ("high", high)):
        if why := value_problem(v, hint, meta):
            raise ValueError(f"{end}: {why}")
    if not isinstance(log, bool):
        raise ValueError(f"log must be true or false, got {log!r}")
    if low > high:
        raise ValueError(f"low ({low}) > high ({high})")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0, got {low}")
    return Dimension(kind, low=low, high=high, log=log)


def parse_space(space: dict, where: str, sampler: str) -> dict[str, Dimension]:
    """Every searched option checked against FinetuneConfig; one ConfigError naming each bad key."""
    if not space:
        raise ConfigError(f"{where}: sweep.space is empty: name at least one finetune option to search")
    fields, dims, problems = fields_of(FinetuneConfig), {}, []
    for key, spec in space.items():
        try:
            dims[str(key).replace("-", "_")] = dimension(str(key).replace("-", "_"), spec, fields)
        except ValueError as e:
            problems.append(f"{where}: sweep.space.{key}: {e}")
    if RATIO in dims and "lora_alpha" in dims:
        problems.append(f"{where}: sweep.space: search lora_alpha or {RATIO}, not both")
    ranges = [k for k, d in dims.items() if d.choices is None]
    if sampler == "grid" and ranges:
        problems.append(f"{where}: sweep.space.{ranges[0]}: the grid sampler needs a list of values, not a range")
    if problems:
        raise ConfigError("; ".join(problems))
    return dims


def space_size(dims: dict) -> int | None:
    """Points in the space when every dimension is a list, else None."""
    return math.prod(len(d.choices) for d in dims.values()) if all(d.choices for d in dims.values()) else None


def trial_settings(dims: dict, params: dict, base) -> dict:
    """A trial's finetune settings from its Optuna params (labels -> values, ratio -> lora_alpha)."""
    values = {name: dims[name].value(label) for name, label in params.items()}
    if (ratio := values.pop(RATIO, None)) is not None:
        values["lora_alpha"] = ratio * values.get("lora_r", base.lora_r)
    return values


def check_points(dims: dict, base, where: str, limit: int = 4096) -> None:
    """Build the FinetuneConfig of every point (a range: its ends) so that a combination finetune
    refuses (a cross-field rule) stops the sweep before its first trial, not in the middle."""
    axes = {k: list(d.choices) if d.choices is not None else [d.low, d.high] for k, d in dims.items()}
    if math.prod(len(v) for v in axes.values()) > limit:
        return
    for point in itertools.product(*axes.values()):
        settings = trial_settings(dims, dict(zip(axes, point)), base)
        try:
            base.replace(**settings)
        except ConfigError as e:
            raise ConfigError(f"{where}: sweep.space: the point {settings} is refused by finetune: {e}") from None


def shown_settings(dims: dict, params: dict, base) -> dict:
    """A trial's settings as reported: the searched values (lora_alpha_ratio too) and what they set."""
    return {**{k: dims[k].value(v) for k, v in params.items()}, **trial_settings(dims, params, base)}
