"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, in Hugging Face peft's layout.

An adapter's tensors live in "owner" modules, each written under an on-disk prefix:
  a layer adapter    base_model.model.<layer>.adapters.<name>  ->  base_model.model.<layer>.lora_A.weight
  a trained head     base_model.model.<head>.modules_to_save.<name>  ->  base_model.model.<head>.weight
  a model adapter    model_adapters.<name>  ->  prompt_embeddings  (no prefix)
An owner writes its state_dict unless its method stores weights differently (`SavedState`). Base-model
parameters an adapter trains in place keep their full name. For adapters that rewrite the inputs (virtual
tokens) Hugging Face peft holds the model one level higher, so their heads are written `base_model.<head>.`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .composition import outside
from .config import CONFIG_NAME, PeftConfig, atomic_write
from .layer import ModulesToSave, SavedState, TunedLayer, copy_strict, holders_in
from .registry import METHODS

if TYPE_CHECKING:
    from .peft_model import PeftModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def owners(peft_model: PeftModel, name: str) -> list[tuple[str, nn.Module]]:
    """(on-disk prefix, module) for every module holding adapter `name`'s own tensors."""
    found = []
    model_adapter = peft_model.model_adapters[name] if name in peft_model.model_adapters else None  # noqa: SIM401
    head_root = "base_model." if getattr(model_adapter, "rewrites_inputs", False) else "base_model.model."
    for path, module in holders_in(peft_model.get_base_model()):
        if isinstance(module, TunedLayer) and name in module.adapters:
            found.append((f"base_model.model.{path}.", module.adapters[name]))
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            found.append((f"{head_root}{path}.", module.modules_to_save[name]))
    if model_adapter is not None:
        found.append(("", model_adapter))
    return found


def _saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return module.saved_state() if isinstance(module, SavedState) else dict(module.state_dict(keep_vars=True))


def adapter_tensors(peft_model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """Everything adapter `name` writes to disk, by on-disk key."""
    tensors = {
        prefix + key: t
        for prefix, owner in owners(peft_model, name)
        for key, t in _saved_state(owner).items()
    }
    everything = peft_model.state_dict(keep_vars=True)
    tensors.update({key: everything[key] for key in peft_model.base_parameter_names.get(name, ())})
    return tensors


def adapter_parameters(peft_model: PeftModel, name: str) -> list[nn.Parameter]:
    """The parameters adapter `name` trains: its owners' and the base parameters it selected."""
    params = [p for _, owner in owners(peft_model, name) for p in owner.parameters()]
    selected = peft_model.base_parameter_names.get(name, ())
    if not selected:
        return params
    everything = dict(peft_model.named_parameters(remove_duplicate=False))
    return params + [everything[key] for key in selected if key in everything]


def save_adapter(peft_model: PeftModel, name: str, directory: str) -> None:
    """Write one adapter's config and weights into `directory`.

    Both files are serialised before either is written, and each is replaced atomically, so a failure
    leaves the previous adapter in place."""
    owned = adapter_tensors(peft_model, name)
    tensors = {disk: t.detach().to("cpu").contiguous().clone() for disk, t in owned.items()}
    weights, config = save(tensors, metadata={"format": "pt"}), peft_model.peft_config[name].to_json()
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), weights)
    atomic_write(os.path.join(directory, CONFIG_NAME), config)


