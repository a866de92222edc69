"""Which modules a config selects. The one place that turns `target_modules` and friends into names.

Rules (the same as Hugging Face peft's):
  * a list of names matches a module whose full name equals an entry or ends with "." + entry;
  * a string is a regular expression matched against the whole module name;
  * "all-linear" selects every linear layer (nn.Linear, transformers' Conv1D) but the output head;
  * `exclude_modules` uses the same list/regex rules; modules in `modules_to_save` are never targets;
  * `layers_to_transform` keeps modules whose first numbered path segment (after `layers_pattern`,
    if given) is one of the listed layer indices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2's linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def name_matches(spec: str | Iterable[str], name: str) -> bool:
    """A module name against a list of suffixes or a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def in_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    """Whether `name` is, or lies inside, a module listed in modules_to_save."""
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """Index of the transformer block a module belongs to, read from its name."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(match.group(1)) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """Per-module override from `rank_pattern` / `alpha_pattern`: keys are regexes matched at a name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def adaptable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) pairs of the user's model as it was before wrapping, in module order: a wrapped layer
    is its original module under its own name, and a wrapped block's layers keep their names inside it;
    the adapters themselves and the insides of wrapped heads (modules_to_save) are skipped."""
    from .layer import TunedLayer, unwrapped_modules

    return ((n, m) for n, m in unwrapped_modules(model) if not isinstance(m, TunedLayer))


def model_type(model: nn.Module) -> str | None:
    """transformers' `model_type` ("llama", "bert", ...), which keys the per-architecture defaults."""
    return getattr(getattr(model, "config", None), "model_type", None)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head) that "all-linear" leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_targets(
    model: nn.Module,
    config: Any,
    supports: Callable[[nn.Module], bool],
) -> list[str]:
    """Names of the modules `config` selects in `model`; an error that lists what exists if none."""
    spec = getattr(config, "target_modules", None)
    if spec is None:
        raise ValueError(
            f"{type(config).__name__} needs target_modules for {type(model).__name__}: "
            f"for example {suggest_targets(model)!r}, or 'all-linear'."
        )
    if isinstance(spec, (list, tuple, set)) and ALL_LINEAR in spec:
        spec = ALL_LINEAR
    exclude = getattr(config, "exclude_modules", None)
    modules_to_save = getattr(config, "modules_to_save", None)
    layers = getattr(config, "layers_to_transform", None)
    if isinstance(layers, int):
        layers = [layers]
    heads = output_head_names(model)

    matched, unsupported = [], []
    for name, module in adaptable_modules(model):
        if not name:
            continue
        if spec == ALL_LINEAR:
            if not is_linear(module) or name in heads:
                continue
        elif not name_matches(spec, name):
            continue
        if exclude and name_matches(exclude, name):
            continue
        if in_modules_to_save(name, modules_to_save):
            continue
        if layers and layer_index(name, getattr(config, "layers_pattern", None)) not in layers:
            continue
        (matched if supports(module) else unsupported).append((name, module))

    if unsupported and isinstance(spec, (list, tuple, set)):
        name, module = unsupported[0]
        inside = leaf_names(module, supports)
        hint = (
            f"Target its layers instead: {inside!r}."
            if inside
            else describe_adaptable(model, config, supports)
        )
        raise ValueError(
            f"target_modules={spec!r} matched {name!r} ({type(module).__name__}), which "
            f"{type(config).__name__} cannot adapt. {hint}"
        )
    if not matched:
        filters = (
            f" (with exclude_modules={exclude!r}, layers_to_transform={layers!r})"
            if exclude or layers
            else ""
        )
        raise ValueError(
            f"target_modules={spec!r} matched nothing in {type(model).__name__}{filters}. "
            + describe_adaptable(model, config, supports)
        )
    return [name for name, _ in matched]


def leaf_names(model: nn.Module, supports: Callable[[nn.Module], bool]) -> list[str]:
    """Distinct last name segments of the modules a method can adapt, in model order."""
    seen: dict[str, None] = {}
    for name, module in adaptable_modules(model):
        if name and supports(module):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def describe_adaptable(model: nn.Module, config: Any, supports: Callable[[nn.Module], bool]) -> str:
    """One sentence listing the layer names a config's method could target in `model`."""
    names = leaf_names(model, supports)
    shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") if names else "(none)"
    return f"Layers here that {type(config).__name__} can adapt: {shown}."


def suggest_targets(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers but the output head: the usual `target_modules` list."""
    heads = {n.rsplit(".", 1)[-1] for n in output_head_names(model)}
    return [n for n in leaf_names(model, is_linear) if n not in heads]


def target_union(values: list[list[str] | str | None], option: str = "target_modules") -> list[str] | str:
    """The modules any of several configs selects: the union of name lists, or regexes joined by `|`."""
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    if all(isinstance(v, list) for v in values):
        return sorted(set().union(*values))
    raise ValueError(
        f"The adapters' {option} mix regular expressions and lists ({values}); combine adapters whose "
        f"{option} are all lists or all strings."
    )
