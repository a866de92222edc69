"""The method registry: how a PEFT method plugs into the core.

A method is a config class plus a `Method` subclass that says what the method adds to a model. The core
calls these hooks and nothing else; it never names a method. Each method file registers itself with
`@register_method`, and `peftkit/methods/__init__.py` imports every method file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .config import PeftConfig
    from .layer import LayerAdapter, ModelAdapter
    from .merging import WeightedMerge


class Method:
    """Hooks a method implements; the defaults add nothing.

    The three families fit through them: reparameterisation (`layer_adapter` wraps target layers),
    selection of existing parameters (`base_parameters`), and additive inputs (`model_adapter`).
    """

    config_class: type[PeftConfig]
    adapts_layers: bool = False  # True when the method puts a LayerAdapter on target layers

    def supports(self, module: nn.Module) -> bool:
        """Whether `layer_adapter` can wrap this module (used to filter and explain targeting)."""
        return False

    def resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Fill in what the config leaves to the model: targets by model type, placement, dimensions.

        `config` is already the adapter's own copy (change it in place, or return another); what this
        returns is what gets saved, so resolved values land in adapter_config.json."""
        return config

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: PeftConfig) -> LayerAdapter:
        """One adapter's change to one target layer."""
        raise NotImplementedError(f"{type(self).__name__} does not adapt layers.")

    def model_adapter(self, model: nn.Module, config: PeftConfig) -> ModelAdapter | None:
        """A model-level adapter (virtual tokens and the like), or None."""
        return None

    def base_parameters(self, model: nn.Module, config: PeftConfig, targets: list[str]) -> list[str]:
        """Names of existing base-model parameters this adapter trains in place (and saves)."""
        return []

    def weighted_config(self, configs: list[PeftConfig], plan: WeightedMerge) -> PeftConfig:
        """The config of an adapter that `add_weighted_adapter` combines from adapters with `configs`;
        each of its layer adapters is then filled in by `LayerAdapter.set_weighted`."""
        combinable = sorted(
            t for t, m in METHODS.items() if type(m).weighted_config is not Method.weighted_config
        )
        raise ValueError(
            f"{configs[0].peft_type} adapters cannot be combined by add_weighted_adapter; the methods whose "
            f"adapters combine are {combinable}."
        )

    def padded_for_hotswap(
        self, config: PeftConfig, layers: dict[str, LayerAdapter], target_rank: int
    ) -> PeftConfig | None:
        """For `prepare_model_for_compiled_hotswap`: grow these layer adapters (module name -> adapter) to
        `target_rank`, computing what they computed, and return the config that describes them now; None
        where the method's tensors have no rank to grow (their shapes follow from the model alone)."""
        return None

    def training_callbacks(self, config: PeftConfig) -> list:
        """transformers `TrainerCallback`s this method needs in training; `peftkit train` adds them."""
        return []


METHODS: dict[str, Method] = {}


def register_method(method_cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its config's `peft_type`."""
    peft_type = method_cls.config_class.peft_type
    if peft_type in METHODS:
        raise ValueError(f"peft_type {peft_type!r} is registered twice.")
    METHODS[peft_type] = method_cls()
    return method_cls


def method_for(config: PeftConfig) -> Method:
    """The registered method for a config instance."""
    return method_by_type(config.peft_type)


def method_by_type(peft_type: str) -> Method:
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ValueError(
            f"peft_type {peft_type!r} is not a method peftkit knows; known: {sorted(METHODS)}."
        ) from None
