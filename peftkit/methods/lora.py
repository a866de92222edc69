"""LoRA and its family: rsLoRA, DoRA, and the Gaussian, PiSSA and OLoRA initialisations.

LoRA (Hu et al., 2021):     h = W x + s·B A x,   A ∈ R^{r×in}, B ∈ R^{out×r},  s = α/r  (rsLoRA: α/√r)
DoRA (Liu et al., 2024):    h = m ⊙ (W x + s·B A x) / ‖W + s·B A‖,  the column norm treated as a constant
PiSSA (Meng et al., 2024):  B A ← the top-r singular triplets of W,  W ← W − s·B A
OLoRA (Büyükakyüz, 2024):   B A ← the first r columns/rows of W's QR decomposition,  W ← W − s·B A
QLoRA (Dettmers et al., 2023): any of these on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base layer; W is read
dequantized where the math needs it (DoRA's norm, merging), and a merge requantizes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import BOOLEAN, LAYER_SELECTION, Domain, integer, number, one_of, pattern_map
from ..layer import LayerAdapter, TunedLayer, is_adapter_parameter
from ..merging import WeightedMerge, combine, svd_factors
from ..quantization import dequantized_weight, guard_cpu_packing, is_quantized_linear, replace_weight
from ..registry import Method, register_method
from ..targeting import find_targets, is_linear, model_type, pattern_value, target_union

# Hugging Face peft's defaults for configs without target_modules, by transformers `model_type`.
DEFAULT_TARGETS = {
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    **dict.fromkeys(["gpt2"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["deberta-v2"], ["query_proj", "value_proj"]),
    **dict.fromkeys(["distilbert"], ["q_lin", "v_lin"]),
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi",
            "opt",
            "bart",
            "gptj",
            "gpt_neo",
        ],
        ["q_proj", "v_proj"],
    ),
}

INITS = [True, False, "gaussian", "pissa", "olora"]
# The initialisations that take B A from the base weight's singular vectors (and divide them by the scale).
SVD_INITS = re.compile(r"pissa(_niter_\d+)?")
RANK = integer(1, "the adapter's rank")


@method_config
class LoraConfig(PeftConfig):
    """Low-rank adaptation. Field names and defaults are Hugging Face peft's."""

    peft_type: ClassVar[str] = "LORA"
    default_learning_rate: ClassVar[float] = 1e-3

    @classmethod
    def training_defaults(cls, total_steps: int) -> dict[str, Any]:
        return {"r": 8, "lora_alpha": 16}

    reference_fields: ClassVar[dict[str, Any]] = {
        **PeftConfig.reference_fields,
        **dict.fromkeys(
            [
                "alora_invocation_tokens",
                "arrow_config",
                "corda_config",
                "eva_config",
                "kasa_config",
                "layer_replication",
                "lora_ga_config",
                "megatron_config",
                "monteclora_config",
                "target_parameters",
                "trainable_token_indices",
                "use_bdlora",
                "velora_config",
            ],
        ),
        "ensure_weight_tying": False,
        "loftq_config": {},
        "lora_bias": False,
        "use_qalora": False,
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
    }
    informational_fields: ClassVar[frozenset[str]] = PeftConfig.informational_fields | {
        "megatron_core",
        "qalora_group_size",
    }
    option_aliases: ClassVar[dict[str, str]] = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        **LAYER_SELECTION,
        "r": RANK,
        "lora_alpha": number(),
        "lora_dropout": number(at_least=0, below=1),
        "fan_in_fan_out": BOOLEAN,
        "bias": one_of(["none", "all", "lora_only"]),
        "use_rslora": BOOLEAN,
        "init_lora_weights": Domain(
            f"one of {INITS} or 'pissa_niter_<n>'",
            lambda v: (
                isinstance(v, bool) or (isinstance(v, str) and (v in INITS or bool(SVD_INITS.fullmatch(v))))
            ),
            "{field}={value!r} is not available in peftkit; use {expected}.",
        ),
        "rank_pattern": pattern_map(RANK),
        "alpha_pattern": pattern_map(number()),
        "use_dora": BOOLEAN,
    }

    # A swap pads a smaller rank and folds another scale into B (LowRankUpdate.swapped_in); the initialisation
    # no longer matters once trained, unless it moved B A out of the base weight (checked below).
    swappable_fields: ClassVar[frozenset[str]] = PeftConfig.swappable_fields | {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
    }

    def hotswap_differences(self, other: PeftConfig) -> list[str]:
        differences = super().hotswap_differences(other)
        moved = [c.init_lora_weights for c in (self, other) if isinstance(c, LoraConfig) and moves_base(c)]
        if moved and self.init_lora_weights != getattr(other, "init_lora_weights", None):
            differences.append(
                f"init_lora_weights={other.init_lora_weights!r} where this adapter has "
                f"{self.init_lora_weights!r}: {moved[0]!r} changed the base weights the adapter was "
                "trained on"
            )
        return differences

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = None  # type: ignore[assignment]
    alpha_pattern: dict[str, float] = None  # type: ignore[assignment]
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        init = self.init_lora_weights
        if isinstance(init, str) and SVD_INITS.fullmatch(init):
            alphas = [
                ("lora_alpha", self.lora_alpha),
                *((f"alpha_pattern[{k!r}]", a) for k, a in self.alpha_pattern.items()),
            ]
            for where, alpha in alphas:
                if alpha <= 0:
                    raise ValueError(
                        f"LoraConfig: init_lora_weights={init!r} divides the base weight's singular values "
                        f"by the scale {where} / r, so {where} must be > 0, got {alpha!r}. Use a positive "
                        "one, or another init_lora_weights."
                    )


