"""A combined model as a value: which adapters a folder holds, in what order, and which are active together.

`save_pretrained` of several adapters writes one `adapter_composition.json` beside peft's multi-adapter
layout (the adapter named "default" at the top level, every other in a sub-folder named after it), and
`PeftModel.from_composition` reads it to restore the whole combination in one call. Hugging Face peft
ignores the file, so each adapter's folder still loads there on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os

from .config import atomic_write

COMPOSITION_NAME = "adapter_composition.json"
TOP_LEVEL_ADAPTER = "default"


def adapter_directory(root: str, name: str) -> str:
    """Where `save_pretrained(root)` writes adapter `name`: "default" at the top, others in a sub-folder."""
    return root if name == TOP_LEVEL_ADAPTER else os.path.join(root, name)


@dataclasses.dataclass(frozen=True)
class Composition:
    """`adapters` in the order they were added; `active` those made active together, in their order."""

    adapters: tuple[str, ...]
    active: tuple[str, ...]

    def __post_init__(self) -> None:
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
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        lists = isinstance(data, dict) and all(
            isinstance(data.get(key, []), list) and all(isinstance(n, str) for n in data.get(key, []))
            for key in ("adapters", "active")
        )
        if not lists or not data.get("adapters"):
            raise ValueError(
                f"{path} is not a composition file: it needs 'adapters' (and may have 'active'), each a list "
                "of adapter names."
            )
        composition = cls(tuple(data["adapters"]), tuple(data.get("active", [])))
        missing = [n for n in composition.adapters if not os.path.isdir(adapter_directory(root, n))]
        if missing:
            raise FileNotFoundError(f"{path} lists adapters {missing} whose folders are not in {root!r}.")
        return composition
