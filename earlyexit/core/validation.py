"""Typed checks of every setting, in one place: `earlyexit run`'s flags, a bench spec's [defaults]
and axes, and a strategy's options all ask these the same questions (type, range, finiteness,
allowed name) before any model loads or any cell runs. No torch, so `--help` stays instant.

A check returns None when the value is fine, else what it must be ("must be a positive integer"),
so each caller names the value its own way (`--batch-size 0`, `spec.toml: [defaults] batch_size = 0`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

from earlyexit.core.choices import DECODES, GATE_MODES, GATES, KV_POLICIES, RULES, SPEED_TARGETS
from earlyexit.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)  # NaN and inf are no settings


def positive_int(value) -> str | None:
    return None if is_int(value) and value >= 1 else "must be a positive integer"


def any_int(value) -> str | None:
    return None if is_int(value) else "must be an integer"


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A check for a finite number within [low, high] (either end open where asked)."""
    def check(value) -> str | None:
        inside = is_number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        return None if inside else f"must be a number in {'(' if low_open else '['}{low:g}, " \
                                   f"{'inf' if high == math.inf else f'{high:g}'}{')' if high_open else ']'}"
    return check


def one_of(names) -> typing.Callable:
    def check(value) -> str | None:
        return None if isinstance(value, str) and value in names else f"must be one of {', '.join(names)}"
    return check


def text(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def layer_list(value) -> str | None:
    if not (isinstance(value, list) and value and all(is_int(v) for v in value)):
        return "must be a non-empty list of layer numbers such as [3, 6, 9]"
    below = [v for v in value if v < 1]
    return f"layer {below[0]} is out of range: layers count from 1" if below else None


def number_list(value) -> str | None:
    """Finite numbers; their range is the strategy's to judge (a threshold, a patience, a γ)."""
    good = isinstance(value, list) and value and all(is_number(v) for v in value)
    return None if good else "must be a non-empty list of numbers such as [0.5, 0.7, 0.9]"


NON_NEGATIVE = number_in(0, math.inf, high_open=True)

# setting -> its check; `None` (TOML has no null, Python callers do) always means "the default"
SETTING_CHECKS = {
    "backend": text, "model": text, "device": text, "dtype": one_of(DTYPES), "exit_layers": layer_list,
    "threshold": NON_NEGATIVE, "rule": one_of(RULES), "budget": number_in(0, 1, high_open=True),
    "epsilon": number_in(0, 1, low_open=True, high_open=True), "grid": number_list, "kv_policy": one_of(KV_POLICIES),
    "gate": one_of(("none", *GATES)), "gate_mode": one_of(GATE_MODES), "gate_threshold": number_in(-1, 1),
    "speed_target": one_of(SPEED_TARGETS), "decode": one_of(DECODES), "draft_length": positive_int,
    "test_limit": positive_int, "dev_limit": positive_int, "train_limit": positive_int, "batch_size": positive_int,
    "num_beams": positive_int, "max_new_tokens": positive_int, "seed": any_int, "noise": NON_NEGATIVE,
    "test_data": text, "test_split": text, "drafter": text,
}
GATE_THRESHOLDS = {"learned": number_in(0, 1), "cosine": number_in(-1, 1)}  # a probability; a cosine


def setting_problem(name: str, value) -> str | None:
    """What `value` must be for setting `name`, or None when it is fine (or unchecked)."""
    check = SETTING_CHECKS.get(name)
    return None if value is None or check is None else check(value)


def gate_threshold_problem(gate: str, threshold) -> str | None:
    check = GATE_THRESHOLDS.get(gate)
    return None if check is None or threshold is None else check(threshold)


def shown(value) -> str:
    """A value as the user wrote it in TOML (strings quoted, true/false, lists)."""
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


# -- strategy options ---------------------------------------------------------------------------------

def _plain_types(annotation) -> tuple:
    """`float | None` -> (float, NoneType); a plain class -> (it,); anything else -> () (unchecked)."""
    if isinstance(annotation, type):
        return (annotation,)
    return tuple(a for a in typing.get_args(annotation) if isinstance(a, type))


def option_problem(kinds: tuple, value, low: float = 0) -> str | None:
    """What a strategy option's value must be, from its field's type: numbers finite and >= `low`
    (0 unless the field says otherwise), bools true/false, text a string."""
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        return None if isinstance(value, bool) else "must be true or false"
    if int in kinds and float not in kinds:
        return None if is_int(value) and value >= low else f"must be an integer >= {shown(low)}"
    if float in kinds:
        return number_in(low, math.inf, high_open=True)(value)
    if str in kinds:
        return None if isinstance(value, str) else "must be a string"
    return None


def option_value_problem(config_cls, name: str, value) -> str | None:
    """What option `name` of a strategy config must be, or None when `value` is fine."""
    try:
        hint = typing.get_type_hints(config_cls).get(name)
    except Exception:  # a plugin's annotation we cannot resolve: its own checks stay in charge
        return None
    fields = {f.name: f for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else {}
    low = fields[name].metadata.get("low", 0) if name in fields else 0
    return option_problem(_plain_types(hint), value, low)


def check_config_fields(config) -> None:
    """A ConfigError for the first field of a strategy config whose value has the wrong type, is
    NaN or infinite, or is negative; run by every config before its own `__post_init__` checks."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        problem = option_value_problem(type(config), field.name, value)
        if problem:
            raise ConfigError(f"option {field.name} = {shown(value)}: {problem}")
