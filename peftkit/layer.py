"""The wrappers the core puts into a model, and the protocol a method's modules follow.

* `TunedLayer` wraps one target layer as `base_layer` and holds, per adapter name, the `LayerAdapter`
  a method made for it. Its forward is `out = base_layer(x)`, then each active adapter in turn:
  `out = adapter(x, out, base_layer)`.
* `ModulesToSave` wraps a module that is trained in full (a classification head) with one copy per adapter.
* `ModelAdapter` is the protocol for a method's model-level part: virtual tokens that rewrite the inputs,
  a loss term added to the outputs, or model-wide operations (rank allocation) exposed on `PeftModel`.

Mixed batches (one adapter per row) are routed here, in one place, for every wrapper: each adapter runs
on its own rows, or a layer's adapters of one class run together through that class's `forward_mixed`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import nn

from .merging import WeightedMerge

BASE_ROW = "__base__"


class NotMergeableError(TypeError):
    """Raised when an adapter's change cannot be folded into the base weights."""


class SavedState:
    """How an adapter module is written to and read from the adapter file (mixed into both protocols).

    The defaults write the module's state_dict and read it back strictly. A method that stores its
    weights differently on disk (sparse, resized) overrides both."""

    def saved_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict(keep_vars=True))

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy `tensors` (keys relative to this module) in, or raise naming what does not fit."""
        copy_strict(self.state_dict(keep_vars=True), tensors, where)

    def swapped_in(
        self, tensors: dict[str, torch.Tensor], config: Any, module_name: str, where: str
    ) -> dict[str, torch.Tensor]:
        """Another adapter's saved tensors (keys relative to this module; `config` is that adapter's) as
        `load_saved` must get them to make this module compute that adapter in place of its own, with every
        tensor keeping its shape (`hotswap_adapter`). By default they are taken as they are; a method whose
        tensors may be smaller (LoRA's rank) or hold what this module keeps as a constant (LoRA's scale)
        converts them."""
        return tensors


def copy_strict(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy every tensor into its target after checking that names and shapes match exactly.

    `where` reads "Adapter 'x': <prefix>", so that `where + key` names a tensor as it is on disk."""
    check_fits(targets, tensors, where)
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(dtype=targets[key].dtype, device=targets[key].device))


