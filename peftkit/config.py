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
import os
import tempfile
import warnings
from typing import Any, ClassVar

from .domains import BOOLEAN, MODULE_LIST, TEXT, Domain, json_value, one_of, optional

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the `PeftModel` subclass and the trainable head."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


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
    # The share of its optimizer steps over which `peftkit train` warms the learning rate up from 0.
    default_warmup_fraction: ClassVar[float] = 0.06
    # Fields in which an adapter swapped in by `hotswap_adapter` may differ from the one it replaces: which
    # layers it adapts is checked on its weights instead, and a method adds what its layers absorb.
    swappable_fields: ClassVar[frozenset[str]] = frozenset(
        {"base_model_name_or_path", "revision", "inference_mode", "modules_to_save"}
        | {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
    )

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
            self.task_type = TaskType(json_value(self.task_type))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        layers_pattern = getattr(self, "layers_pattern", None)
        if layers_pattern and getattr(self, "layers_to_transform", None) is None:
            raise ValueError(
                f"{name}: layers_pattern={layers_pattern!r} needs layers_to_transform: the pattern only says "
                "where layer indices are read in module names. Give layers_to_transform (e.g. [0, 1]) too, "
                "or drop layers_pattern."
            )

    def hotswap_differences(self, other: PeftConfig) -> list[str]:
        """What keeps an adapter with config `other` from replacing this one's weights in place: one line per
        field outside `swappable_fields` in which they differ (an empty list: none)."""
        if type(other) is not type(self):
            return [f"it is a {other.peft_type} adapter, not a {self.peft_type} one"]
        return [
            f"{f.name}={getattr(other, f.name)!r} where this adapter has {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in self.swappable_fields and getattr(other, f.name) != getattr(self, f.name)
        ]

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to `adapter_config.json`, keys sorted as Hugging Face peft writes them."""
        data = {k: json_value(v) for k, v in self.reference_fields.items()}
        for f in dataclasses.fields(self):
            data[f.name] = json_value(getattr(self, f.name))
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
                if value != json_value(cls.reference_fields[key]) and value not in (None, {}, [], False):
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
