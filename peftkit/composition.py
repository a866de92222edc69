"""A combined model as a value: which adapters a folder holds, in what order, and which are active together.

`save_pretrained` of several adapters writes one `adapter_composition.json` beside peft's multi-adapter
layout (the adapter named "default" at the top level, every other in a sub-folder named after it), and
`PeftModel.from_composition` reads it to restore the whole combination in one call. Hugging Face peft
ignores the file, so each adapter's folder still loads there on its own.

Because an adapter's name is also a module key and a sub-folder, `check_adapter_name` allows only names
that are both: no '.', no path separator, nothing that could lead outside the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .config import atomic_write
from .layer import BASE_ROW

COMPOSITION_NAME = "adapter_composition.json"
TOP_LEVEL_ADAPTER = "default"
VALID_NAMES = (
    "An adapter name is a non-empty string of printable characters without '.', '/' or '\\\\' (it is a "
    "module key, and save_pretrained writes the adapter to a sub-folder of that name), at most 255 bytes, "
    f"and not {BASE_ROW!r}, which adapter_names uses for rows without adapter; e.g. 'default' or 'task_a'."
)


def check_adapter_name(name: Any) -> None:
    """Refuse a name that could not be both a module key and a folder inside the directory it is saved in."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name={name!r} is a {type(name).__name__}, not a string. {VALID_NAMES}")
    separators = [c for c in ("/", "\\", ".") if c in name]
    if not name:
        problem = "it is empty"
    elif name == BASE_ROW:
        problem = "it is reserved"
    elif separators:
        problem = f"it contains {separators[0]!r}"
    elif not name.isprintable():
        problem = "it contains a control or unprintable character"
    elif len(name.encode()) > 255:
        problem = "it is longer than a folder name can be"
    else:
        return
    raise ValueError(f"adapter_name={name!r} cannot name an adapter: {problem}. {VALID_NAMES}")


def adapter_directory(root: str, name: str) -> str:
    """Where `save_pretrained(root)` writes adapter `name`: "default" at the top, others in a sub-folder."""
    return root if name == TOP_LEVEL_ADAPTER else os.path.join(root, name)


def outside(root: str, path: str) -> str | None:
    """Where `path` really is (every symbolic link followed) when that is not inside the folder `root`."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return None if os.path.commonpath([real_root, real]) == real_root else real


@dataclasses.dataclass(frozen=True)
class Composition:
    """`adapters` in the order they were added; `active` those made active together, in their order."""

    adapters: tuple[str, ...]
    active: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in self.adapters:
            check_adapter_name(name)
        if not self.adapters or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"A composition lists each adapter once; got {list(self.adapters)}.")
        stray = [n for n in self.active if n not in self.adapters]
        if stray:
            raise ValueError(f"Active adapters {stray} are not among the composition's {list(self.adapters)}")

    def write(self, root: str) -> None:
        data = {"adapters": list(self.adapters), "active": list(self.active)}
        atomic_write(os.path.join(root, COMPOSITION_NAME), (json.dumps(data, indent=2) + "\n").encode())

    @classmethod
    def read(cls, root: str) -> Composition:
        path = os.path.join(root, COMPOSITION_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {COMPOSITION_NAME} in {root!r}: it is written by save_pretrained of a model holding "
                "several adapters. Load a single adapter with PeftModel.from_pretrained, and others with "
                "load_adapter(<folder>/<name>, <name>)."
            )
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); save_pretrained writes it as an object with 'adapters' "
                "and 'active', each a list of adapter names."
            ) from None
        lists = isinstance(data, dict) and all(
            isinstance(data.get(key, []), list) and all(isinstance(n, str) for n in data.get(key, []))
            for key in ("adapters", "active")
        )
        if not lists or not data.get("adapters"):
            raise ValueError(
                f"{path} is not a composition file: it needs 'adapters' (and may have 'active'), each a list "
                "of adapter names."
            )
        try:
            composition = cls(tuple(data["adapters"]), tuple(data.get("active", [])))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        missing = [n for n in composition.adapters if not os.path.isdir(adapter_directory(root, n))]
        if missing:
            raise FileNotFoundError(f"{path} lists adapters {missing} whose folders are not in {root!r}.")
        for name in composition.adapters:
            target = outside(root, adapter_directory(root, name))
            if target:
                raise ValueError(
                    f"{path} lists adapter {name!r}, whose folder {adapter_directory(root, name)!r} is a "
                    f"symbolic link to {target!r}, outside {root!r}; peftkit reads a composition from its "
                    "own folder only. Copy that adapter's folder in instead of linking to it."
                )
        return composition