def check_fits(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise naming what differs unless `tensors` has exactly the keys and shapes of `targets`."""
    missing, unknown = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unknown:
        adapter, _, prefix = where.partition(": ")
        problems = []
        if missing:
            problems.append(
                f"the file lacks {len(missing)} weights it needs (e.g. {[prefix + k for k in missing[:3]]})"
            )
        if unknown:
            problems.append(
                f"the file has {len(unknown)} it does not use (e.g. {[prefix + k for k in unknown[:3]]})"
            )
        raise ValueError(
            f"{adapter} does not fit this model: {'; '.join(problems)}. Load it onto the base model it was "
            "trained on, with the adapter_config.json saved beside it."
        )
    for key, value in tensors.items():
        if targets[key].shape != value.shape:
            raise ValueError(
                f"{where}{key} has shape {tuple(value.shape)} in the file but {tuple(targets[key].shape)} in "
                "the model. The config (rank, number of virtual tokens, ...) or the base model differs from "
                "the one the adapter was saved with."
            )


class LayerAdapter(SavedState, nn.Module):
    """One adapter's change to one layer. Subclasses write the method's equation in `forward`.

    A method that scales or shifts the layer's *input* (IA3 on feed-forward layers) sets
    `transforms_input` and implements `transform_input`; the base layer then runs on the result.
    """

    transforms_input: ClassVar[bool] = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, base_layer: nn.Module) -> None:
        """Fold this adapter into `base_layer`'s weights so that `base_layer(x)` alone gives `forward`."""
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self, base_layer: nn.Module) -> None:
        """Undo `merge`."""
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged.")

    def set_weighted(self, sources: list[tuple[LayerAdapter, float]], plan: WeightedMerge) -> None:
        """Become the weighted combination (`plan`) of these adapters of the same
        layer, each with its weight; an empty list leaves this adapter computing nothing."""
        raise NotMergeableError(f"{type(self).__name__} cannot be combined with other adapters.")

    @classmethod
    def forward_mixed(
        cls,
        adapters: list[LayerAdapter],
        row_index: list[int],
        x: torch.Tensor,
        base_out: torch.Tensor,
        base_layer: nn.Module,
    ) -> torch.Tensor | None:
        """Optional: `forward` for a batch whose rows use different adapters of this class, in one go.

        Row i uses `adapters[row_index[i]]`, or none where `row_index[i]` is -1 (its output stays
        `base_out[i]`). The result must equal running `forward` on each adapter's rows. Return None to
        have the core do exactly that, one adapter at a time (the default). A subclass that overrides
        `forward` is given the loop until it overrides this too. `row_index` is a Python list, so that
        picking each row's weights needs no index kernel and no device sync."""
        return None

    def forward_with_base(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """Optional: `forward(x, base_layer(x), base_layer)` computed together with the base layer, for the
        layer's only active adapter, when that is faster (one backward for both, say). Return None to have
        the core call the base layer first (the default). Same subclass rule as `forward_mixed`."""
        return None


class ModelAdapter(SavedState, nn.Module):
    """A method's model-level part; every hook is optional.

    * `rewrites_inputs` + `prepare_inputs`: change the forward's keyword arguments (virtual tokens);
      `prepare_generation_inputs` does it for `generate`. When generation ran from `inputs_embeds` of a
      decoder-only model, the core prepends the original `input_ids` to the output.
    * `finish_outputs`: change the model's outputs, e.g. add a regulariser to `outputs.loss` in training.
    * `exports`: names of methods that `PeftModel` exposes while the adapter is active
      (`model.update_and_allocate(step)` calls this module's `update_and_allocate`; with several active
      adapters exporting it, each one's in turn, returning the list of their results).
    * `layer_adapters`: set by the core after injection, module name -> this adapter's `LayerAdapter`s.
    * `training_state` / `load_training_state`: tensors besides parameters that training carries from step
      to step (running statistics); checkpoints keep them so that a resumed run continues exactly.
    * `sole_owner_of`: an input this adapter fills alone (prefix tuning: the attention cache), so that two
      such adapters are refused when they are made active together, not at the first forward.
    """

    rewrites_inputs: ClassVar[bool] = False
    sole_owner_of: ClassVar[str | None] = None
    exports: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.layer_adapters: dict[str, LayerAdapter] = {}

    def prepare_inputs(self, inputs: dict[str, Any], model: nn.Module, task_type: Any) -> dict[str, Any]:
        return inputs

    def prepare_generation_inputs(
        self, inputs: dict[str, Any], model: nn.Module, task_type: Any
    ) -> dict[str, Any]:
        """The keyword arguments for `generate`; by default the same rewrite as for a forward."""
        return self.prepare_inputs(inputs, model, task_type)

    def finish_outputs(self, outputs: Any) -> Any:
        return outputs

    def training_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no training state; got {sorted(tensors)[:5]}.")


# ---- mixed batches ---------------------------------------------------------------------------------


class RowRouting:
    """Which adapter each row of a batch uses; rows named `__base__` get the base model alone."""

    def __init__(self, adapter_names: list[str]):
        self.names = list(adapter_names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
        self._row_index: dict[tuple[int, tuple[str, ...]], list[int]] = {}

    def row_names(self, batch_size: int) -> list[str]:
        """The adapter name of each row; a batch k times longer (beam search) repeats each name k times."""
        if batch_size % len(self.names):
            raise ValueError(
                f"adapter_names has {len(self.names)} entries but the batch has {batch_size} rows; "
                "give one adapter name per row."
            )
        return [name for name in self.names for _ in range(batch_size // len(self.names))]

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, its row indices), in the order the names first appear; base rows left out."""
        key = (batch_size, device)
        if key not in self._groups:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.row_names(batch_size)):
                rows.setdefault(name, []).append(i)
            self._groups[key] = [
                (name, torch.tensor(idx, device=device)) for name, idx in rows.items() if name != BASE_ROW
            ]
        return self._groups[key]

    def row_index(self, batch_size: int, names: tuple[str, ...]) -> list[int]:
        """For each row, the position of its adapter in `names`, or -1 where it is not there (a base row,
        or an adapter that this layer lacks)."""
        key = (batch_size, names)
        if key not in self._row_index:
            position = {name: i for i, name in enumerate(names)}
            self._row_index[key] = [position.get(name, -1) for name in self.row_names(batch_size)]
        return self._row_index[key]


_ROUTING: ContextVar[RowRouting | None] = ContextVar("peftkit_row_routing", default=None)


class RoutingSlot:
    """The routing where torch.compile traces: dynamo cannot read a ContextVar, so `route_rows` also keeps
    it here, a plain attribute the compiler follows (shared by all threads, unlike the ContextVar)."""

    routing: RowRouting | None = None


_TRACED_ROUTING = RoutingSlot()


def current_routing() -> RowRouting | None:
    """The routing of the forward in progress: the ContextVar's (each thread and task its own) in eager
    mode, the slot's where the compiler traces."""
    if torch.compiler.is_compiling():
        return _TRACED_ROUTING.routing
    return _ROUTING.get()


@contextlib.contextmanager
def route_rows(adapter_names: list[str] | None):
    """Within this context every wrapper sends each batch row through the adapter named for it."""
    if adapter_names is None:
        yield
        return
    routing, previous = RowRouting(adapter_names), _TRACED_ROUTING.routing
    token = None if torch.compiler.is_compiling() else _ROUTING.set(routing)
    _TRACED_ROUTING.routing = routing
    try:
        yield
    finally:
        _TRACED_ROUTING.routing = previous
        if token is not None:
            _ROUTING.reset(token)


def is_adapter_parameter(name: str) -> bool:
    """Whether a name from `model.named_parameters()` belongs to a wrapper, not to the base model."""
    return any(mark in name for mark in (".adapters.", ".modules_to_save.", ".original_module."))


def alternative_form(kind: type[LayerAdapter], hook: str) -> Callable[..., torch.Tensor | None] | None:
    """`kind`'s `hook` (`forward_mixed`, `forward_with_base`): another way to compute its `forward`; None
    where a subclass overrode `forward` below the hook's definition (it would compute the parent's math)."""
    for klass in kind.__mro__:
        if hook in vars(klass):
            return getattr(kind, hook)
        if "forward" in vars(klass):
            return None
    return None


# ---- wrappers ----------------------------------------------------------------------------------------


class AdapterHolder(nn.Module):
    """What the two wrappers share: active adapters, the disabled switch, attribute pass-through."""

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def wrapped(self) -> nn.Module:
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def __getattr__(self, name: str) -> Any:
        # Code that reads `layer.weight`, `layer.in_features`, ... keeps working on the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "_parameters", "_buffers", "base_layer", "original_module"):
                raise
            return getattr(self.wrapped, name)


class TunedLayer(AdapterHolder):
    """A target layer plus the adapters of any number of methods: out = adapter_k(…adapter_1(x, base(x))…)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.training = self.adapters.training = base_layer.training
        self.merged_adapters: list[str] = []
        self._live: list[LayerAdapter] = []
        self._input_live: list[LayerAdapter] = []
        self._with_base: Callable[[torch.Tensor, nn.Module], torch.Tensor | None] | None = None

    @property
    def wrapped(self) -> nn.Module:
        return self.base_layer

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def _refresh(self) -> None:
        self._live = [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]
        self._input_live = [a for a in self._live if a.transforms_input]
        only = self._live[0] if len(self._live) == 1 and not self._input_live else None
        fused = only is not None and alternative_form(type(only), "forward_with_base") is not None
        self._with_base = only.forward_with_base if fused else None

    def set_active(self, names: list[str]) -> None:
        super().set_active(names)
        self._refresh()

    def add(self, name: str, adapter: LayerAdapter) -> None:
        self.adapters[name] = adapter
        self._refresh()

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._refresh()

    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.adapters and name not in self.merged_adapters:
                self.adapters[name].merge(self.base_layer)
                self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged_adapters)):
            if names is None or name in names:
                self.adapters[name].unmerge(self.base_layer)
                self.merged_adapters.remove(name)
        self._refresh()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        routing = current_routing()
        if routing is not None:
            return self._forward_rows(routing, x, *args, **kwargs)
        if self._with_base and not args and not kwargs:
            out = self._with_base(x, self.base_layer)
            if out is not None:
                return out
        base_in = x
        for adapter in self._input_live:
            base_in = adapter.transform_input(base_in)
        out = self.base_layer(base_in, *args, **kwargs)
        for adapter in self._live:
            out = adapter(x, out, self.base_layer)
        return out

    def _forward_rows(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row through the adapter named for it: one base call on the whole batch."""
        if self.merged_adapters:
            raise ValueError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        adapters = self.adapters
        groups = [(n, adapters[n], rows) for n, rows in routing.groups(x.shape[0], x.device) if n in adapters]
        base_in = x
        for _, adapter, rows in groups:
            if adapter.transforms_input:
                base_in = base_in.index_copy(0, rows, adapter.transform_input(x.index_select(0, rows)))
        out = self.base_layer(base_in, *args, **kwargs)
        mixed = self._forward_mixed(routing, groups, x, out)
        if mixed is not None:
            return mixed
        for _, adapter, rows in groups:
            rows_out = adapter(x.index_select(0, rows), out.index_select(0, rows), self.base_layer)
            out = out.index_copy(0, rows, rows_out)
        return out

    def _forward_mixed(
        self,
        routing: RowRouting,
        groups: list[tuple[str, LayerAdapter, torch.Tensor]],
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor | None:
        """All rows in one call of `forward_mixed`, where the adapters share a class that has one."""
        kinds = {type(adapter) for _, adapter, _ in groups}
        if (
            len(kinds) != 1
            or (kind := kinds.pop()).transforms_input
            or (forward_mixed := alternative_form(kind, "forward_mixed")) is None
        ):
            return None
        row_index = routing.row_index(x.shape[0], tuple(name for name, _, _ in groups))
        return forward_mixed([adapter for _, adapter, _ in groups], row_index, x, out, self.base_layer)


def unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module of `model` in module order, named as in the unwrapped model: a
    TunedLayer, then its base under the same name (a wrapped block's layers keep their names inside it, so
    `mlp.base_layer.c_fc` is `mlp.c_fc`). Layer adapters and the insides of a ModulesToSave, which hold no
    wrappers and no targets, are not walked."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if isinstance(module, TunedLayer):
            stack.append((path, module.base_layer))
        elif not isinstance(module, ModulesToSave):
            prefix = f"{path}." if path else ""
            stack.extend(reversed([(prefix + k, c) for k, c in module._modules.items() if c is not None]))


def holders_in(model: nn.Module) -> list[tuple[str, AdapterHolder]]:
    """(name, holder) for every AdapterHolder in `model`, in module order, named as `unwrapped_modules` names
    them."""
    return [(path, m) for path, m in unwrapped_modules(model) if isinstance(m, AdapterHolder)]


class ModulesToSave(AdapterHolder):
    """A module trained in full, with one trainable copy per adapter; the original stays untouched."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.training = self.modules_to_save.training = original_module.training

    @property
    def wrapped(self) -> nn.Module:
        return self.active_module

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = current_routing()
        if routing is None or self.disabled:
            return self.active_module(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device):
            if name in self.modules_to_save:
                rows_out = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                out = out.index_copy(0, rows, rows_out)
        return out
