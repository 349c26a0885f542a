"""What a YAML key may hold: a `Key` and its builders, and the checks config.py runs on a whole document (its size)
and on comm_args.tls. config.py and methods.py use it."""
from __future__ import annotations

import difflib
import math
import os
import reprlib
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
        raise ConfigError(f"{where}: expected {key.expect}, got {shown(value)}")
    return float(value) if key.kind is float else value


# A config holds a few hundred values. YAML aliases let a few hundred bytes stand for billions of them, which any
# message showing a value (or json.dumps) would expand: the loaded document is measured first, aliases counted each
# time they are used.
MAX_VALUES, MAX_DEPTH = 10_000, 32


def check_size(raw: Any, source: str) -> None:
    """ConfigError unless `raw` holds at most MAX_VALUES values nested at most MAX_DEPTH deep."""
    stack, count = [(raw, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise ConfigError(f"{source}: expected a config of at most {MAX_VALUES} values nested at most {MAX_DEPTH} "
                              f"deep (a YAML alias counts each time it is used), got more")
        if isinstance(value, dict):
            stack.extend((x, depth + 1) for item in value.items() for x in item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((x, depth + 1) for x in value)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 200
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxtuple, _SHOWN.maxset = 3, 12, 12, 12, 12


def shown(value: Any) -> str:
    """repr(value), cut short where it would be long: what a one-line error shows of a bad value."""
    return _SHOWN.repr(value)


def key_name(key: Any) -> str:
    """A YAML key as an error names it: as written when it is a short printable word, else shown (quoted)."""
    text = str(key)
    return text if isinstance(key, str) and text.isprintable() and len(text) <= 80 and " " not in text \
        else shown(key)


TLS_KEYS = ("ca_cert", "cert", "key")


def check_tls(comm: dict[str, Any]) -> None:
    """comm_args.tls: {} or all of ca_cert, cert and key, each an existing file."""
    tls = comm["tls"] = dict(comm["tls"])  # the config's own copy, not the schema's default
    if not tls:
        return
    for key in tls:
        if key not in TLS_KEYS:
            raise ConfigError(f"comm_args.tls.{key_name(key)}: unknown key{suggest(str(key), TLS_KEYS)}; allowed: "
                              f"{', '.join(TLS_KEYS)}")
    for key in TLS_KEYS:
        where = f"comm_args.tls.{key}"
        if key not in tls:
            raise ConfigError(f"{where}: missing; comm_args.tls needs all of {', '.join(TLS_KEYS)} "
                              f"(`python -m fedml_feddpd certs` makes them)")
        if not isinstance(tls[key], str) or not tls[key]:
            raise ConfigError(f"{where}: expected a file path, got {shown(tls[key])}")
        if not os.path.isfile(tls[key]):
            raise ConfigError(f"{where}: file not found: {tls[key]}")
