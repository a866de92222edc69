"""Adapter configs: the shared base class, task types, and reading/writing `adapter_config.json`.

A method's config is a dataclass that subclasses `PeftConfig` and is declared with `@method_config`.
Field names and defaults follow Hugging Face peft so that files move between the two libraries.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the `PeftModel` subclass and the trainable head."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# ---- what each option accepts ---------------------------------------------------------------------


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
        lambda v: any(type(_plain(v)) is type(c) and _plain(v) == c for c in choices),
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


def _reject_unknown_options(cls: type) -> None:
    """Wrap the dataclass __init__ so that a misspelled option names the closest real one."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                alias = getattr(cls, "option_aliases", {}).get(key)
                close = [alias] if alias in names else difflib.get_close_matches(key, names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"{cls.__name__} has no option {', '.join(hints)}. Its options are: {', '.join(names)}."
            )
        init(self, *args, **kwargs)

    cls.__init__ = checked_init


def method_config(cls: type) -> type:
    """Class decorator for method configs: a dataclass whose constructor rejects unknown options."""
    cls = dataclasses.dataclass(cls)
    _reject_unknown_options(cls)
    return cls


@method_config
class PeftConfig:
    """Fields every adapter config has.

    Class attributes a method config sets:
      peft_type          the name written to `adapter_config.json` ("LORA", "BITFIT", ...).
      reference_fields   fields Hugging Face peft writes for this method that peftkit does not implement,
                         with the value meaning "feature off". They are written with that value, and a file
                         that turns one on is refused rather than silently loaded with different outputs.
      field_domains      what each of its fields accepts (a `Domain` per field, every field): checked when
                         a config is built, so also when adapter_config.json is read, before the class's
                         own `__post_init__` checks how its options fit together.
    """

    peft_type: ClassVar[str] = ""
    reference_fields: ClassVar[dict[str, Any]] = {"auto_mapping": None}
    # Written by Hugging Face peft for bookkeeping; read and ignored whatever their value.
    informational_fields: ClassVar[frozenset[str]] = frozenset({"auto_mapping", "peft_version"})
    # Common names for an option that spelling similarity alone would not suggest ("rank" -> "r").
    option_aliases: ClassVar[dict[str, str]] = {}
    # The learning rate `peftkit train` uses for this method unless told otherwise.
    default_learning_rate: ClassVar[float] = 1e-3

    @classmethod
    def training_defaults(cls, total_steps: int) -> dict[str, Any]:
        """Options `peftkit train` sets unless told otherwise: values a user must otherwise choose, or that
        depend on the run's length (`total_steps` optimizer steps)."""
        return {}

    field_domains: ClassVar[dict[str, Domain]] = {
        "task_type": optional(one_of([t.value for t in TaskType])),
        "base_model_name_or_path": optional(TEXT),
        "revision": optional(TEXT),
        "inference_mode": BOOLEAN,
        "modules_to_save": optional(MODULE_LIST),
    }

    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for option, domain in self.field_domains.items():
            domain.check(name, option, getattr(self, option))
        if self.task_type is not None:
            self.task_type = TaskType(_plain(self.task_type))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        layers_pattern = getattr(self, "layers_pattern", None)
        if layers_pattern and getattr(self, "layers_to_transform", None) is None:
            raise ValueError(
                f"{name}: layers_pattern={layers_pattern!r} needs layers_to_transform: the pattern only says "
                "where layer indices are read in module names. Give layers_to_transform (e.g. [0, 1]) too, "
                "or drop layers_pattern."
            )

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to `adapter_config.json`, keys sorted as Hugging Face peft writes them."""
        data = {k: _plain(v) for k, v in self.reference_fields.items()}
        for f in dataclasses.fields(self):
            data[f.name] = _plain(getattr(self, f.name))
        data["peft_type"] = self.peft_type
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build a config from a JSON object, refusing features peftkit lacks and warning on unknown keys."""
        data = dict(data)
        stored_type = data.pop("peft_type", cls.peft_type)
        if stored_type != cls.peft_type:
            raise ValueError(f"{cls.__name__} cannot read a config whose peft_type is {stored_type!r}.")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.informational_fields:
                continue
            elif key in cls.reference_fields:
                if value != _plain(cls.reference_fields[key]) and value not in (None, {}, [], False):
                    raise ValueError(
                        f"This {stored_type} adapter sets {key}={value!r}, a Hugging Face peft feature that "
                        f"peftkit does not implement; loading it here would give different outputs. "
                        f"Load it with Hugging Face peft, or retrain without {key}."
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"adapter_config.json has keys this version of peftkit does not know: {sorted(unknown)}. "
                "They are ignored; the file was probably written by a newer version.",
                stacklevel=2,
            )
        return cls(**kwargs)

    def to_json(self) -> bytes:
        """The bytes of `adapter_config.json` (a saved adapter is marked for inference, as peft does)."""
        data = self.to_dict()
        data["inference_mode"] = True
        return (json.dumps(data, indent=2) + "\n").encode()


def atomic_write(path: str, payload: bytes) -> None:
    """Write bytes to `path` so that readers see the old file or the new one, never half of one."""
    handle, tmp = tempfile.mkstemp(
        prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path)
    )
    try:
        with os.fdopen(handle, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a saved file is not
        os.replace(tmp, path)
    except OSError as error:  # a full disk, a file-size limit, a read-only folder: say which file
        raise OSError(
            error.errno,
            f"could not write {path} ({error.strerror or error}); the file it would replace is unchanged",
        ) from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain(value: Any) -> Any:
    """JSON-friendly form of a config value: enums to their value, sets and tuples to lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value
