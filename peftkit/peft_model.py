"""`PeftModel`: the wrapper users hold, and the adapter lifecycle.

The wrapper knows no method by name: it asks the registered `Method` of each config what to add
(layer adapters on targets, a model-level adapter, base parameters to train) and manages the rest
(activation, trainability, disabling, merging, unloading, saving, loading) the same way for all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from .composition import (
    COMPOSITION_NAME,
    TOP_LEVEL_ADAPTER,
    Composition,
    adapter_directory,
    check_adapter_name,
    outside,
)
from .config import CONFIG_NAME, PeftConfig, TaskType
from .layer import (
    BASE_ROW,
    AdapterHolder,
    ModelAdapter,
    ModulesToSave,
    NotMergeableError,
    TunedLayer,
    holders_in,
    route_rows,
)
from .merging import WeightedMerge
from .quantization import dequantize_model
from .registry import method_for
from .serialization import (
    adapter_parameters,
    check_folder,
    load_adapter_weights,
    load_config,
    read_weights,
    save_adapter,
    weights_file,
)
from .targeting import find_targets, in_modules_to_save


class BaseModelHolder(nn.Module):
    """Holds the user's model as `.model`, so weights are named `base_model.model.*` as in Hugging Face
    peft."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "model"):
                raise
            return getattr(self.model, name)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module `name` (as `holders_in` names it) is, inside any block wrapped around it."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root  # wrappers pass attributes through
    while isinstance(parent, TunedLayer) and child not in parent._modules:
        parent = parent.base_layer
    setattr(parent, child, new)


