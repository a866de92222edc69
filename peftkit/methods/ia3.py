"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale activations.

Attention targets (keys, values):  h = l ⊙ (W x + b),   l ∈ R^out  (the bias is rescaled too, as in peft)
Feed-forward targets:              h = W (l ⊙ x) + b,   l ∈ R^in   (the base layer runs on l ⊙ x)

l starts at ones, so the adapted model starts as the base model. Both forms fold into the weights:
W ← diag(l) W and b ← l ⊙ b for the first, W ← W diag(l) for the second; unmerging divides l back out.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import BOOLEAN, MODULE_NAMES, TARGET_MODULES, Domain, optional
from ..layer import LayerAdapter
from ..merging import WeightedMerge
from ..registry import Method, register_method
from ..targeting import is_linear, model_type, name_matches, target_union

# Hugging Face peft's defaults for configs without target_modules, by transformers `model_type`: the
# targets, and which of them are feed-forward layers.
DEFAULT_TARGETS = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn", "mlp.c_proj"]),
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    **dict.fromkeys(["bert", "roberta"], ["key", "value", "output.dense"]),
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    **dict.fromkeys(["bart", "phi"], ["q_proj", "v_proj", "fc2"]),
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    **dict.fromkeys(
        ["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], ["query_key_value", "dense_4h_to_h"]
    ),
    **dict.fromkeys(["llama", "mistral"], ["k_proj", "v_proj", "down_proj"]),
    "mixtral": ["k_proj", "v_proj", "w2"],
    **dict.fromkeys(
        ["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["q_proj", "v_proj", "down_proj"]
    ),
}
DEFAULT_FEEDFORWARD = {
    "t5": ["wo"],
    "mt5": [],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["mlp.c_proj"]),
    "bloom": ["mlp.dense_4h_to_h"],
    **dict.fromkeys(["bert", "roberta", "deberta-v2", "deberta"], ["output.dense"]),
    **dict.fromkeys(["opt", "bart", "phi"], ["fc2"]),
    "gptj": ["fc_out"],
    "gpt_neo": ["c_proj"],
    **dict.fromkeys(["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], ["dense_4h_to_h"]),
    **dict.fromkeys(
        ["llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["down_proj"]
    ),
    "mixtral": ["w2"],
}


def _as_list(value: list[str] | str | set | tuple | None) -> list[str] | str | None:
    return sorted(value) if isinstance(value, (set, tuple)) else value


@method_config
class IA3Config(PeftConfig):
    """Learned rescaling vectors. Field names and defaults are Hugging Face peft's.

    `feedforward_modules` (a subset of `target_modules`) are the targets whose input is rescaled; the other
    targets have their output rescaled. With neither given, both come from the model type, as in peft.
    `fan_in_fan_out` is kept for peft's files: the layout follows the layer (transformers' Conv1D stores its
    weight as (in, out)), as peft ends up doing after correcting the flag."""

    peft_type: ClassVar[str] = "IA3"
    default_learning_rate: ClassVar[float] = 3e-3
    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        "target_modules": optional(TARGET_MODULES),
        "exclude_modules": optional(MODULE_NAMES),
        "feedforward_modules": optional(MODULE_NAMES),
        "fan_in_fan_out": BOOLEAN,
        "init_ia3_weights": BOOLEAN,
    }

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.feedforward_modules = _as_list(self.feedforward_modules)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:
                raise ValueError(
                    f"IA3Config: feedforward_modules {stray} are not in target_modules "
                    f"{self.target_modules}; a feed-forward module must also be a target, so list it in both."
                )


class IA3Layer(LayerAdapter):
    """The vector l, in Hugging Face peft's shape, rescaling a layer's output or (feed-forward) its input.

    Subclasses say how l broadcasts over the layer's activations (`along_features`) and weight
    (`along_weight`)."""

    def __init__(self, shape: tuple[int, ...], feedforward: bool, init_ones: bool) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(shape) if init_ones else torch.randn(shape))
        self.feedforward = feedforward
        self.transforms_input = feedforward  # per instance: one method, both kinds of layer

    def along_features(self) -> torch.Tensor:
        raise NotImplementedError

    def set_weighted(self, sources: list[tuple[LayerAdapter, float]], plan: WeightedMerge) -> None:
        """l = Σ_t w_t l_t (Hugging Face peft's weighted IA3 adapter; weights that sum to 1 average them)."""
        kinds = {(tuple(s.ia3_l.shape), s.feedforward) for s, _ in sources}
        if kinds - {(tuple(self.ia3_l.shape), self.feedforward)}:
            raise ValueError(
                "IA3 adapters that rescale one layer's input in one adapter and its output in another "
                "(feedforward_modules differ) cannot be combined; give them the same feedforward_modules."
            )
        with torch.no_grad():
            self.ia3_l.zero_()
            for source, weight in sources:
                self.ia3_l.add_(source.ia3_l, alpha=weight)

    def along_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward: l ⊙ x, on which the base layer then computes W (l ⊙ x) + b."""
        return (x.to(self.ia3_l.dtype) * self.along_features()).to(x.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.feedforward:
            return base_out  # W (l ⊙ x) + b: the input was rescaled before the base layer ran
        return (base_out.to(self.ia3_l.dtype) * self.along_features()).to(base_out.dtype)  # l ⊙ (W x + b)

    def merge(self, base_layer: nn.Module) -> None:
        with torch.no_grad():
            base_layer.weight.copy_(base_layer.weight * self.along_weight(base_layer))
            if not self.feedforward and base_layer.bias is not None:
                base_layer.bias.copy_(base_layer.bias * self.ia3_l.flatten())

    def unmerge(self, base_layer: nn.Module) -> None:
        if (self.ia3_l == 0).any():
            raise ValueError(
                f"This IA3 vector has zero entries, so merging it erased the {type(base_layer).__name__} "
                "weights they scale and unmerging cannot bring them back. Reload the base model instead."
            )
        with torch.no_grad():
            base_layer.weight.copy_(base_layer.weight / self.along_weight(base_layer))
            if not self.feedforward and base_layer.bias is not None:
                base_layer.bias.copy_(base_layer.bias / self.ia3_l.flatten())


class IA3Linear(IA3Layer):
    """nn.Linear and transformers' Conv1D: l is (out, 1), or (1, in) on a feed-forward layer."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, init_ones: bool) -> None:
        transposed = type(base_layer).__name__ == "Conv1D"  # its weight is stored (in, out)
        out_features, in_features = (base_layer.weight.T if transposed else base_layer.weight).shape
        super().__init__((1, in_features) if feedforward else (out_features, 1), feedforward, init_ones)
        self.transposed = transposed

    def along_features(self) -> torch.Tensor:
        return self.ia3_l.flatten()  # activations carry their features last

    def along_weight(self, base_layer: nn.Module) -> torch.Tensor:
        # on an (out, in) weight, (out, 1) scales the rows and (1, in) the columns
        return self.ia3_l.T if self.transposed else self.ia3_l


class IA3Conv(IA3Layer):
    """nn.Conv2d and nn.Conv3d: l is (1, channels, 1, ...), output channels or (feed-forward) input ones."""

    def __init__(self, base_layer: nn.Conv2d | nn.Conv3d, feedforward: bool, init_ones: bool) -> None:
        channels = base_layer.in_channels if feedforward else base_layer.out_channels
        kernel_dims = base_layer.weight.dim() - 2
        super().__init__((1, channels) + (1,) * kernel_dims, feedforward, init_ones)

    def along_features(self) -> torch.Tensor:
        return self.ia3_l  # activations are (batch, channels, *spatial)

    def along_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """l laid out over the kernel (out, in/groups, *k): per output filter, or per input channel, which a
        grouped convolution sees only in its own group's filters."""
        if not self.feedforward:
            return self.ia3_l.transpose(0, 1)
        groups, kernel = base_layer.groups, self.ia3_l.shape[2:]
        per_group_in = base_layer.in_channels // groups
        per_group_out = base_layer.out_channels // groups
        scale = self.ia3_l.reshape(groups, 1, per_group_in, *kernel)
        return scale.expand(groups, per_group_out, per_group_in, *kernel).reshape(-1, per_group_in, *kernel)


@register_method
class IA3(Method):
    config_class = IA3Config
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, (nn.Conv2d, nn.Conv3d))

    def resolve_config(self, model: nn.Module, config: IA3Config) -> IA3Config:
        """Hugging Face peft's defaults for the architecture: the targets, and which are feed-forward."""
        kind = model_type(model)
        if config.target_modules is None:
            config.target_modules = DEFAULT_TARGETS.get(kind)
        if config.target_modules is not None and config.feedforward_modules is None:
            if kind not in DEFAULT_FEEDFORWARD:
                raise ValueError(
                    "IA3Config: say which targets are feed-forward layers (their input is rescaled, the "
                    "others' output), e.g. feedforward_modules=['down_proj'], or [] for none; there is no "
                    f"default for {type(model).__name__} (model_type {kind!r})."
                )
            config.feedforward_modules = DEFAULT_FEEDFORWARD[kind]
        return config

    def weighted_config(self, configs: list[IA3Config], plan: WeightedMerge) -> IA3Config:
        """The union of the targets and of the feed-forward modules; the vectors combine linearly."""
        if plan.base_type != "linear" or plan.combination_type == "cat":
            raise ValueError(
                f"IA3 adapters combine as l = Σ w_t l_t only; combination_type={plan.combination_type!r} "
                "does not apply to them. Use combination_type='linear'."
            )
        return dataclasses.replace(
            configs[0],
            target_modules=target_union([c.target_modules for c in configs]),
            feedforward_modules=target_union([c.feedforward_modules for c in configs], "feedforward_modules"),
            init_ia3_weights=True,
        )

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: IA3Config) -> LayerAdapter:
        feedforward = name_matches(config.feedforward_modules, module_name)
        kind = IA3Linear if is_linear(base_layer) else IA3Conv
        return kind(base_layer, feedforward, config.init_ia3_weights)
