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
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from torch import nn

from .config import CONFIG_NAME, PeftConfig, atomic_write
from .layer import ModulesToSave, SavedState, TunedLayer, copy_strict, holders_in
from .registry import method_by_type

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


def load_config(directory: str) -> PeftConfig:
    """Read `adapter_config.json` and build the config class its `peft_type` names."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory!r}. peftkit loads adapters from a local folder written by "
            "save_pretrained (peftkit or Hugging Face peft); it never downloads."
        )
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if "peft_type" not in data:
        raise ValueError(f"{path} has no 'peft_type'; it is not an adapter config.")
    return method_by_type(data["peft_type"]).config_class.from_dict(data)


def read_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an adapter's weights: safetensors, or a pickled .bin only when the caller opts in."""
    safe_path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(safe_path):
        return load_file(safe_path)
    pickle_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(
                f"{directory!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when "
                "loaded. If you trust its source pass allow_pickle=True (read with "
                "torch.load(weights_only=True)), or convert it to safetensors."
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}.")


def _without_head_copies(weights: dict[str, torch.Tensor], heads: list[str]) -> dict[str, torch.Tensor]:
    """Drop the second copy of a trained head's bias that Hugging Face peft writes with bias="all".

    peft then saves `<head>.modules_to_save.bias` beside `<head>.bias`, the same values twice, and ignores
    the copy when loading; so does peftkit."""

    def is_copy(key: str) -> bool:
        plain = key.replace(".modules_to_save.", ".", 1)
        return plain != key and plain in weights and any(plain.startswith(h) for h in heads)

    return {k: v for k, v in weights.items() if not is_copy(k)}


def load_adapter_weights(peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Hand each saved tensor to the owner module or base parameter it belongs to, strictly.

    A key the model itself has is a base parameter the adapter trained in place; any other key goes to
    the owner with the longest matching prefix (the model adapter's empty prefix takes the rest). Every
    owner must find its tensors, and base parameters are copied last, after every owner accepted its own."""
    found = sorted(owners(peft_model, name), key=lambda owner: -len(owner[0]))
    heads = [prefix for prefix, owner in found if not isinstance(owner, SavedState)]
    everything = peft_model.state_dict(keep_vars=True)
    base: dict[str, torch.Tensor] = {}
    by_owner: list[dict[str, torch.Tensor]] = [{} for _ in found]
    unknown = []
    for key, value in _without_head_copies(weights, heads).items():
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
    for (prefix, owner), tensors in zip(found, by_owner, strict=True):
        where = f"Adapter {name!r}: {prefix}"
        if isinstance(owner, SavedState):
            owner.load_saved(tensors, where)
        else:
            copy_strict(dict(owner.state_dict(keep_vars=True)), tensors, where)
    copy_strict({key: everything[key] for key in base}, base, f"Adapter {name!r}: ")
