"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, in Hugging Face peft's layout.

On disk a weight's key is its name inside the `PeftModel` with the adapter name taken out:
  base_model.model.<layer>.adapters.<name>.lora_A.weight  ->  base_model.model.<layer>.lora_A.weight
  base_model.model.<head>.modules_to_save.<name>.weight  ->  base_model.model.<head>.weight
  model_adapters.<name>.prompt_embeddings                ->  prompt_embeddings
Base-model parameters an adapter trains in place keep their full name. For an adapter that changes the
inputs (a model adapter: virtual tokens) Hugging Face peft holds the model one level higher, so its heads
are written `base_model.<head>.weight`.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save

from .config import CONFIG_NAME, PeftConfig, atomic_write
from .registry import method_by_type

if TYPE_CHECKING:
    from .peft_model import PeftModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def adapter_tensors(peft_model: PeftModel, name: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Everything adapter `name` owns: on-disk key -> (key inside the model, tensor)."""
    layer_mark, head_mark = f".adapters.{name}.", f".modules_to_save.{name}."
    model_prefix = f"model_adapters.{name}."
    base_params = set(peft_model.base_parameter_names.get(name, ()))
    inputs_only = name in peft_model.model_adapters
    owned = {}
    for key, tensor in peft_model.state_dict(keep_vars=True).items():
        if layer_mark in key:
            disk = key.replace(layer_mark, ".", 1)
        elif head_mark in key:
            disk = key.replace(head_mark, ".", 1)
            if inputs_only:
                disk = disk.replace("base_model.model.", "base_model.", 1)
        elif key.startswith(model_prefix):
            disk = key[len(model_prefix) :]
        elif key in base_params:
            disk = key
        else:
            continue
        owned[disk] = (key, tensor)
    return owned


def save_adapter(peft_model: PeftModel, name: str, directory: str) -> None:
    """Write one adapter's config and weights into `directory`.

    Both files are serialised before either is written, and each is replaced atomically, so a failure
    leaves the previous adapter in place."""
    owned = adapter_tensors(peft_model, name)
    tensors = {disk: t.detach().to("cpu").contiguous().clone() for disk, (_, t) in owned.items()}
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


def _without_head_copies(weights: dict[str, torch.Tensor], owned: dict) -> dict[str, torch.Tensor]:
    """Drop the second copy of a trained head's bias that Hugging Face peft writes with bias="all".

    peft then saves `<head>.modules_to_save.bias` beside `<head>.bias`, the same values twice, and ignores
    the copy when loading; so does peftkit."""

    def is_copy(key: str) -> bool:
        plain = key.replace(".modules_to_save.", ".", 1)
        return plain != key and plain in owned and plain in weights

    return {k: v for k, v in weights.items() if not is_copy(k)}


def load_adapter_weights(peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved weights into adapter `name`, refusing missing, unknown or misshapen tensors."""
    owned = adapter_tensors(peft_model, name)
    everything = peft_model.state_dict(keep_vars=True)
    weights = _without_head_copies(weights, owned)
    missing = sorted(set(owned) - set(weights))
    unknown = sorted(k for k in weights if k not in owned and k not in everything)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights this config expects are absent (e.g. {missing[:3]})")
        if unknown:
            problems.append(f"{len(unknown)} weights match no module of this model (e.g. {unknown[:3]})")
        raise ValueError(
            f"Adapter {name!r} does not fit this model: {'; '.join(problems)}. Load it onto the base model "
            "it was trained on, with the adapter_config.json saved beside it."
        )
    pairs = [
        (owned[disk][1] if disk in owned else everything[disk], disk, value)
        for disk, value in weights.items()
    ]
    for target, disk, value in pairs:
        if target.shape != value.shape:
            raise ValueError(
                f"Adapter {name!r}: {disk} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the model. The config (r, rank_pattern, num_virtual_tokens, ...) "
                "or the base model differs from the one the adapter was saved with."
            )
    with torch.no_grad():
        for target, _, value in pairs:
            target.copy_(value.to(dtype=target.dtype, device=target.device))