def moves_base(config: LoraConfig) -> bool:
    """Whether the initialisation moved B A out of the base weight (PiSSA, OLoRA), leaving a residual W."""
    init = config.init_lora_weights
    return init == "olora" or (isinstance(init, str) and bool(SVD_INITS.fullmatch(init)))


def lora_scaling(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(rank, scale) for one module, after rank_pattern / alpha_pattern."""
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


def dropout_or_identity(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def pad_rank(weight: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """A LoRA weight with zeros appended along its rank axis `dim` (0 for A, 1 for B), up to rank r."""
    missing = r - weight.shape[dim]
    if not missing:
        return weight
    return F.pad(weight, [0, 0] * (weight.dim() - 1 - dim) + [0, missing])  # F.pad lists the last axis first


def layer_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base weight in the layer's own layout; a quantized layer's dequantized (a float32 copy)."""
    return dequantized_weight(base_layer) if is_quantized_linear(base_layer) else base_layer.weight


def set_layer_weight(base_layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a new base weight (the layer's own layout): in place in the layer's dtype, or requantized into
    a quantized layer (one rounding; see peftkit/quantization.py)."""
    if is_quantized_linear(base_layer):
        replace_weight(base_layer, weight.detach())
    else:
        with torch.no_grad():  # not through .data, so that the weight's version counter sees the write
            base_layer.weight.copy_(weight)


def weight_out_in(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in): transformers' Conv1D stores it as (in, out); see `layer_weight`."""
    weight = layer_weight(base_layer)
    return weight.T if type(base_layer).__name__ == "Conv1D" else weight


def tensor_versions(*tensors: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """(storage address, version counter) of each tensor: this changes whenever a tensor's values may have.

    In-place writes bump the counter; `.to()` and `.data = ...` move the storage. Writes through `.data`
    (`w.data.copy_(...)`) bump nothing, so peftkit writes weights with `copy_` under `torch.no_grad()`."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _low_rank_backward(
    grad_rows: torch.Tensor,
    rows: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    needs: tuple[bool, bool, bool],
    base_grad_x: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(∂x, ∂A, ∂B) of s·(x Aᵀ) Bᵀ for the output gradient g, over rows of tokens, where `needs` says:
    ∂x = s·(g B) A (added into `base_grad_x` where given), ∂A = s·(g B)ᵀ x, ∂B = s·gᵀ (x Aᵀ).

    x Aᵀ is recomputed from x (which the base layer keeps anyway) instead of being kept from the forward:
    a small product again, and a (tokens, r) tensor less per layer in memory."""
    need_x, need_a, need_b = needs
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_ax = (grad_rows @ lora_b).mul_(scaling)  # s·g B, (tokens, r)
        if need_x:
            grad_x = grad_ax @ lora_a if base_grad_x is None else base_grad_x.addmm_(grad_ax, lora_a)
        if need_a:
            grad_a = grad_ax.T @ rows
    if need_b:
        grad_b = ((rows @ lora_a.T).T @ grad_rows).T.mul_(scaling)  # ((x Aᵀ)ᵀ g)ᵀ: faster than gᵀ (x Aᵀ)
    return grad_x, grad_a, grad_b


class _AddLowRankInPlace(torch.autograd.Function):
    """out ← out + s·(x Aᵀ) Bᵀ written into `out` (∂out = g; the rest in _low_rank_backward).

    Autograd's own addmm copies `out` (the size of the layer's output) before adding to it; writing into
    it saves that pass. Only for `out` that nothing else reads: the base layer's fresh output."""

    @staticmethod
    def forward(ctx, out, x, lora_a, lora_b, scaling):
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ lora_a.T, lora_b.T, alpha=scaling)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b = ctx.saved_tensors
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x, grad_a, grad_b = _low_rank_backward(
            grad_rows, rows, lora_a, lora_b, ctx.scaling, ctx.needs_input_grad[1:4]
        )
        return grad, None if grad_x is None else grad_x.view(x.shape), grad_a, grad_b, None


class _LinearPlusLowRank(torch.autograd.Function):
    """h = x Wᵀ + b + s·(x Aᵀ) Bᵀ with one backward for the base and the update: ∂x = g W + s·(g B) A,
    the second product added into the first; ∂W = gᵀ x and ∂b = Σ g where the base trains too."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        rows = x.reshape(-1, x.shape[-1])
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        out.addmm_(rows @ lora_a.T, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        return _linear_backward(ctx, grad, grad, x, weight, lora_a, lora_b)


def _linear_backward(
    ctx: Any,
    grad: torch.Tensor,
    grad_h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> tuple:
    """The gradients of the base linear layer and its low-rank update for ∂h = `grad_h`; the bias, added
    after any rescaling, takes `grad`."""
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_h.reshape(-1, grad_h.shape[-1])
    base_grad_x = grad_rows @ weight if need_x else None
    grad_x, grad_a, grad_b = _low_rank_backward(
        grad_rows, rows, lora_a, lora_b, ctx.scaling, (need_x, need_a, need_b), base_grad_x
    )
    grad_w = grad_rows.T @ rows if need_w else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias and ctx.has_bias else None
    return None if grad_x is None else grad_x.view(x.shape), grad_w, grad_bias, grad_a, grad_b, None


class _DoraLinearFunction(torch.autograd.Function):
    """DoRA on nn.Linear: h = x Wᵀ + s·(x Aᵀ) Bᵀ, out = (m/n)·h + b with n = ‖W + s·B A‖ held constant;
    backward: ∂m = Σ_tokens g·h / n, and the base's and the update's gradients for ∂h = (m/n)·g, as in
    _LinearPlusLowRank (h written in place, one ∂x accumulated)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, magnitude, norm):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ weight.T
        h.addmm_(rows @ lora_a.T, lora_b.T, alpha=scaling)
        scale = magnitude / norm
        # Rescaled in place where every m is non-zero: then Σ g·h = Σ g·(out - b) / (m/n) needs only `out`.
        # (Not where the compiler traces: the test would read a value back, and it fuses the passes itself.)
        ctx.in_place = not torch.compiler.is_compiling() and bool((magnitude != 0).all())
        if ctx.in_place:
            out = h.mul_(scale) if bias is None else h.mul_(scale).add_(bias)
            ctx.save_for_backward(x, weight, lora_a, lora_b, out, scale, magnitude, bias)
        else:
            out = h * scale if bias is None else torch.addcmul(bias, h, scale)
            ctx.save_for_backward(x, weight, lora_a, lora_b, h, scale, norm, None)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, kept, scale, divisor, bias = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_m = None
        if ctx.needs_input_grad[6]:  # Σ g·h / n, from h, or from out = (m/n)·h + b
            grad_m = torch.linalg.vecdot(grad_rows, kept, dim=0)
            if ctx.in_place and bias is not None:
                grad_m -= bias * grad_rows.sum(0)
            grad_m /= divisor
        grads = _linear_backward(ctx, grad, grad_rows * scale, x, weight, lora_a, lora_b)
        return *grads, grad_m, None


def plus_low_rank(
    out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """out + s·B A x over the last dimension of `x` and `out`; the product in the adapter's dtype.

    `out` is the base layer's output, which only the adapters read, so the sum is written into it (when it
    is a contiguous tensor of its own and of the adapter's dtype; with gradients, not where torch.compile
    traces, which cannot trace an autograd Function that writes into its input)."""
    if out.dtype != lora_B.dtype:  # a float32 adapter over a float16/bfloat16 base: add in the base's dtype
        ax = F.linear(x.reshape(-1, x.shape[-1]), lora_A)
        return out + (F.linear(ax, lora_B) * scaling).view(out.shape).to(out.dtype)
    if out.is_contiguous() and out._base is None and not torch.is_autocast_enabled(out.device.type):
        if torch.is_grad_enabled():
            if not torch.compiler.is_compiling():
                return _AddLowRankInPlace.apply(out, x, lora_A, lora_B, scaling)
        else:
            out.view(-1, out.shape[-1]).addmm_(
                F.linear(x.reshape(-1, x.shape[-1]), lora_A), lora_B.T, alpha=scaling
            )
            return out
    ax = F.linear(x.reshape(-1, x.shape[-1]), lora_A)  # A x, the batch flattened into rows
    # One kernel for the product, the scaling and the sum: addmm gives out + s·(A x) Bᵀ, row by row.
    return torch.addmm(out.reshape(-1, out.shape[-1]), ax, lora_B.T, alpha=scaling).view(out.shape)


class LowRankUpdate(LayerAdapter):
    """What every LoRA layer shares: merging adds s·B A, in the base weight's layout, to W.

    On a quantized base, merging dequantizes W, adds and requantizes, and unmerging subtracts and
    requantizes: each costs one rounding to the 4-bit (8-bit) grid, so unmerging gives W back only to
    within those roundings."""

    # Saved key of A, then of B, with the axis along which each has the rank (LoRA's layers; not AdaLoRA's).
    rank_axes: ClassVar[dict[str, int]] = {}

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices r × in and out × r, views of the parameters: the update is s·B A."""
        raise NotImplementedError

    def rank(self) -> int:
        key, axis = next(iter(self.rank_axes.items()))
        return self.get_parameter(key).shape[axis]

    def pad_rank_to(self, r: int, where: str) -> None:
        """Grow A and B to rank r with zero rows (columns): B A, and so the output, stay as they are."""
        if r < self.rank():
            raise ValueError(
                f"{where} has rank {self.rank()}, above target_rank={r}; give the largest rank of the "
                "adapters that will be swapped in, this one's included."
            )
        for key, axis in self.rank_axes.items():
            path, _, attr = key.rpartition(".")
            owner, old = self.get_submodule(path), self.get_parameter(key)
            grown = nn.Parameter(
                pad_rank(old.detach(), r, axis).contiguous(), requires_grad=old.requires_grad
            )
            setattr(owner, attr, grown)
            for size, axis_of in (
                ("out_features", 0),
                ("in_features", 1),
                ("out_channels", 0),
                ("in_channels", 1),
            ):
                if path and hasattr(owner, size):  # keep nn.Linear's / nn.Conv2d's record of its shape true
                    setattr(owner, size, grown.shape[axis_of])

    def swapped_in(
        self, tensors: dict[str, torch.Tensor], config: Any, module_name: str, where: str
    ) -> dict[str, torch.Tensor]:
        """Another LoRA's A and B at this layer's rank (zeros appended) and scale: B′ = (s_new/s)·B, so that
        s·B′A = s_new·B A with this layer's constant s."""
        if not self.rank_axes:
            return tensors
        rank, scale = lora_scaling(config, module_name)
        if rank > self.rank():
            raise ValueError(
                f"{where}: its rank here is {rank}, above the {self.rank()} this adapter holds. Call "
                f"prepare_model_for_compiled_hotswap(model, target_rank={rank}) (or the largest rank to be "
                "swapped in) after loading the first adapter and before compiling."
            )
        out = dict(tensors)
        for key, axis in self.rank_axes.items():
            if key in out and out[key].dim() > axis:
                out[key] = pad_rank(out[key], self.rank(), axis)
        b_key = list(self.rank_axes)[-1]
        if b_key in out:
            out[b_key] = out[b_key].float() * (scale / self.scaling)
        return out

    def set_weighted(self, sources: list[tuple[LayerAdapter, float]], plan: WeightedMerge) -> None:
        """The update Σ-combined from the sources' s_t·B_t A_t (Hugging Face peft's semantics):

        cat        A = [w_t s_t A_t; …], B = [B_t, …]: exact, at rank Σ r_t
        *svd       Δ = combine(s_t B_t A_t, w_t), then B A = Δ's top singular triplets at this rank
        the rest   A = combine(A_t, sign(w_t s_t)·√|w_t s_t|), B = combine(B_t, √|w_t s_t|)

        The result is divided by this adapter's own scale s, so it computes what was combined."""
        a, b = self.factors()
        with torch.no_grad():
            a.zero_()
            b.zero_()
            if not sources:
                return
            parts = [(*source.factors(), source.scaling, weight) for source, weight in sources]
            if plan.combination_type == "cat":
                new_a = torch.cat([fa * (w * s) for fa, _, s, w in parts])
                new_b = torch.cat([fb for _, fb, _, _ in parts], dim=1)
            elif plan.uses_svd:
                delta = combine(
                    [(fb.float() @ fa.float()) * s for fa, fb, s, _ in parts], [w for *_, w in parts], plan
                )
                new_b, new_a = svd_factors(delta, a.shape[0], plan)
            else:
                shapes = sorted({(tuple(fa.shape), tuple(fb.shape)) for fa, fb, _, _ in parts})
                if len(shapes) > 1:
                    raise ValueError(
                        f"combination_type={plan.combination_type!r} needs every adapter at the same rank "
                        f"in each layer; the factor shapes differ ({shapes}). Use 'cat' or an SVD type."
                    )
                roots = [math.sqrt(abs(w * s)) for _, _, s, w in parts]
                signs = [math.copysign(1.0, w * s) for _, _, s, w in parts]
                new_a = combine(
                    [fa for fa, *_ in parts], [r * g for r, g in zip(roots, signs, strict=True)], plan
                )
                new_b = combine([fb for _, fb, _, _ in parts], roots, plan)
            a[: new_a.shape[0]].copy_(new_a / self.scaling)
            b[:, : new_b.shape[1]].copy_(new_b)

    def merge(self, base_layer: nn.Module) -> None:
        weight = layer_weight(base_layer)
        set_layer_weight(base_layer, weight + self.delta_weight().to(weight.dtype))

    def unmerge(self, base_layer: nn.Module) -> None:
        weight = layer_weight(base_layer)
        set_layer_weight(base_layer, weight - self.delta_weight().to(weight.dtype))


class DoraMagnitude:
    """What every DoRA layer shares (mixed in before its LoRA class).

    m starts as ‖W + s·B A‖ (each layer says over which axes, `weight_norm`); merging writes
    (m/‖W + s·B A‖)·(W + s·B A) and keeps the norm so that unmerging can divide it back out.
    """

    def add_magnitude(self, shape: tuple[int, ...]) -> None:
        self.lora_magnitude_vector = nn.Parameter(torch.empty(shape))
        self.register_buffer("merged_norm", None, persistent=False)
        self.norm_cache: tuple[tuple, torch.Tensor] | None = None  # (what it was computed from, the norm)

    def initialise(self, init: bool | str, base_layer: nn.Module) -> None:
        super().initialise(init, base_layer)
        self.lora_magnitude_vector.data.copy_(self.weight_norm(base_layer))

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B)."""
        return self.lora_A.weight, self.lora_B.weight

    def weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """‖W + s·B A‖ (`compute_norm`). With gradients on it is computed in every forward: fused optimizers
        (`AdamW(fused=True)`, transformers' Trainer's default) write the weights without bumping their
        version counters, so nothing tells that a step has moved them. Without gradients it is kept until
        W, A or B is written (their versions change) or a forward with gradients runs, after which an
        optimizer step may follow. Where torch.compile traces it is computed every time: a compiled graph
        cannot compare storage addresses, and the norm is a small part of it."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            self.norm_cache = None
            return self.compute_norm(base_layer)
        key = tensor_versions(base_layer.weight, *self.low_rank_factors())
        if self.norm_cache is None or self.norm_cache[0] != key:
            self.norm_cache = (key, self.compute_norm(base_layer))
        return self.norm_cache[1]

    def compute_norm(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def as_weight_layout(self, scale: torch.Tensor) -> torch.Tensor:
        """m/‖·‖ shaped to broadcast over the base weight."""
        raise NotImplementedError

    def merge_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """The norm a merge writes into the weight: the one forward uses, unless a layer says otherwise."""
        return self.weight_norm(base_layer)

    def merge(self, base_layer: nn.Module) -> None:
        self.merged_norm = self.merge_norm(base_layer)
        scale = self.as_weight_layout((self.lora_magnitude_vector / self.merged_norm).detach())
        weight = layer_weight(base_layer).detach()
        set_layer_weight(base_layer, (weight + self.delta_weight().to(weight.dtype)) * scale)

    def unmerge(self, base_layer: nn.Module) -> None:
        scale = self.as_weight_layout((self.lora_magnitude_vector / self.merged_norm).detach())
        weight = layer_weight(base_layer).detach()
        set_layer_weight(base_layer, weight / scale - self.delta_weight().to(weight.dtype))
        self.merged_norm = None


class LoraLinear(LowRankUpdate):
    """h = W x + s·B A dropout(x), for nn.Linear (bitsandbytes' 4-bit and 8-bit layers too) and Conv1D."""

    rank_axes: ClassVar[dict[str, int]] = {"lora_A.weight": 0, "lora_B.weight": 1}

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):  # read the sizes, not the (possibly quantized) weight
            out_features, in_features = base_layer.out_features, base_layer.in_features
        else:
            out_features, in_features = weight_out_in(base_layer).shape
        self.lora_dropout = dropout_or_identity(dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.scaling = scaling
        self.transposed = type(base_layer).__name__ == "Conv1D"

    def initialise(self, init: bool | str, base_layer: nn.Module) -> None:
        """Set A and B for `init_lora_weights`; PiSSA and OLoRA also move B A out of the base weight."""
        if init is False:
            return  # both keep nn.Linear's random init: the adapter starts non-zero
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        if init in (True, "gaussian"):
            nn.init.zeros_(self.lora_B.weight)
            return
        r = self.lora_A.out_features
        weight = weight_out_in(base_layer).detach().float()
        if init == "olora":
            q, rr = torch.linalg.qr(weight)
            a, b = rr[:r], q[:, :r]
        else:
            if init == "pissa":
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                u, s, vh = u[:, :r], s[:r], vh[:r]
            else:
                u, s, v = torch.svd_lowrank(weight, r, niter=int(init.rsplit("_", 1)[1]))
                vh = v.T
            s = s / self.scaling
            a, b = torch.diag(s.sqrt()) @ vh, u @ torch.diag(s.sqrt())
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        residual = weight - self.scaling * b @ a
        set_layer_weight(base_layer, residual.T if self.transposed else residual)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight_a = self.lora_A.weight
        if x.dtype != weight_a.dtype:  # an adapter kept in float32 over a float16/bfloat16 base
            x = x.to(weight_a.dtype)
        return plus_low_rank(base_out, self.lora_dropout(x), weight_a, self.lora_B.weight, self.scaling)

    def forward_with_base(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """In training, a plain nn.Linear (no hooks) and its update in one autograd Function, whose backward
        adds the update's ∂x into the base's instead of summing two tensors; without dropout, where the
        base and the update read the same x. Otherwise None: the base runs first, then `forward`."""
        if not self.fusable(x, base_layer):
            return None
        weight_b = self.lora_B.weight
        return _LinearPlusLowRank.apply(
            x, base_layer.weight, base_layer.bias, self.lora_A.weight, weight_b, self.scaling
        )

    def fusable(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        """Training (gradients on) a plain nn.Linear without hooks, no dropout, one dtype throughout (no
        autocast, which would change the dtypes inside)."""
        return (
            torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and type(base_layer) is nn.Linear
            and isinstance(self.lora_dropout, nn.Identity)
            and not (base_layer._forward_hooks or base_layer._forward_pre_hooks)
            and x.dtype == base_layer.weight.dtype == self.lora_A.weight.dtype
        )

    @classmethod
    def forward_mixed(
        cls,
        adapters: list[LayerAdapter],
        row_index: list[int],
        x: torch.Tensor,
        base_out: torch.Tensor,
        base_layer: nn.Module,
    ) -> torch.Tensor | None:
        """Row i: h_i = W x_i + s_k·B_k A_k x_i with k = row_index[i], as two matmuls batched over the rows.

        Row i gets its adapter's A and B, zero-padded to the largest rank, or zeros for a base row (-1).
        Dropout in training is left to the per-adapter loop, which draws each adapter's mask as `forward`."""
        if any(d.training and isinstance(d, nn.Dropout) for d in [a.lora_dropout for a in adapters]):
            return None
        a_weights = [a.lora_A.weight for a in adapters]
        b_weights = [a.lora_B.weight for a in adapters]
        if len({w.dtype for w in a_weights + b_weights}) > 1:
            return None
        r = max(w.shape[0] for w in a_weights)
        if any(w.shape[0] != r for w in a_weights):
            a_weights = [pad_rank(w, r, 0) for w in a_weights]
            b_weights = [pad_rank(w, r, 1) for w in b_weights]
        if -1 in row_index:  # zero weights for base rows, last so that index -1 picks them
            a_weights.append(torch.zeros_like(a_weights[0]))
            b_weights.append(torch.zeros_like(b_weights[0]))
        a_rows = torch.stack([a_weights[k] for k in row_index])  # (batch, r, in)
        b_rows = torch.stack([b_weights[k] for k in row_index])  # (batch, out, r)
        x = x.to(a_rows.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
        h = torch.bmm(x, a_rows.transpose(1, 2))  # A x: (batch, tokens, r)
        scalings = {a.scaling for a in adapters}
        if len(scalings) == 1:  # one s for every row: the last matmul applies it
            s = scalings.pop()
        else:
            s, row_s = 1.0, [adapters[k].scaling if k >= 0 else 0.0 for k in row_index]
            h = h * torch.tensor(row_s, dtype=h.dtype, device=h.device).view(-1, 1, 1)
        out, b_t = base_out.reshape(*h.shape[:2], -1), b_rows.transpose(1, 2)  # (batch, tokens, out), Bᵀ
        if out.dtype != h.dtype:  # a float32 adapter over a float16/bfloat16 base: add in the base's dtype
            return (out + (torch.bmm(h, b_t) * s).to(out.dtype)).view(base_out.shape)
        if torch.is_grad_enabled():
            return torch.baddbmm(out, h, b_t, alpha=s).view(base_out.shape)  # out + s·B A x
        # Without autograd, add into the base layer's fresh output: one pass less over it.
        return out.baddbmm_(h, b_t, alpha=s).view(base_out.shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def delta_weight_oi(self) -> torch.Tensor:
        """s·B A as (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s·B A in the base weight's layout."""
        return self.delta_weight_oi().T if self.transposed else self.delta_weight_oi()


class DoraLinear(DoraMagnitude, LoraLinear):
    """h = (m/‖W + s·BA‖)·(W x + s·B A x) + b, the norm per output row, detached from the gradient."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base_layer, r, scaling, dropout)
        self.add_magnitude((self.lora_B.out_features,))
        self.base_row_norms: tuple[tuple, torch.Tensor] | None = None  # (W's version, ‖W_i‖²)

    def compute_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """‖W + s·B A‖ per row, from ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ: one pass over W (a GEMM
        with r columns) instead of writing W + s·B A and reading it again; ‖W_i‖² is kept while a frozen W
        is unchanged. Exact up to rounding unless s·B A nearly cancels W."""
        weight = weight_out_in(base_layer).detach()
        lora_a, lora_b = (t.detach().to(weight.dtype) for t in self.low_rank_factors())
        if base_layer.weight.requires_grad or torch.compiler.is_compiling():  # W may move (see weight_norm)
            self.base_row_norms = None
            row_norms = weight.square().sum(1)
        else:
            key = tensor_versions(base_layer.weight)
            if self.base_row_norms is None or self.base_row_norms[0] != key:
                self.base_row_norms = (key, weight.square().sum(1))
            row_norms = self.base_row_norms[1]
        s = self.scaling
        # B_i · (2s·W Aᵀ + s²·B A Aᵀ)_i = 2s·W_i·(B A)_i + s²·‖(B A)_i‖², the product's sum in one addmm
        terms = torch.addmm(lora_b @ (lora_a @ lora_a.T), weight, lora_a.T, beta=s * s, alpha=2 * s)
        return torch.linalg.vecdot(lora_b, terms, dim=1).add_(row_norms).clamp_min_(0).sqrt_()

    def merge_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """‖W + s·B A‖ from the sum itself: a merge rounds W + ΔW to the base's format once, so it takes the
        norm free of the expansion's rounding (they differ by about 1e-7, relatively)."""
        weight = weight_out_in(base_layer).detach()
        lora_a, lora_b = (t.detach().to(weight.dtype) for t in self.low_rank_factors())
        return torch.linalg.vector_norm(torch.addmm(weight, lora_b, lora_a, alpha=self.scaling), dim=1)

    def as_weight_layout(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.unsqueeze(0) if self.transposed else scale.unsqueeze(1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        weight_a = self.lora_A.weight
        if x.dtype != weight_a.dtype:  # an adapter kept in float32 over a float16/bfloat16 base
            x = x.to(weight_a.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm(base_layer)  # m/‖W + s·B A‖
        bias = base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity):
            plain, rest = (base_out, None) if bias is None else (base_out - bias, bias)  # W x, and b
        else:  # as peft: m/‖·‖ rescales W x' for x' = dropout(x), and the rest of base_out stays as it is
            x = self.lora_dropout(x)
            plain = F.linear(x, weight_out_in(base_layer))
            rest = base_out - plain
        h = plus_low_rank(plain, x, weight_a, self.lora_B.weight, self.scaling)  # W x + s·B A x
        out = scale * h if rest is None else torch.addcmul(rest, scale, h)  # (m/‖·‖)·h + b in one kernel
        return out.to(base_out.dtype)

    def forward_with_base(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """`forward` and the base layer in one autograd Function (_DoraLinearFunction), where LoRA's is."""
        if not self.fusable(x, base_layer):
            return None
        weight_b = self.lora_B.weight
        norm = self.weight_norm(base_layer)
        return _DoraLinearFunction.apply(
            x, base_layer.weight, base_layer.bias, self.lora_A.weight, weight_b, self.scaling,
            self.lora_magnitude_vector, norm,
        )  # fmt: skip


class LoraEmbedding(LowRankUpdate):
    """h = E[x] + s·Aᵀ[x] Bᵀ, with A ∈ R^{r×vocab} and B ∈ R^{dim×r} (B A is a low-rank table update)."""

    rank_axes: ClassVar[dict[str, int]] = {"lora_embedding_A": 0, "lora_embedding_B": 1}

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.randn(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base_layer.embedding_dim, r))
        self.scaling = scaling

    def initialise(self, init: bool | str, base_layer: nn.Module) -> None:
        if init is False:
            return
        if init not in (True, "gaussian"):
            raise ValueError(
                f"init_lora_weights={init!r} works on linear layers only, not on {type(base_layer).__name__}."
            )
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def lookup(self, x: torch.Tensor, base_layer: nn.Embedding) -> torch.Tensor:
        """Aᵀ[x]: the rank-r code of each token, looked up with the base layer's options."""
        return F.embedding(
            x,
            self.lora_embedding_A.T,
            base_layer.padding_idx,
            base_layer.max_norm,
            base_layer.norm_type,
            base_layer.scale_grad_by_freq,
            base_layer.sparse,
        )

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        update = self.lookup(x, base_layer) @ self.lora_embedding_B.T * self.scaling
        return base_out + update.to(base_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


class DoraEmbedding(DoraMagnitude, LoraEmbedding):
    """h = (m/‖E + s·(BA)ᵀ‖)·(E[x] + s·Aᵀ[x] Bᵀ), the norm taken over the vocabulary for each dimension."""

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base_layer, r, scaling, dropout)
        self.add_magnitude((base_layer.embedding_dim,))

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def compute_norm(self, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight.detach()
        lora_a, lora_b = (t.detach().to(weight.dtype) for t in self.low_rank_factors())
        combined = torch.addmm(weight, lora_a.T, lora_b.T, alpha=self.scaling)  # E + s·(B A)ᵀ in one kernel
        return torch.linalg.vector_norm(combined, dim=0)

    def as_weight_layout(self, scale: torch.Tensor) -> torch.Tensor:
        return scale

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        scale = self.lora_magnitude_vector / self.weight_norm(base_layer)
        update = self.lookup(x, base_layer) @ self.lora_embedding_B.T * self.scaling
        return (scale * (base_out + update)).to(base_out.dtype)


class LoraConv2d(LowRankUpdate):
    """h = conv(x, W) + s·conv₁ₓ₁(conv(x, A), B): A has the base kernel and r output channels."""

    rank_axes: ClassVar[dict[str, int]] = {"lora_A.weight": 0, "lora_B.weight": 1}

    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped Conv2d layers is not supported; target other layers.")
        self.lora_dropout = dropout_or_identity(dropout)
        self.lora_A = nn.Conv2d(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
        )
        self.lora_B = nn.Conv2d(r, base_layer.out_channels, 1, bias=False)
        self.scaling = scaling

    def initialise(self, init: bool | str, base_layer: nn.Module) -> None:
        if init is False:
            return
        if init not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} works on linear layers only, not on Conv2d.")
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_channels)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return base_out + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(base_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A's kernel flattened to r × (in·kh·kw), B's 1×1 kernel as out × r."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return a.view(a.shape[0], -1), b.view(b.shape[0], -1)

    def delta_weight(self) -> torch.Tensor:
        """s·B∘A as one kernel: B is 1×1, so it mixes A's output channels."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a) * self.scaling


class DoraConv2d(DoraMagnitude, LoraConv2d):
    """h = (m/‖W + s·B∘A‖)·(conv(x, W) + s·B(A(x))) + b, the norm per output filter, detached."""

    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base_layer, r, scaling, dropout)
        self.add_magnitude((1, base_layer.out_channels, 1, 1))

    def compute_norm(self, base_layer: nn.Module) -> torch.Tensor:
        weight = base_layer.weight.detach() + self.delta_weight().detach().to(base_layer.weight.dtype)
        return weight.norm(p=2, dim=(1, 2, 3)).view(1, -1, 1, 1)

    def as_weight_layout(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        scale = self.lora_magnitude_vector / self.weight_norm(base_layer)
        if isinstance(self.lora_dropout, nn.Identity):
            plain = base_out if base_layer.bias is None else base_out - base_layer.bias.view(1, -1, 1, 1)
        else:
            conv = base_layer
            plain = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        update = (scale - 1) * plain + scale * self.lora_B(self.lora_A(x)) * self.scaling
        return base_out + update.to(base_out.dtype)


def _check_factor_ranks(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """PiSSA and OLoRA take r factors of each target's weight, which has min(out, in) of them: refuse a
    larger r before any weight is changed."""
    for name in targets:
        layer = model.get_submodule(name)
        layer = layer.base_layer if isinstance(layer, TunedLayer) else layer
        if not is_linear(layer):
            continue
        out_features, in_features = (
            (layer.out_features, layer.in_features)
            if isinstance(layer, nn.Linear)
            else weight_out_in(layer).shape
        )
        r, most = lora_scaling(config, name)[0], min(out_features, in_features)
        if r > most:
            init = config.init_lora_weights
            raise ValueError(
                f"LoraConfig: init_lora_weights={init!r} takes r factors of each target's weight (its top "
                f"singular vectors; OLoRA: its QR factors), but {name!r} has a "
                f"{out_features}×{in_features} weight, so at most {most}, and r={r}. "
                "Lower r (or its rank_pattern entry), or use init_lora_weights=True."
            )


@register_method
class Lora(Method):
    config_class = LoraConfig
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d))

    def resolve_config(self, model: nn.Module, config: LoraConfig) -> LoraConfig:
        if config.target_modules is None:  # Hugging Face peft's default for the architecture, if it has one
            config.target_modules = DEFAULT_TARGETS.get(model_type(model))
        if moves_base(config):
            _check_factor_ranks(model, config, find_targets(model, config, self.supports))
        return config

    def padded_for_hotswap(
        self, config: LoraConfig, layers: dict[str, LayerAdapter], target_rank: int
    ) -> LoraConfig:
        """Every layer at rank `target_rank`, each keeping its scale s: α = s·r (rsLoRA: s·√r), the most
        common α as lora_alpha and the others in alpha_pattern under their module's name."""
        alphas = {}
        for name, layer in layers.items():
            layer.pad_rank_to(target_rank, f"Layer {name!r}")
            alphas[name] = layer.scaling * (math.sqrt(target_rank) if config.use_rslora else target_rank)
        common = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else config.lora_alpha
        return dataclasses.replace(
            config,
            r=target_rank,
            lora_alpha=common,
            rank_pattern={},
            alpha_pattern={name: alpha for name, alpha in alphas.items() if alpha != common},
        )

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: LoraConfig) -> LayerAdapter:
        r, scaling = lora_scaling(config, module_name)
        guard_cpu_packing(base_layer)  # a quantized base must not drop gradients after an eval pass
        if is_linear(base_layer):
            kind = DoraLinear if config.use_dora else LoraLinear
        elif isinstance(base_layer, nn.Embedding):
            kind = DoraEmbedding if config.use_dora else LoraEmbedding
        else:
            kind = DoraConv2d if config.use_dora else LoraConv2d
        adapter = kind(base_layer, r, scaling, config.lora_dropout)
        adapter.initialise(config.init_lora_weights, base_layer)
        return adapter

    def weighted_config(self, configs: list[LoraConfig], plan: WeightedMerge) -> LoraConfig:
        """Hugging Face peft's rule: rank Σ r_t for "cat", `svd_rank` (else the largest r_t) for the SVD
        types, the common r for the rest; the union of the targets; α = r."""
        if any(c.use_dora for c in configs):
            raise ValueError(
                "DoRA adapters cannot be combined by add_weighted_adapter: each rescales W + ΔW by its own "
                "magnitude vector, which is not linear in ΔW. Combine plain LoRA adapters, or merge DoRA "
                "adapters into the base one at a time (merge_and_unload)."
            )
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        kind = plan.combination_type
        if kind == "cat":
            rank = sum(ranks)
        elif plan.uses_svd:
            rank = plan.svd_rank or max(ranks)
        elif len(set(ranks)) > 1:
            raise ValueError(
                f"combination_type={kind!r} combines the A and B factors entry by entry, so the adapters "
                f"need one rank; theirs are {ranks}. Use 'cat' (rank {sum(ranks)}) or an SVD type ('svd', "
                "'ties_svd', 'dare_linear_svd', ...), whose rank svd_rank sets."
            )
        else:
            rank = ranks[0]
        return dataclasses.replace(
            configs[0],
            r=rank,
            lora_alpha=rank,
            target_modules=target_union([c.target_modules for c in configs]),
            rank_pattern={},
            alpha_pattern={},
            init_lora_weights=True,
        )

    def base_parameters(self, model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
        if config.bias == "lora_only":
            return [
                f"{t}.base_layer.bias"
                for t in targets
                if getattr(model.get_submodule(t), "bias", None) is not None
            ]
        if config.bias == "all":
            return [
                n
                for n, _ in model.named_parameters()
                if n.rsplit(".", 1)[-1] == "bias" and not is_adapter_parameter(n)
            ]
        return []