class PeftModel(nn.Module):
    """A transformers (or any torch) model with named adapters added to it.

    `task_heads` lists modules a task trains in full (the classification head); subclasses set it.
    """

    task_heads: ClassVar[list[str]] = []

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        check_adapter_name(adapter_name)  # before the model is touched
        self.base_model = BaseModelHolder(model)
        self.model_adapters = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self.base_parameter_names: dict[str, list[str]] = {}
        self._active: list[str] = []
        self._disabled = False
        self._running: list[tuple[ModelAdapter, PeftConfig]] = []
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)
        self._mirror_forward_signature()
        # wrapping does not switch between train and eval mode
        self.training = self.base_model.training = self.model_adapters.training = model.training

    def _mirror_forward_signature(self) -> None:
        """Show the wrapped model's forward arguments (plus `adapter_names`) to tools that read them:
        transformers' Trainer drops every dataset column the forward signature does not name."""
        base = inspect.signature(self.get_base_model().forward)
        params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
        params += [p for p in base.parameters.values() if p.kind is p.VAR_KEYWORD]
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = base.replace(parameters=params)
        self.forward = forward

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "base_model", "model_adapters", "_active"):
                raise
            exporting = [  # model-wide operations a method exports (update_and_allocate)
                self.model_adapters[n]
                for n in self._active
                if n in self.model_adapters and name in self.model_adapters[n].exports
            ]
            if len(exporting) == 1:
                return getattr(exporting[0], name)
            if exporting:
                return functools.partial(_call_each, [getattr(a, name) for a in exporting])
            return getattr(self.base_model.model, name)

    # ---- what is in the model ----------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with the adapter layers in it)."""
        return self.base_model.model

    def _holders(self) -> list[AdapterHolder]:
        return [holder for _, holder in holders_in(self.get_base_model())]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    # ---- lifecycle ----------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive adapter; `set_adapter` activates it.

        Adapter weights take the base layer's device and dtype, except that with `autocast_adapter_dtype`
        they stay in float32 over a float16/bfloat16 base, which trains more stably. `low_cpu_mem_usage`
        is accepted for Hugging Face peft's signature; adapters here are small and built directly."""
        self._check_new_name(adapter_name)
        model = self.get_base_model()
        method = method_for(peft_config)
        config = method.resolve_config(model, self._complete_config(peft_config, model))
        targets = find_targets(model, config, method.supports) if method.adapts_layers else []
        layer_adapters = {}
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, TunedLayer) else module
            adapter = method.layer_adapter(base, name, config)
            layer_adapters[name] = adapter.to(**_placement(base, autocast_adapter_dtype)).train(
                model.training
            )
        model_adapter = method.model_adapter(model, config)
        if model_adapter is not None:
            model_adapter.train(model.training)

        for name, adapter in layer_adapters.items():
            module = model.get_submodule(name)
            if not isinstance(module, TunedLayer):
                module = TunedLayer(module)
                _replace_module(model, name, module)
            module.add(adapter_name, adapter)
        if model_adapter is not None:
            model_adapter.layer_adapters = dict(layer_adapters)
            self.model_adapters[adapter_name] = model_adapter
        self._wrap_modules_to_save(adapter_name, config.modules_to_save)
        self.base_parameter_names[adapter_name] = [
            f"base_model.model.{n}" for n in method.base_parameters(model, config, targets)
        ]
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def _check_new_name(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} exists already; delete_adapter it or pick another name."
            )

    def _complete_config(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        """A copy of `config` with the task's trained heads and the base model's name filled in."""
        changes: dict[str, Any] = {}
        if self.task_heads:
            changes["modules_to_save"] = list(config.modules_to_save or []) + [
                h for h in self.task_heads if h not in (config.modules_to_save or [])
            ]
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            changes["base_model_name_or_path"] = name or None
        return dataclasses.replace(config, **changes)

    def _wrap_modules_to_save(self, adapter_name: str, names: list[str] | None) -> None:
        if not names:
            return
        model = self.get_base_model()
        found = [
            n
            for n, m in model.named_modules()
            if n
            and not isinstance(m, TunedLayer)
            and in_modules_to_save(n, names)
            and n.rsplit(".", 1)[-1] in names
        ]
        for name in found:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace_module(model, name, module)
            module.add(adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (applied in the order given) and trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        owners: dict[str, list[str]] = {}
        for name in names:
            if name in self.model_adapters and (slot := self.model_adapters[name].sole_owner_of):
                owners.setdefault(slot, []).append(name)
        for slot, sharing in owners.items():
            if len(sharing) > 1:
                raise ValueError(
                    f"Adapters {sharing} each fill {slot} alone, so they cannot be active together; activate "
                    "one of them (with any others that do not)."
                )
        self._active = names
        for holder in self._holders():
            holder.set_active(names)
        self._refresh_running()
        self._update_trainable()

    def _check_names(self, names: list[str], allow_base: bool = False) -> None:
        unknown = [n for n in names if n not in self.peft_config and not (allow_base and n == BASE_ROW)]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {list(self.peft_config)}.")

    def _update_trainable(self) -> None:
        """Active adapters not loaded for inference train; every other tensor is frozen, and so are the copies
        of a trained module (a head) that active adapters hold but do not use: the first active one's runs."""
        tensors: dict[int, torch.Tensor] = {}
        trains: dict[int, bool] = {}
        for name, config in self.peft_config.items():
            active = name in self._active and not config.inference_mode
            for tensor in adapter_parameters(self, name):
                # a base tensor several adapters train in place (bias="all") trains if any of them does
                tensors[id(tensor)] = tensor
                trains[id(tensor)] = trains.get(id(tensor), False) or active
        unused = [
            copy
            for holder in self._holders()
            if isinstance(holder, ModulesToSave)
            for name, copy in holder.modules_to_save.items()
            if name not in holder.active_adapters[:1]
        ]
        for tensor in (t for copy in unused for t in copy.parameters()):
            trains[id(tensor)] = False
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                tensor.requires_grad_(trains[key])

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this context the model computes as the base model (merged adapters are unmerged first).

        Adapters that changed base weights when created (PiSSA / OLoRA residuals, `bias="all"`) leave the
        base as they changed it."""
        holders = self._holders()
        for holder in holders:
            if isinstance(holder, TunedLayer):
                holder.unmerge()
            holder.disabled = True
        self._disabled = True
        self._refresh_running()
        try:
            yield
        finally:
            for holder in holders:
                holder.disabled = False
            self._disabled = False
            self._refresh_running()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with no adapter get their original module back."""
        self._check_names([adapter_name])
        model = self.get_base_model()
        for name, module in reversed(holders_in(model)):  # a wrapped block's layers before the block
            if adapter_name in module.adapter_names():
                module.delete(adapter_name)
                if not module.adapter_names():
                    original = module.base_layer if isinstance(module, TunedLayer) else module.original_module
                    _replace_module(model, name, original)
        if adapter_name in self.model_adapters:  # ModuleDict.pop takes no default
            del self.model_adapters[adapter_name]
        del self.peft_config[adapter_name]
        self.base_parameter_names.pop(adapter_name, None)
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = remaining
        for holder in self._holders():
            holder.set_active(remaining)
        self._refresh_running()
        self._update_trainable()

    def _input_side(self, names: list[str]) -> list[str]:
        """Those of `names` whose model adapter rewrites the inputs (virtual tokens)."""
        return [n for n in names if n in self.model_adapters and self.model_adapters[n].rewrites_inputs]

    def _check_mergeable(self, names: list[str]) -> None:
        inputs_only = self._input_side(names)
        if inputs_only:
            raise NotMergeableError(
                f"Adapter(s) {inputs_only} change the model's inputs rather than its weights, so there is "
                "nothing to merge; keep them as adapters."
            )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights; `unmerge_adapter` undoes it.

        Named adapters must all fold. By default the active ones fold, each one that can: an adapter that
        cannot (it changes the inputs, or its method has no merge), or that follows such an adapter on a layer
        both adapt, keeps computing as an adapter, and a warning names it and why."""
        if adapter_names is not None or len(self._active) == 1:
            names = list(adapter_names or self._active)
            self._check_names(names)
            self._check_mergeable(names)
            self._merge(names, safe_merge)
            return
        kept = self._merge_what_folds(self._active, safe_merge)
        if len(kept) == len(self._active):
            raise NotMergeableError(f"None of the active adapters can be folded: {_reasons(kept)}.")
        if kept:
            warnings.warn(
                f"Kept as adapters, unmerged: {_reasons(kept)}. The others are folded into the base weights.",
                stacklevel=2,
            )

    def _merge_what_folds(self, names: list[str], safe_merge: bool) -> dict[str, str]:
        """Fold each of `names` that can be, in order; returns those left unmerged, with the reason."""
        kept = {n: "it changes the model's inputs, not its weights" for n in self._input_side(names)}
        layers = [(p, h) for p, h in holders_in(self.get_base_model()) if isinstance(h, TunedLayer)]
        for name in names:
            if name in kept:
                continue
            blocker = next(
                (
                    (path, earlier)
                    for path, layer in layers
                    if name in layer.active_adapters
                    for earlier in layer.active_adapters[: layer.active_adapters.index(name)]
                    if earlier in kept
                ),
                None,
            )
            if blocker:  # folding it would move it ahead of the unmerged adapter it follows
                kept[name] = f"it follows {blocker[1]!r} on {blocker[0]}, which stays unmerged"
                continue
            try:
                self._merge([name], safe_merge)
            except NotMergeableError as error:
                kept[name] = str(error)
        return {n: kept[n] for n in names if n in kept}

    def _merge(self, names: list[str], safe_merge: bool) -> None:
        self._warn_if_tied(names)
        layers = [h for h in self._holders() if isinstance(h, TunedLayer)]
        # unmerging inf/nan cannot give the old weights back (inf - inf = nan), so safe_merge keeps a copy
        saved = []
        if safe_merge:
            saved = [(p, p.detach().clone()) for layer in layers for p in layer.base_layer.parameters()]
        try:
            for layer in layers:
                layer.merge(names)
        except Exception:  # one adapter that cannot merge leaves no layer merged
            for layer in layers:
                layer.unmerge(names)
            raise
        if safe_merge and not all(torch.isfinite(p).all() for p, _ in saved):
            for layer in layers:
                layer.unmerge(names)
            with torch.no_grad():
                for param, before in saved:
                    param.copy_(before)
            raise ValueError(f"Merging {names} produced non-finite weights; the adapters were left unmerged.")

    def _warn_if_tied(self, names: list[str]) -> None:
        """Merging into a weight that another module shares (tied embeddings) changes that module too."""
        model = self.get_base_model()
        owners: dict[int, list[str]] = {}
        for param_name, param in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(param_name)
        for layer_name, layer in model.named_modules():
            if isinstance(layer, TunedLayer) and any(n in layer.adapters for n in names):
                for param in layer.base_layer.parameters():
                    shared = [o for o in owners[id(param)] if not o.startswith(layer_name + ".")]
                    if shared:
                        warnings.warn(
                            f"Merging {names} into {layer_name!r} also changes {shared}, which share "
                            "its weights (tied embeddings), so the merged model differs from the adapted one "
                            "there. Untie the weights before merging, or keep the adapter unmerged.",
                            stacklevel=3,
                        )

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add `adapter_name`, an inactive adapter combined from `adapters` with `weights` (negative weights
        subtract a task); `peftkit.merging` has the combination types and their equations. The result is an
        ordinary adapter: `set_adapter` it, save it, merge it."""
        names = list(adapters)
        self._check_names(names)
        if not names or len(weights) != len(names):
            raise ValueError(
                f"add_weighted_adapter needs one weight per adapter; got {len(names)} adapters and "
                f"{len(weights)} weights."
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another adapter_name.")
        plan = WeightedMerge(
            "linear" if len(names) == 1 else combination_type,
            density,
            majority_sign_method,
            svd_rank,
            svd_clamp,
            svd_full_matrices,
            svd_driver,
        )
        configs = [self.peft_config[n] for n in names]
        if len({c.peft_type for c in configs}) > 1:
            raise ValueError(
                f"add_weighted_adapter combines adapters of one method; {names} are "
                f"{[c.peft_type for c in configs]}."
            )
        heads = [
            path
            for path, holder in holders_in(self.get_base_model())
            if isinstance(holder, ModulesToSave) and sum(n in holder.adapter_names() for n in names) > 1
        ]
        if heads:
            raise ValueError(
                f"{names} each train their own copy of {heads} (modules_to_save, e.g. a classification "
                "head), which add_weighted_adapter cannot combine; combine adapters that leave them alone."
            )
        config = method_for(configs[0]).weighted_config(configs, plan)
        self.add_adapter(adapter_name, config)
        try:
            for layer in self._holders():
                if isinstance(layer, TunedLayer) and adapter_name in layer.adapters:
                    sources = [
                        (layer.adapters[n], w)
                        for n, w in zip(names, weights, strict=True)
                        if n in layer.adapters
                    ]
                    layer.adapters[adapter_name].set_weighted(sources, plan)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for holder in self._holders():
            if isinstance(holder, TunedLayer):
                holder.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge adapters into the base weights and return the plain model, without any wrapper.

        Into a quantized (bitsandbytes) base the merge is requantized, one rounding to its 4-bit / 8-bit grid;
        with `dequantize=True` every quantized layer first becomes an nn.Linear holding its dequantized
        weight, so the merge is exact and the model returned is full precision. When several adapters are
        active and one cannot fold (see `merge_adapter`), it raises naming each and why; nothing is merged."""
        if dequantize:
            dequantize_model(self.get_base_model())
        if adapter_names is not None or len(self._active) == 1:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
            return self.unload()
        kept = self._merge_what_folds(self._active, safe_merge)
        if kept:
            folded = [n for n in self._active if n not in kept]
            for layer in self._holders():
                if isinstance(layer, TunedLayer):
                    layer.unmerge(folded)
            ways = (
                f"merge_adapter() folds {folded} and keeps the rest as adapters (same outputs); "
                f"or merge_and_unload(adapter_names={folded}) folds those alone and drops the rest"
                if folded
                else "keep the model as a PeftModel"
            )
            raise NotMergeableError(
                f"merge_and_unload cannot fold {_reasons(kept)}, and the plain model it returns would lose "
                f"them; nothing was merged. Instead: {ways}."
            )
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the plain model with every wrapper removed; unmerged adapters are dropped."""
        model = self.get_base_model()
        for name, module in reversed(holders_in(model)):  # a wrapped block's layers before the block
            if isinstance(module, TunedLayer):
                _replace_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _replace_module(model, name, module.active_module)
        return model

    # ---- counting -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ---- running ------------------------------------------------------------------------------

    def _refresh_running(self) -> None:
        """The model adapters a forward runs, with their configs, listed whenever the active set changes:
        the forward reads this list, not the active adapters' names, so that a compiled forward (whose
        guards check what it reads) keeps its graph when another adapter of the same shapes is made active."""
        active = [] if self._disabled else [n for n in self._active if n in self.model_adapters]
        self._running = [(self.model_adapters[n], self.peft_config[n]) for n in active]

    def _prepare_inputs(
        self, args: tuple, kwargs: dict[str, Any], generation: bool = False
    ) -> tuple[tuple, dict[str, Any]]:
        adapters = [(a, c) for a, c in self._running if a.rewrites_inputs]
        if not adapters:
            return args, kwargs
        if len(args) > 1:
            raise TypeError(
                "Pass inputs by keyword (input_ids=..., attention_mask=...) to a model with virtual tokens."
            )
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        for adapter, config in adapters:
            prepare = adapter.prepare_generation_inputs if generation else adapter.prepare_inputs
            kwargs = prepare(kwargs, self.get_base_model(), config.task_type)
        return (), kwargs

    def _routing(self, adapter_names: list[str] | None):
        if adapter_names is not None:
            self._check_names(list(adapter_names), allow_base=True)
            inputs_only = self._input_side(list(adapter_names))
            if inputs_only:
                raise ValueError(
                    f"adapter_names mixes adapters row by row through their layers; {inputs_only} change the "
                    "inputs instead. Run those adapters on their own batches."
                )
        return route_rows(adapter_names)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `adapter_names` gives one adapter (or "__base__") per row."""
        args, kwargs = self._prepare_inputs(args, kwargs)
        with self._routing(adapter_names):
            outputs = self.get_base_model()(*args, **kwargs)
        for adapter, _ in self._running:
            outputs = adapter.finish_outputs(outputs)
        return outputs

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's `generate`, with the active adapters (or one per row)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        args, kwargs = self._prepare_inputs(args, kwargs, generation=True)
        with self._routing(adapter_names):
            output = self.get_base_model().generate(*args, **kwargs)
        replaced_ids = input_ids is not None and "input_ids" not in kwargs and not args
        if replaced_ids and not getattr(self.get_base_model().config, "is_encoder_decoder", False):
            # Generating from embeddings returns only the new tokens; give back prompt + new tokens.
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            sequences = torch.cat([input_ids.to(sequences.device), sequences], dim=1)
            if isinstance(output, torch.Tensor):
                return sequences
            output.sequences = sequences
        return output

    # ---- files --------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors ("default" at the top level,
        others in a sub-folder named after them), the layout Hugging Face peft uses; several adapters also get
        an adapter_composition.json (their order and active set) for `from_composition`. In distributed runs
        pass `is_main_process=False` on every rank but one: those write nothing. Nothing is written outside
        `save_directory`: every adapter name is checked (`check_adapter_name`) before any file is written,
        and a sub-folder that is a symbolic link leading out of it is refused."""
        if not is_main_process:
            return
        if not safe_serialization:
            raise ValueError("peftkit writes safetensors only; drop safe_serialization=False.")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(
                f"save_pretrained needs a directory (str or os.PathLike); got {save_directory!r}."
            )
        if not os.fspath(save_directory):
            raise ValueError("save_pretrained needs a directory; got '' (use '.' for the current one).")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a directory.")
        names = list(selected_adapters or self.peft_config)
        self._check_names(names)
        for name in names:
            check_adapter_name(name)
            target = outside(save_directory, adapter_directory(save_directory, name))
            if target:
                raise ValueError(
                    f"save_pretrained({os.fspath(save_directory)!r}) would write adapter {name!r} to "
                    f"{target!r}: its sub-folder is a symbolic link leading outside the directory. Remove "
                    "the link, or save to another directory."
                )
        for name in names:
            save_adapter(self, name, adapter_directory(save_directory, name))
        if len(names) > 1:
            Composition(tuple(names), tuple(n for n in self._active if n in names)).write(save_directory)

    def load_adapter(
        self,
        model_id: str,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add an adapter saved by `save_pretrained` (peftkit or Hugging Face peft) under `adapter_name`.

        Every file is checked before the model changes; a file that does not fit leaves no part of the
        adapter behind."""
        self._check_new_name(adapter_name)
        config, weights, source = _read_adapter(model_id, subfolder, None, is_trainable, allow_pickle)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            load_adapter_weights(self, adapter_name, weights, source)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> PeftModel:
        """Wrap `model` with the adapter saved in the folder `model_id` (or its `subfolder`); never downloads.

        Loaded for inference (frozen) unless `is_trainable`; pickled weights only with `allow_pickle`. A
        refused load (see `serialization.read_weights` for what is refused) leaves `model` as it was."""
        check_adapter_name(adapter_name)
        config, weights, source = _read_adapter(model_id, subfolder, config, is_trainable, allow_pickle)
        model_class = cls
        if cls is PeftModel:
            model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        with _restored_on_failure(model):
            peft_model = model_class(
                model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
            )
            try:
                load_adapter_weights(peft_model, adapter_name, weights, source)
            except Exception:
                peft_model.delete_adapter(adapter_name)
                raise
        return peft_model

    @classmethod
    def from_composition(
        cls,
        model: nn.Module,
        model_id: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> PeftModel:
        """Wrap `model` with every adapter `save_pretrained` wrote into the folder `model_id`, in their order,
        with the adapters that were active then active again: the model computes what it did when saved.
        Adapter names read from adapter_composition.json are checked as `add_adapter` checks them; a refused
        load leaves `model` as it was."""
        check_folder(model_id)
        if os.path.isfile(os.path.join(model_id, CONFIG_NAME)) and not os.path.isfile(
            os.path.join(model_id, COMPOSITION_NAME)
        ):  # one adapter, saved at the top level
            composition = Composition((TOP_LEVEL_ADAPTER,), (TOP_LEVEL_ADAPTER,))
        else:
            composition = Composition.read(model_id)
        first, *others = composition.adapters
        with _restored_on_failure(model):
            loaded = cls.from_pretrained(
                model,
                adapter_directory(model_id, first),
                adapter_name=first,
                is_trainable=is_trainable,
                allow_pickle=allow_pickle,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            try:
                for name in others:
                    loaded.load_adapter(
                        adapter_directory(model_id, name),
                        name,
                        is_trainable=is_trainable,
                        allow_pickle=allow_pickle,
                        autocast_adapter_dtype=autocast_adapter_dtype,
                    )
                loaded.set_adapter(list(composition.active) or [first])
            except Exception:
                for name in reversed(list(loaded.peft_config)):
                    loaded.delete_adapter(name)
                raise
        return loaded


def _call_each(functions: list, *args: Any, **kwargs: Any) -> list:
    """An operation that several active adapters export, run on each in order: their results."""
    return [function(*args, **kwargs) for function in functions]


def _reasons(kept: dict[str, str]) -> str:
    return "; ".join(f"{name!r} ({reason})" for name, reason in kept.items())


def _read_adapter(
    model_id: str, subfolder: str | None, config: PeftConfig | None, is_trainable: bool, allow_pickle: bool
) -> tuple[PeftConfig, dict[str, torch.Tensor], str]:
    """The config (marked trainable or not), weights and weights file of a saved adapter."""
    directory = os.path.join(model_id, subfolder) if subfolder else model_id
    config = dataclasses.replace(config or load_config(directory), inference_mode=not is_trainable)
    weights = read_weights(directory, allow_pickle=allow_pickle)
    return config, weights, weights_file(directory, allow_pickle)


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module) -> Iterator[None]:
    """If the block raises, every parameter of `model` trains again as it did before (wrapping froze it)."""
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    except BaseException:
        for param, flag in trainable:
            param.requires_grad_(flag)
        raise


def _placement(base_layer: nn.Module, autocast_adapter_dtype: bool) -> dict[str, Any]:
    """Device and dtype for a new adapter: the base layer's, but float32 over a half-precision base."""
    tensor = next(iter(base_layer.parameters()), None)
    if tensor is None:
        return {}
    half = tensor.dtype in (torch.float16, torch.bfloat16)
    if not tensor.is_floating_point() or (half and autocast_adapter_dtype):
        return {"device": tensor.device}
    return {"device": tensor.device, "dtype": tensor.dtype}


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (`generate` included)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (T5, BART)."""


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification: the classification head is trained in full and saved with the adapter."""

    task_heads = ["classifier", "score"]


class PeftModelForTokenClassification(PeftModel):
    """Token classification: the classification head is trained in full and saved with the adapter."""

    task_heads = ["classifier", "score"]


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering: the span head is trained in full and saved with the adapter."""

    task_heads = ["qa_outputs"]


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter; the `PeftModel` subclass follows `peft_config.task_type`.

    `mixed` is accepted for Hugging Face peft's signature: every peftkit model can mix methods."""
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return model_class(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default"
) -> nn.Module:
    """Put an adapter's layers into `model` in place, for libraries that manage the model themselves.

    The adapter is active and trainable. Methods with a model-level part (virtual tokens, loss terms,
    model-wide steps) need the `PeftModel` wrapper."""
    peft_model = PeftModel(model, peft_config, adapter_name)
    if peft_model.model_adapters:
        peft_model.delete_adapter(adapter_name)
        raise ValueError(
            f"{peft_config.peft_type} has a model-level part (inputs, loss terms or model-wide steps) that "
            "only a PeftModel runs; use get_peft_model instead."
        )
    return model
