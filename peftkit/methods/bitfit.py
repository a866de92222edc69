"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Each selected bias b gets a trainable delta Δb, so h = f(x) + Δb and the trained bias is b + Δb. Training
Δb follows the same gradients as training b in place, but the base model stays intact, so BitFit adapters
switch, disable, mix per row and merge (b ← b + Δb) like every other adapter. Only weight decay differs:
it pulls the bias towards its pretrained value instead of towards zero.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import LAYER_SELECTION, Domain
from ..layer import LayerAdapter
from ..registry import Method, register_method


@method_config
class BitFitConfig(PeftConfig):
    """Bias-only fine-tuning. `target_modules` None means every module that has a bias."""

    peft_type: ClassVar[str] = "BITFIT"
    default_learning_rate: ClassVar[float] = 1e-3
    field_domains: ClassVar[dict[str, Domain]] = {**PeftConfig.field_domains, **LAYER_SELECTION}

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None


class BiasDelta(LayerAdapter):
    """h = f(x) + Δb, Δb broadcast over the channel dimension (last, or 1 for convolutions)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros_like(base_layer.bias, dtype=torch.float32))
        self.channel_first = isinstance(base_layer, nn.modules.conv._ConvNd)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.bias_delta.to(base_out.dtype)
        if self.channel_first:
            delta = delta.view(-1, *([1] * (base_out.dim() - 2)))
        return base_out + delta

    def merge(self, base_layer: nn.Module) -> None:
        base_layer.bias.data += self.bias_delta.to(base_layer.bias.dtype)

    def unmerge(self, base_layer: nn.Module) -> None:
        base_layer.bias.data -= self.bias_delta.to(base_layer.bias.dtype)


@register_method
class BitFit(Method):
    config_class = BitFitConfig
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "bias", None), nn.Parameter)

    def resolve_config(self, model: nn.Module, config: BitFitConfig) -> BitFitConfig:
        if not any(self.supports(m) for m in model.modules()):
            raise ValueError(
                f"BitFit trains bias terms, but no module of {type(model).__name__} has a bias "
                "(its layers were built with bias=False). Use a method that adapts weights, such as LoRA."
            )
        if config.target_modules is None:  # every module with a bias
            config.target_modules = ".*"
        return config

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: BitFitConfig) -> LayerAdapter:
        return BiasDelta(base_layer)
