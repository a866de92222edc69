"""Quantized bases (bitsandbytes): QLoRA's 4-bit NF4/FP4 layers and LLM.int8()'s 8-bit ones.

* `quantize(model, bits=4)` swaps a model's linear layers for bitsandbytes' in place, the layers that
  transformers' `BitsAndBytesConfig` loading builds; `prepare_model_for_kbit_training` freezes the model,
  upcasts what stays unquantized to float32 and turns on gradient checkpointing.
* Methods touch quantized layers only through `is_quantized_linear`, `dequantized_weight` (W as a float32
  (out, in) copy) and `replace_weight` (quantize a new W into the layer with its own settings: one rounding,
  each entry to the nearest code in units of its block's scale); `dequantize_model` swaps every quantized
  layer for an nn.Linear holding its dequantized weight.

bitsandbytes is imported only when one of these is called, so `import peftkit` neither needs nor loads it.

CPU packing. On a CPU with AVX512-BF16, bitsandbytes (0.50 here) rewrites a Linear4bit's weight in place the
first time the layer runs in eval mode on an input that needs no gradient (any forward under
`torch.no_grad()`), for its bfloat16 CPU kernel: the 4-bit codes are regrouped into tiles of 32 output rows
(`[out, in/2]` bytes), the block scales are un-nested and stored transposed as bfloat16 (`[in/blocksize,
out]`), and `quant_state.packing_format_for_cpu` is set. The layer stays packed. Consequences, handled here:
  1. `bitsandbytes.functional.dequantize_4bit` reads packed bytes as if they were standard and returns wrong
     weights; `dequantized_weight` decodes the packed layout itself.
  2. The packed kernel has no backward: a later forward that needs gradients silently drops the gradient to
     the layer's input (and fails outright when the bias trains).
  3. bitsandbytes' own unpacking, run by `state_dict()`, leaves the scales transposed when double
     quantization is off, which scrambles every layer with more than one block per row.
  4. Its packer raises on layers whose in_features is not a multiple of the block size or whose
     out_features is not a multiple of 32.
`guard_cpu_packing` answers 2-4: such layers never pack, and a packed layer gets its standard layout back
(decoded and requantized, which reproduces its values) before a forward that needs gradients and before
`state_dict()`. The scales keep the bfloat16 rounding packing gave them (relative error at most 2^-8);
double-quantized scales are nested again, as bitsandbytes does. `quantize`, `prepare_model_for_kbit_training`
and LoRA on a quantized layer install it.
"""

from __future__ import annotations

import copy
import sys
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .domains import check_choice
from .targeting import name_matches

QUANT_TYPES = ["nf4", "fp4"]
CPU_TILE_ROWS = 32  # rows per tile in bitsandbytes' CPU packing


def _bitsandbytes() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "Quantized (4-bit / 8-bit) bases need bitsandbytes: pip install bitsandbytes "
            "(or pip install 'peftkit[qlora]')."
        ) from error
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit, or a Linear8bitLt holding int8 weights."""
    bnb = sys.modules.get("bitsandbytes")  # a model can hold its layers only if something imported it
    if bnb is None:
        return False
    if isinstance(module, bnb.nn.Linear4bit):
        return True
    return isinstance(module, bnb.nn.Linear8bitLt) and not module.state.has_fp16_weights


def _is_quantized_parameter(param: torch.Tensor) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def _cpu_packed(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _quantized_from(state: Any) -> torch.dtype:
    """The dtype a 4-bit weight had when it was quantized (packing records it aside)."""
    return state.original_dtype if _cpu_packed(state) else state.dtype


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W of a quantized linear layer as a float32 (out, in) tensor, a copy; the layer is left as it is."""
    bnb = _bitsandbytes()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales = weight.SCB if weight.SCB is not None else module.state.SCB  # a forward moves them to state
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    state = weight.quant_state
    if state is None:
        raise ValueError(
            f"{type(module).__name__} holds no quantized weight yet; bitsandbytes quantizes it when the "
            "layer is moved to a device (layer.to('cpu') or .to('cuda'))."
        )
    if _cpu_packed(state):
        return _decode_cpu_packed(weight.data, state)
    as_float32 = copy.copy(state)  # straight to float32, not via the dtype it was quantized from: the
    as_float32.dtype = torch.float32  # values the layer's float32 forward multiplies by
    return bnb.functional.dequantize_4bit(weight.data, as_float32)


