"""Hot-swapping: another saved adapter's weights copied into a loaded adapter's tensors, so that a compiled
model runs the new adapter without recompiling (Hugging Face peft's `hotswap_adapter` and
`prepare_model_for_compiled_hotswap`, same names and arguments).

A compiled graph checks the shapes, dtypes and devices of the tensors it reads, and holds Python numbers
(LoRA's scale α/r) as constants; a swap therefore writes into the tensors the model holds and changes
nothing else. Where the new adapter's tensors differ and still fit, its method's layers convert them
(`SavedState.swapped_in`): LoRA pads a smaller rank with zeros and folds the ratio of the two scales into
B, so that s_old·B′A = s_new·B A. Everything is read and checked before the first tensor is written: a
refused swap leaves the model as it was.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .layer import SavedState, TunedLayer, check_fits, holders_in
from .peft_model import PeftModel, _read_adapter
from .registry import method_for
from .serialization import _saved_state, adapter_tensors, load_parts, split_adapter_weights

CHECK_COMPILED = ("error", "warn", "ignore")


def _peft_model(model: nn.Module) -> PeftModel:
    """The PeftModel itself, also from the wrapper `torch.compile(model)` returns."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, PeftModel):
        raise TypeError(
            f"Hot-swapping works on a PeftModel (or torch.compile of one), not on a {type(inner).__name__}; "
            "load the first adapter with PeftModel.from_pretrained."
        )
    return inner


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: PeftConfig | dict[str, PeftConfig] | None = None,
    check_compiled: str = "error",
) -> None:
    """Grow every adapter's rank to `target_rank` (the largest rank among the adapters that will be swapped
    in), padding with zeros so that each computes what it did, before the model is compiled.

    Scales need no preparation here: a swap folds them into the weights. The model's configs then describe
    the padded adapters (saving and reloading one gives the same outputs), and so do `config`'s (one config,
    or a dict like `model.peft_config`), which are updated in place as Hugging Face peft updates them."""
    if check_compiled not in CHECK_COMPILED:
        raise ValueError(f"check_compiled={check_compiled!r}; use one of {list(CHECK_COMPILED)}.")
    if hasattr(model, "_orig_mod"):
        message = (
            "prepare_model_for_compiled_hotswap was given a compiled model: growing its weights now makes it "
            "compile again. Call it after loading the first adapter and before torch.compile."
        )
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    peft_model = _peft_model(model)
    if target_rank is None:
        return
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise ValueError(
            f"target_rank={target_rank!r}; give a whole number >= 1, the largest rank to swap in."
        )
    holders = holders_in(peft_model.get_base_model())
    padded = {}
    for name, adapter_config in peft_model.peft_config.items():
        layers = {
            path: h.adapters[name] for path, h in holders if isinstance(h, TunedLayer) and name in h.adapters
        }
        grown = method_for(adapter_config).padded_for_hotswap(adapter_config, layers, target_rank)
        if grown is not None:
            padded[name] = (adapter_config, grown)
            peft_model.peft_config[name] = grown
    if not padded:
        kinds = sorted({c.peft_type for c in peft_model.peft_config.values()})
        raise ValueError(
            f"target_rank={target_rank}, but no adapter here has a rank to grow (they are {kinds}); their "
            "tensors' shapes follow from the model, so hotswap_adapter needs no preparation: leave out "
            "target_rank."
        )
    given = config if isinstance(config, dict) else {peft_model.active_adapter: config} if config else {}
    for name, user_config in given.items():
        if name in padded:
            before, after = padded[name]
            for field, value in vars(after).items():
                if getattr(before, field) != value:
                    setattr(user_config, field, value)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str = "default",
    torch_device: str | torch.device | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    **kwargs: Any,
) -> None:
    """Replace the weights of the loaded adapter `adapter_name` by those saved in `model_name_or_path`, in
    place: a compiled model keeps its graphs and computes the new adapter.

    The new adapter must be of the same method, adapt the same layers, and differ in its config only where
    the method's layers absorb it (LoRA: rank up to the one held, α, rsLoRA and their patterns); anything
    else is refused, naming what differs. The adapter keeps its name, config and trainability; the weights
    land on the device the adapter's tensors are on (`torch_device` and the other keywords of Hugging Face
    peft's signature are accepted and change nothing, as nothing is downloaded)."""
    peft_model = _peft_model(model)
    peft_model._check_names([adapter_name])
    held_config = peft_model.peft_config[adapter_name]
    merged = [
        path
        for path, h in holders_in(peft_model.get_base_model())
        if adapter_name in getattr(h, "merged_adapters", ())
    ]
    if merged:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]!r}); swapping its "
            "weights now would leave the old ones merged. Call unmerge_adapter() first."
        )
    new_config, weights, source = _read_adapter(
        model_name_or_path, subfolder, None, not held_config.inference_mode, allow_pickle
    )
    refusal = f"{source} cannot be hot-swapped into adapter {adapter_name!r}"
    differences = held_config.hotswap_differences(new_config)
    if differences:
        raise ValueError(
            f"{refusal}: {'; '.join(differences)}. Swapping changes weights only; load it as another adapter "
            "with load_adapter instead."
        )
    held = adapter_tensors(peft_model, adapter_name)
    extra, missing = sorted(set(weights) - set(held)), sorted(set(held) - set(weights))
    if extra or missing:
        problems = []
        if extra:
            problems.append(f"{len(extra)} weights {adapter_name!r} has no place for (e.g. {extra[:2]})")
        if missing:
            problems.append(
                f"none of the {len(missing)} weights {adapter_name!r} holds at e.g. {missing[:2]}"
            )
        raise ValueError(
            f"{refusal}: it adapts other layers; it has {' and '.join(problems)}. Swapping keeps the layers "
            "the compiled model runs; load it as another adapter with load_adapter instead."
        )
    parts, base = split_adapter_weights(peft_model, adapter_name, weights)
    module_names = {
        id(adapter): path
        for path, h in holders_in(peft_model.get_base_model())
        if isinstance(h, TunedLayer)
        for n, adapter in h.adapters.items()
        if n == adapter_name
    }
    converted = []
    for prefix, owner, tensors in parts:
        where = f"{refusal}: {prefix}"
        if isinstance(owner, SavedState):
            tensors = owner.swapped_in(tensors, new_config, module_names.get(id(owner), ""), where)
        check_fits(_saved_state(owner), tensors, where)
        converted.append((prefix, owner, tensors))
    load_parts(peft_model, adapter_name, converted, base)
