"""Bottleneck adapters: serial (Houlsby et al., 2019; Pfeiffer et al., 2021) and parallel (He et al., 2022).

A small two-layer network with a bottleneck of width r is added to a sub-layer's output h:

  serial:    h ← h + s·U f(D h)    the adapter reads the wrapped module's output (Houlsby; Pfeiffer)
  parallel:  h ← h + s·U f(D x)    the adapter reads the wrapped module's input x, beside it (He et al.)

D ∈ R^{r×d_in} and U ∈ R^{d_out×r} have biases; f is relu, gelu, silu (swish) or tanh; dropout acts on
f(D ·). U starts at zero, so a new adapter leaves the model's outputs exactly as they were; D has
nn.Linear's default (Kaiming-uniform) init. The non-linearity means the adapter cannot be merged into a
weight matrix.

Where the adapters go: without `target_modules`, `style` fills it with a regex naming these sites (the
union over the architectures below, whose module names do not collide); an explicit `target_modules`
overrides it.

  houlsby    after the attention sub-layer AND after the feed-forward sub-layer (Houlsby et al.)
  pfeiffer   after the feed-forward sub-layer only (Pfeiffer et al.; half the parameters)

  sub-layer            Llama / Mistral / Qwen2   GPT-2         BERT / RoBERTa / MiniLM   T5
  attention            self_attn.o_proj          attn.c_proj   attention.output.dense    SelfAttention.o
  FFN, serial          mlp.down_proj             mlp.c_proj    layer.<i>.output.dense    DenseReluDense.wo
  FFN, parallel        mlp                       mlp           layer.<i>.output.dense    DenseReluDense

Serial adapters wrap the sub-layer's output projection, so they act before the residual addition (and,
in BERT, before the residual + LayerNorm). A parallel adapter runs beside the module it wraps, reading
that module's input: for the feed-forward sub-layer peftkit wraps the whole block (LlamaMLP, GPT2MLP,
T5DenseActDense), so x is the block's input, as in He et al. Where no module holds the block alone the
parallel adapter sits beside the output projection, reading its input: the attention sub-layer
everywhere (attention modules take keyword inputs and return tuples), and BERT's feed-forward (BertOutput
also adds the residual and normalises), where x is the intermediate activation of width d_ff.
T5's decoder cross-attention gets no adapter, as in Houlsby et al.'s encoder-only setting.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import BOOLEAN, LAYER_SELECTION, Domain, integer, number, one_of
from ..layer import LayerAdapter, NotMergeableError, TunedLayer
from ..registry import Method, register_method
from ..targeting import is_linear

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}
STYLES = ["houlsby", "pfeiffer"]
# Feed-forward blocks a parallel adapter can wrap whole: their forward takes the hidden states, returns a
# tensor, and their first and last linear children give the input and output width.
FFN_BLOCKS = ("MLP", "DenseActDense", "DenseGatedActDense")
# The sites of the module docstring's table, as regexes matched at the end of a module name.
ATTENTION = [r"self_attn\.o_proj", r"attn\.c_proj", r"attention\.output\.dense", r"SelfAttention\.o"]
FFN_SERIAL = [r"mlp\.down_proj", r"mlp\.c_proj", r"layer\.\d+\.output\.dense", r"DenseReluDense\.wo"]
FFN_PARALLEL = [r"mlp", r"layer\.\d+\.output\.dense", r"DenseReluDense"]


def style_targets(style: str, parallel: bool) -> str:
    """The `target_modules` regex for a style: the feed-forward sites, and for houlsby the attention ones."""
    sites = (FFN_PARALLEL if parallel else FFN_SERIAL) + (ATTENTION if style == "houlsby" else [])
    return rf"(.*\.)?({'|'.join(sites)})"


@method_config
class AdapterConfig(PeftConfig):
    """Bottleneck adapters of width `adapter_size`, serial or `parallel`, placed by `style`.

    Hugging Face peft has no such method; peftkit writes the same file layout with peft_type "BOTTLENECK".
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    default_learning_rate: ClassVar[float] = 5e-4
    option_aliases: ClassVar[dict[str, str]] = {
        "r": "adapter_size",
        "rank": "adapter_size",
        "bottleneck_size": "adapter_size",
        "non_linearity": "adapter_act",
        "activation": "adapter_act",
        "dropout": "adapter_dropout",
        "scale": "scaling",
    }
    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        **LAYER_SELECTION,
        "adapter_size": integer(1, "the bottleneck width"),
        "adapter_act": one_of(list(ACTIVATIONS)),
        "adapter_dropout": number(at_least=0, below=1),
        "parallel": BOOLEAN,
        "scaling": number(),
        "style": one_of(STYLES),
    }

    adapter_size: int = 64
    adapter_act: str = "relu"
    adapter_dropout: float = 0.0
    parallel: bool = False
    scaling: float = 1.0
    style: str = "pfeiffer"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


BottleneckConfig = AdapterConfig


class Bottleneck(LayerAdapter):
    """U dropout(f(D v)) with D ∈ R^{r×d_in}, U ∈ R^{d_out×r}, both with biases, U = 0 at init."""

    def __init__(self, d_in: int, d_out: int, size: int, act: str, dropout: float, scaling: float) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(d_in, size)
        self.adapter_act = ACTIVATIONS[act]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_up = nn.Linear(size, d_out)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.scaling = scaling

    def bottleneck(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.adapter_dropout(self.adapter_act(self.adapter_down(v))))

    def merge(self, base_layer: nn.Module) -> None:
        raise NotMergeableError(
            "Bottleneck adapters cannot be merged into the base weights: the non-linearity f between the "
            "down- and up-projection (h + s·U f(D ·)) is not a change of a weight matrix. Keep the adapter "
            "on the model to use it, or call unload() to drop it and get the base model back."
        )


class SerialAdapter(Bottleneck):
    """h ← h + s·U f(D h): after the wrapped module, reading its output h (Houlsby et al., 2019)."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out + (self.scaling * self.bottleneck(base_out)).to(base_out.dtype)


class ParallelAdapter(Bottleneck):
    """h ← h + s·U f(D x): beside the wrapped module, reading its input x (He et al., 2022)."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out + (self.scaling * self.bottleneck(x)).to(base_out.dtype)


def _linear_children(module: nn.Module) -> list[nn.Module]:
    """A block's own linear layers in order, looking through layers another adapter already wraps."""
    children = [c.base_layer if isinstance(c, TunedLayer) else c for c in module.children()]
    return [c for c in children if is_linear(c)]


def is_ffn_block(module: nn.Module) -> bool:
    """A feed-forward block (LlamaMLP, GPT2MLP, T5DenseActDense, ...) that a parallel adapter can wrap."""
    return type(module).__name__.endswith(FFN_BLOCKS) and len(_linear_children(module)) >= 2


def features(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear layer (Conv1D stores its weight as in×out) or FFN block."""
    if is_linear(module):
        rows, cols = module.weight.shape
        return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)
    linears = _linear_children(module)
    return features(linears[0])[0], features(linears[-1])[1]


@register_method
class BottleneckMethod(Method):
    config_class = AdapterConfig
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or is_ffn_block(module)

    def resolve_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        if config.target_modules is None:  # the style's sites
            config.target_modules = style_targets(config.style, config.parallel)
        return config

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: AdapterConfig) -> LayerAdapter:
        d_in, d_out = features(base_layer)
        kind = ParallelAdapter if config.parallel else SerialAdapter
        return kind(
            d_in if config.parallel else d_out,
            d_out,
            config.adapter_size,
            config.adapter_act,
            config.adapter_dropout,
            config.scaling,
        )