def _decode_cpu_packed(data: torch.Tensor, state: Any) -> torch.Tensor:
    """W from bitsandbytes' CPU packing, the inverse of `_convert_weight_packed_for_cpu` (functional.py).

    Every 32 consecutive bytes hold a tile of 32 output rows x 2 input columns, rows 0-15 in the low nibbles
    and rows 16-31 in the high ones; the scales are bfloat16, (in/blocksize, out)."""
    out_features, in_features = state.shape
    tiles = data.view(torch.uint8).reshape(-1, CPU_TILE_ROWS)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)
    codes = codes.reshape(out_features // CPU_TILE_ROWS, in_features // 2, CPU_TILE_ROWS, 2)
    codes = codes.transpose(1, 2).reshape(out_features, in_features)
    values = state.code.float()[codes.long()].view(out_features, -1, state.blocksize)
    return (values * state.absmax.float().T.unsqueeze(-1)).reshape(out_features, in_features)


def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize `weight` ((out, in), any float dtype) into the layer in place, with the layer's own settings.

    4-bit: its block size, quant type, double quantization and storage, from the dtype it was quantized
    from; 8-bit: row-wise int8 from float16, as bitsandbytes does. The Parameter object stays the same."""
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"Refusing to quantize non-finite values into {type(module).__name__}: the result would be "
            "meaningless. The adapter being merged holds inf or nan."
        )
    bnb = _bitsandbytes()
    param = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(param.device, torch.float16))
        param.data, param.CB, param.SCB = codes, codes, scales
        module.state.CB = module.state.SCB = None  # the next forward takes the new ones from the weight
        return
    data, state = bnb.functional.quantize_4bit(
        weight.to(param.device, _quantized_from(param.quant_state)).contiguous(),
        blocksize=param.blocksize,
        compress_statistics=param.compress_statistics,
        quant_type=param.quant_type,
        quant_storage=param.quant_storage,
    )
    param.data, param.quant_state = data, state
    module.quant_state = state


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer (peftkit's wrapped base layers too) by an nn.Linear holding its
    dequantized weight and the same bias, in place; returns `model`.

    The new weights take `dtype`, by default that of the model's first floating-point parameter that is not
    quantized (the input embeddings of a transformers model), so that they match the activations around
    them: float32 after `prepare_model_for_kbit_training`, bfloat16 in a bfloat16 model."""
    if dtype is None:
        floats = (p for p in model.parameters() if p.is_floating_point() and not _is_quantized_parameter(p))
        dtype = next((p.dtype for p in floats), torch.float32)
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(dequantized_weight(module).to(dtype), requires_grad=False)
        linear.bias = module.bias
        linear.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


# ---- CPU packing ---------------------------------------------------------------------------------


def guard_cpu_packing(module: nn.Module) -> None:
    """Keep bitsandbytes' CPU packing of a Linear4bit from breaking training and saving (module docstring).

    Idempotent; does nothing to other layers."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit) or getattr(module, "_peftkit_guarded", False):
        return
    if module.in_features % module.weight.blocksize or module.out_features % CPU_TILE_ROWS:
        module.support_avx512bf16_for_cpu = False  # shapes bitsandbytes' packer raises on
    module.register_forward_pre_hook(_unpack_before_differentiable_forward)
    module.register_state_dict_pre_hook(_unpack_before_state_dict)
    module._peftkit_guarded = True


def unpack_cpu_layout(module: nn.Module) -> None:
    """Give a CPU-packed Linear4bit its standard layout back; nothing to do for any other layer."""
    if _cpu_packed(getattr(module.weight, "quant_state", None)):
        replace_weight(module, dequantized_weight(module))


def _unpack_before_differentiable_forward(module: nn.Module, args: tuple) -> None:
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    if module.training or needs_grad:
        unpack_cpu_layout(module)


def _unpack_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    unpack_cpu_layout(module)


# ---- public entry points ---------------------------------------------------------------------------


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
) -> nn.Module:
    """Replace every nn.Linear of `model` (but its output head and `skip_modules`, names or name suffixes as
    in `target_modules`) by a bitsandbytes layer with the same weight and bias, in place; returns `model`.

    bits=4: `Linear4bit` (QLoRA), `quant_type` "nf4" or "fp4", blocks of 64 with their scales quantized again
    when `double_quant`, computing in `compute_dtype`. bits=8: `Linear8bitLt(has_fp16_weights=False)`
    (LLM.int8(), row-wise int8; it computes in the input's dtype). These are the layers transformers builds
    from `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...,
    bnb_4bit_compute_dtype=...)` or `load_in_8bit=True`, with the same quantized weights."""
    if bits not in (4, 8):
        raise ValueError(
            f"quantize: bits={bits!r} is not available; use 4 (QLoRA's NF4/FP4) or 8 (LLM.int8())."
        )
    check_choice("quantize", "quant_type", quant_type, QUANT_TYPES)
    bnb = _bitsandbytes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if (
            not isinstance(module, nn.Linear)
            or is_quantized_linear(module)
            or module is head
            or name_matches(skip_modules or [], name)
        ):
            continue
        weight, has_bias = module.weight.data, module.bias is not None
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                module=layer,
            ).to(weight.device)  # bitsandbytes quantizes on the move to a device
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False, device="meta"
            )
            layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(
                weight.device
            )  # quantized on the move from the CPU
        if has_bias:
            layer.bias = module.bias
        layer.train(module.training)
        guard_cpu_packing(layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantized transformers model ready for adapter training, in place; returns `model`.

    Freezes every parameter; casts the float16/bfloat16 parameters that are not quantized (norms,
    embeddings, the output head) to float32, which trains more stably; guards bitsandbytes' CPU packing.
    With `use_gradient_checkpointing`, makes the input embeddings' output require grad (so that gradients
    reach adapters through checkpointed blocks) and turns on transformers' gradient checkpointing, with
    `use_reentrant=False` unless `gradient_checkpointing_kwargs` says otherwise."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and not _is_quantized_parameter(param):
            param.data = param.data.float()
    for module in model.modules():
        guard_cpu_packing(module)
    if use_gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model?); "
                "pass use_gradient_checkpointing=False."
            )
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers' name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
