"""What each config option accepts: a `Domain` per field (a test, and the words a refusal uses for what is
valid), the builders method configs declare theirs with, and the domains several methods share. A config
checks every field against its domain when it is built (`PeftConfig.field_domains`), so a bad value is
refused there, naming the option, never deep inside a forward."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a config option accepts: a test, and the words a refusal uses for what is valid.

    `items`, for a dict-valued option, checks each value too, naming it `option[key]`."""

    expected: str
    accepts: Callable[[Any], bool]
    template: str = "{field} must be {expected}, got {value!r}."
    items: Domain | None = None

    def check(self, owner: str, field: str, value: Any) -> None:
        """Raise a ValueError naming the config, the option, its value and what it must be."""
        if not self.accepts(value):
            message = self.template.format(field=field, value=value, expected=self.expected)
            raise ValueError(f"{owner}: {message}")
        if self.items is not None:
            for key, item in (value or {}).items():
                self.items.check(owner, f"{field}[{key!r}]", item)


def _note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """An int or a finite float (not NaN, not an infinity); a bool is neither here."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_regex(value: Any, embedded: bool = False) -> bool:
    """A non-empty string that compiles as a regular expression, also inside a larger one where `embedded`
    (layers_pattern and pattern keys are: so no unbalanced group, and no global flag such as (?i))."""
    if not isinstance(value, str) or not value:
        return False
    try:
        re.compile(f"x(?:{value})" if embedded else value)
    except (re.error, OverflowError, RecursionError):
        return False
    return True


def _names(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(n, str) and n for n in value)


def integer(low: int = 1, note: str = "") -> Domain:
    """An int (a bool is not one here) of at least `low`."""
    words = "a positive integer" if low == 1 else f"an integer >= {low}"
    return Domain(_note(words, note), lambda v: _is_int(v) and v >= low)


def number(
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    note: str = "",
) -> Domain:
    """An int or finite float within the bounds given: `above`/`below` are open ends, `at_least`/`at_most`
    closed ones."""
    low, high = (above if above is not None else at_least), (below if below is not None else at_most)
    if low is not None and high is not None:
        words = f"in {'(' if above is not None else '['}{low}, {high}{')' if below is not None else ']'}"
    elif low is not None:
        words = f"a finite number {'>' if above is not None else '>='} {low}"
    elif high is not None:
        words = f"a finite number {'<' if below is not None else '<='} {high}"
    else:
        words = "a finite number"

    def accepts(v: Any) -> bool:
        return (
            _is_real(v)
            and (above is None or v > above)
            and (at_least is None or v >= at_least)
            and (below is None or v < below)
            and (at_most is None or v <= at_most)
        )

    return Domain(_note(words, note), accepts)


def one_of(choices: list, note: str = "") -> Domain:
    """One of `choices`, of the same type too (1 is not True); an enum member counts as its value."""
    return Domain(
        _note(f"one of {choices}", note),
        lambda v: any(type(json_value(v)) is type(c) and json_value(v) == c for c in choices),
        "{field}={value!r} is not accepted; use {expected}.",
    )


def optional(domain: Domain) -> Domain:
    """None (the option's default: left to the model, or off), or a value of `domain`."""
    return Domain(domain.expected, lambda v: v is None or domain.accepts(v), domain.template, domain.items)


def pattern_map(items: Domain) -> Domain:
    """None or a dict from module-name regexes (per-module overrides) to values of `items`."""
    return Domain(
        "a dict from module-name regular expressions (strings) to values",
        lambda v: v is None or (isinstance(v, dict) and all(_is_regex(k, embedded=True) for k in v)),
        items=items,
    )


BOOLEAN = Domain("True or False", lambda v: isinstance(v, bool))
TEXT = Domain("a string", lambda v: isinstance(v, str))
TARGET_MODULES = Domain(
    "a list of module names (strings), a valid regular expression (one string), or 'all-linear'",
    lambda v: _names(v) or _is_regex(v),
)
MODULE_NAMES = Domain(
    "a list of module names (strings) or a valid regular expression (one string)",
    lambda v: _names(v) or _is_regex(v),
)
MODULE_LIST = Domain(
    "a list of module names (strings)", lambda v: _names(v) or (isinstance(v, str) and bool(v))
)
LAYER_INDICES = Domain(
    "a layer index or a list of layer indices (integers >= 0)",
    lambda v: (
        (_is_int(v) and v >= 0) or (isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v))
    ),
)
LAYER_PATTERNS = Domain(
    "the name of the module list that holds the layers, e.g. 'layers' (a valid regular expression), "
    "or a list of such names",
    lambda v: (
        _is_regex(v, embedded=True)
        or (isinstance(v, (list, tuple)) and all(_is_regex(p, embedded=True) for p in v))
    ),
)
KEYWORD_ARGS = Domain(
    "a dict of keyword arguments (string keys)",
    lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
)
# Targeting options shared by the methods that adapt layers; see peftkit/targeting.py.
LAYER_SELECTION: dict[str, Domain] = {
    "target_modules": optional(TARGET_MODULES),
    "exclude_modules": optional(MODULE_NAMES),
    "layers_to_transform": optional(LAYER_INDICES),
    "layers_pattern": optional(LAYER_PATTERNS),
}


def check_choice(owner: str, option: str, value: Any, choices: list) -> None:
    """Raise a ValueError naming the option, the bad value and the accepted ones."""
    one_of(choices).check(owner, option, value)


def json_value(value: Any) -> Any:
    """JSON-friendly form of a config value: enums to their value, sets and tuples to lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value
