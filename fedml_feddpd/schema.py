"""What a YAML key may hold: a `Key` and its builders. Pure data; config.py and methods.py use it."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ConfigError

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    kind: type
    default: Any = REQUIRED
    expect: str = ""  # human description of what is allowed
    check: Optional[Callable[[Any], bool]] = None
    choices: tuple = ()


def int_key(minimum: int, default=REQUIRED) -> Key:
    return Key(int, default, f"an integer >= {minimum}", lambda v: v >= minimum)


def float_key(low: float, high: float = math.inf, default=REQUIRED, low_open=False, high_open=False) -> Key:
    lo = "(" if low_open else "["
    hi = ")" if high_open or high == math.inf else "]"
    hi_txt = "inf" if high == math.inf else f"{high:g}"

    def check(v):
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below and math.isfinite(v)

    return Key(float, default, f"a number in {lo}{low:g}, {hi_txt}{hi}", check)


def choice_key(choices: tuple, default=REQUIRED) -> Key:
    return Key(str, default, "one of " + ", ".join(choices), choices=choices)


def bool_key(default: bool) -> Key:
    return Key(bool, default, "true or false")


def str_key(default=REQUIRED) -> Key:
    return Key(str, default, "a string")


def off_key(key: str) -> Key:
    # This plugin never talks to FedML's cloud or wandb; accept the key only when it says so.
    return Key(bool, False, f"false ({key} would contact a server; fedml-feddpd runs offline)", lambda v: v is False)


def suggest(name: str, options) -> str:
    """The hint " (did you mean 'x'?)" naming the option closest to a misspelt `name`, or ""."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_ok(kind: type, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def validate_value(where: str, key: Key, value: Any) -> Any:
    """`value` as the key's type, or ConfigError "<where>: expected <what>, got <value>"."""
    if not _type_ok(key.kind, value) or (key.choices and value not in key.choices) or (
        key.check is not None and not key.check(value)
    ):
        raise ConfigError(f"{where}: expected {key.expect}, got {value!r}")
    return float(value) if key.kind is float else value