def check_folder(directory: str) -> None:
    """Refuse a path that is not an existing folder, before anything is read from it."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"An adapter folder is a path (str or os.PathLike); got {type(directory).__name__} {directory!r}."
        )
    if not os.path.isdir(directory):
        what = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(
            f"Adapter folder {os.fspath(directory)!r} {what}. peftkit loads adapters from a local folder "
            "written by save_pretrained (peftkit or Hugging Face peft); it never downloads."
        )


def adapter_file(directory: str, name: str) -> str:
    """The path of the file `name` in the adapter folder, refusing a symbolic link that leads outside it."""
    path = os.path.join(directory, name)
    target = outside(directory, path) if os.path.islink(path) else None
    if target:
        raise ValueError(
            f"{path} is a symbolic link to {target}, outside the adapter folder {os.fspath(directory)!r}; "
            "peftkit reads an adapter's files from its own folder only (a link to a file inside it is fine). "
            "Copy the file into the folder instead of linking to it."
        )
    return path


def load_config(directory: str) -> PeftConfig:
    """Read `adapter_config.json` and build the config class its `peft_type` names.

    Keys this version does not know are ignored with a warning that names the file."""
    check_folder(directory)
    path = adapter_file(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory!r}. peftkit loads adapters from a local folder written by "
            "save_pretrained (peftkit or Hugging Face peft); it never downloads."
        )
    expected = "a JSON object with the adapter's 'peft_type' and options, as save_pretrained writes it"
    with open(path, "rb") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({error})"
        raise ValueError(f"{path} {problem}; it should hold {expected}. Save the adapter again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not {expected}.")
    if "peft_type" not in data:
        raise ValueError(
            f"{path} has no 'peft_type'; it is not an adapter config. It should hold {expected}."
        )
    peft_type = data["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in METHODS:
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not a method peftkit knows; known: {sorted(METHODS)}."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = METHODS[peft_type].config_class.from_dict(data)
        except (ValueError, TypeError) as error:
            raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{path}: {error}") from None
    for warning in caught:
        message = str(warning.message)
        warnings.warn(message if path in message else f"{path}: {message}", warning.category, stacklevel=2)
    return config


def weights_file(directory: str, allow_pickle: bool = False) -> str:
    """The adapter's weights file: safetensors, or a pickled .bin only when the caller opts in."""
    check_folder(directory)
    safe_path = adapter_file(directory, WEIGHTS_NAME)
    if os.path.isfile(safe_path):
        return safe_path
    pickle_path = adapter_file(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(
                f"{directory!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when "
                "loaded. If you trust its source pass allow_pickle=True (read with "
                "torch.load(weights_only=True)), or convert it to safetensors."
            )
        return pickle_path
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}.")


def read_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an adapter's weights (see `weights_file`), refusing a file that is not whole.

    NaN or infinite values are refused, naming the tensors: an adapter holding them turns every output it
    touches into NaN, so such a file is always the trace of a diverged run, never something to serve."""
    path = weights_file(directory, allow_pickle)
    weights = _read_pickle(path) if path.endswith(PICKLE_WEIGHTS_NAME) else _read_safetensors(path)
    non_finite = sorted(
        key for key, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    if non_finite:
        raise ValueError(
            f"{path}: {len(non_finite)} tensors hold NaN or infinite values (e.g. {non_finite[:3]}), which "
            "would make the model's outputs NaN; the run that wrote them diverged. Load an earlier "
            "checkpoint, or train again with a lower learning rate."
        )
    return weights


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a whole safetensors file ({error}): it was cut short or corrupted. Save the "
            "adapter again, or copy the file again from where it was written."
        ) from None


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): tensors and plain containers only, so loading runs no code."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", str(error))
        raise ValueError(
            f"{path} holds more than tensors ({found.group(1) if found else _first_line(error)}), and "
            "torch.load(weights_only=True) builds nothing else, since that could run code. Convert the file "
            "to safetensors where it was written, from a trusted copy."
        ) from None
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable torch file ({type(error).__name__}: {_first_line(error)}): it was cut "
            "short or corrupted. Copy it again from where it was written."
        ) from None
    if isinstance(weights, dict):
        stray = [
            (k, v) for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
        ]
        if not stray:
            return weights
        found = f"{stray[0][0]!r} -> a {type(stray[0][1]).__name__}"
    else:
        found = f"a {type(weights).__name__}"
    raise ValueError(f"{path} holds {found}; an adapter's weights are a dict of tensors by name.")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


def _without_head_copies(weights: dict[str, torch.Tensor], heads: list[str]) -> dict[str, torch.Tensor]:
    """Drop the second copy of a trained head's bias that Hugging Face peft writes with bias="all".

    peft then saves `<head>.modules_to_save.bias` beside `<head>.bias`, the same values twice, and ignores
    the copy when loading; so does peftkit."""

    def is_copy(key: str) -> bool:
        plain = key.replace(".modules_to_save.", ".", 1)
        return plain != key and plain in weights and any(plain.startswith(h) for h in heads)

    return {k: v for k, v in weights.items() if not is_copy(k)}


def load_adapter_weights(
    peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor], source: str | None = None
) -> None:
    """Hand each saved tensor to the owner module or base parameter it belongs to, strictly.

    A key the model itself has is a base parameter the adapter trained in place; any other key goes to
    the owner with the longest matching prefix (the model adapter's empty prefix takes the rest). Every
    owner must find its tensors, and base parameters are copied last, after every owner accepted its own.
    A tensor must hold the kind of values the model holds under its key (integer weights are not cast to
    float). A refusal names `source` (the file the weights came from) when given."""
    try:
        _load_adapter_weights(peft_model, name, weights)
    except ValueError as error:
        if source is None:
            raise
        raise ValueError(f"{source}: {error}") from None


def _kind(tensor: torch.Tensor) -> str:
    """Floating-point, integer, boolean or complex: what a cast between dtypes must not change."""
    if tensor.dtype == torch.bool:
        return "boolean"
    return "floating-point" if tensor.is_floating_point() else "complex" if tensor.is_complex() else "integer"


def _load_adapter_weights(peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    load_parts(peft_model, name, *split_adapter_weights(peft_model, name, weights))


def load_parts(
    peft_model: PeftModel,
    name: str,
    parts: list[tuple[str, nn.Module, dict[str, torch.Tensor]]],
    base: dict[str, torch.Tensor],
) -> None:
    """Copy what `split_adapter_weights` returned into adapter `name`'s modules and the base parameters."""
    for prefix, owner, tensors in parts:
        where = f"Adapter {name!r}: {prefix}"
        if isinstance(owner, SavedState):
            owner.load_saved(tensors, where)
        else:
            copy_strict(dict(owner.state_dict(keep_vars=True)), tensors, where)
    everything = peft_model.state_dict(keep_vars=True)
    copy_strict({key: everything[key] for key in base}, base, f"Adapter {name!r}: ")


def split_adapter_weights(
    peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, nn.Module, dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Saved tensors by the module that takes them: ([(on-disk prefix, owner, its tensors by relative key)],
    base parameters by key), or a ValueError naming what fits nowhere or what the file lacks."""
    found = sorted(owners(peft_model, name), key=lambda owner: -len(owner[0]))
    heads = [prefix for prefix, owner in found if not isinstance(owner, SavedState)]
    everything = peft_model.state_dict(keep_vars=True)
    weights = _without_head_copies(weights, heads)
    held = everything | {prefix + key: t for prefix, owner in found for key, t in _saved_state(owner).items()}
    wrong = [key for key, value in weights.items() if key in held and _kind(value) != _kind(held[key])]
    if wrong:
        value, target = weights[wrong[0]], held[wrong[0]]
        raise ValueError(
            f"Adapter {name!r}: {len(wrong)} tensors hold the wrong kind of values, e.g. {wrong[0]} holds "
            f"{_kind(value)} values ({value.dtype}) in the file where the model holds {_kind(target)} ones "
            f"({target.dtype}). The file was not written by save_pretrained, or was altered; save the "
            "adapter again."
        )
    base: dict[str, torch.Tensor] = {}
    by_owner: list[dict[str, torch.Tensor]] = [{} for _ in found]
    unknown = []
    for key, value in weights.items():
        if key in everything:
            base[key] = value
            continue
        index = next((i for i, (prefix, _) in enumerate(found) if key.startswith(prefix)), None)
        if index is None:
            unknown.append(key)
        else:
            by_owner[index][key[len(found[index][0]) :]] = value
    empty = [  # owners that write tensors but found none in the file
        prefix or type(owner).__name__
        for (prefix, owner), got in zip(found, by_owner, strict=True)
        if not got and _saved_state(owner)
    ]
    if unknown or empty:
        problems = []
        if empty:
            problems.append(f"it has no weights for {len(empty)} adapted modules (e.g. {empty[:3]})")
        if unknown:
            problems.append(
                f"{len(unknown)} of its weights match no module here (e.g. {sorted(unknown)[:3]})"
            )
        raise ValueError(
            f"Adapter {name!r} does not fit this model: {'; '.join(problems)}. Load it onto the base model "
            "it was trained on, with the adapter_config.json saved beside it."
        )
    return [(prefix, owner, got) for (prefix, owner), got in zip(found, by_owner, strict=True)], base
