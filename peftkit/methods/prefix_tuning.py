"""Prefix tuning (Li & Liang, 2021): n trainable key/value vectors prepended in every attention layer.

Layer ℓ attends over [P_K^ℓ; K] and [P_V^ℓ; V] instead of K and V:

    h = softmax(Q [P_K^ℓ; K]ᵀ / √d_h) [P_V^ℓ; V],   P = E ∈ R^{n×2Ld}   or   P = W₂ tanh(W₁ E + b₁) + b₂

(the second form, `prefix_projection=True`, is the paper's MLP reparameterisation, E ∈ R^{n×d}). The prefix
reaches the model as a pre-filled transformers cache (`past_key_values` from transformers 4.56, renamed
`cache` in 5.24), built afresh for every forward from tensors that carry gradients to P; the attention mask
grows by n ones.

Layout, as in Hugging Face peft: row t of P is the t-th virtual token's keys and values for every layer,
[K^0 | V^0 | K^1 | V^1 | …], each block d = heads × head_dim wide (key/value heads for grouped-query
attention). For encoder–decoder models peft gives the prefix to the decoder's self-attention only, and
decoder layer ℓ reads blocks 4ℓ mod 2L and 4ℓ+1 mod 2L (so with an even L half the blocks go unused);
peftkit reads the same blocks so that saved prefixes mean the same in both libraries.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TaskType, method_config
from ..domains import BOOLEAN, Domain, integer, one_of, optional
from ..layer import ModelAdapter, copy_strict
from ..registry import Method, register_method
from .prompt_tuning import VirtualTokenConfig


@method_config
class PrefixTuningConfig(VirtualTokenConfig):
    """Prefix of `num_virtual_tokens` key/value vectors per layer. Field names and defaults are Hugging Face
    peft's; the model's dimensions (token_dim, num_layers, ...) are read off the model when left None."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    default_learning_rate: ClassVar[float] = 1e-2
    field_domains: ClassVar[dict[str, Domain]] = {
        **VirtualTokenConfig.field_domains,
        "num_transformer_submodules": one_of([None, 1, 2], "2 for encoder-decoder models, else 1"),
        "init_weights": one_of([None, "zero"]),
        "encoder_hidden_size": optional(integer(1, "the width of the prefix_projection MLP")),
        "prefix_projection": BOOLEAN,
    }

    num_virtual_tokens: int = None  # type: ignore[assignment]
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False


class PrefixEncoder(ModelAdapter):
    """The prefix P ∈ R^{n×2Ld} (optionally P = MLP(E)), handed to the model as its attention cache.

    On disk it is `prompt_embeddings`, P itself: with the projection, the MLP's output, so a projected prefix
    loads back as a plain one (for inference) and the MLP is not saved, as in Hugging Face peft."""

    rewrites_inputs = True
    sole_owner_of = "the attention cache (past_key_values)"

    def __init__(self, config: PrefixTuningConfig, encoder_decoder: bool, cache_keyword: str) -> None:
        super().__init__()
        self.cache_keyword = cache_keyword  # the model's forward argument for its cache
        n, d, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.num_virtual_tokens, self.num_heads = n, config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        self.encoder_decoder = encoder_decoder
        # (key block, value block) of P read by each attention layer, as in Hugging Face peft
        if encoder_decoder:
            self.blocks = [((4 * i) % (2 * layers), (4 * i + 1) % (2 * layers)) for i in range(layers)]
        else:
            self.blocks = [(2 * i, 2 * i + 1) for i in range(layers)]
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size
            self.embedding = nn.Parameter(torch.randn(n, d))
            self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * layers * d))
        else:
            self.embedding = nn.Parameter(torch.randn(n, 2 * layers * d))
        if config.init_weights == "zero":  # P = 0: every prefix key and value starts at zero
            with torch.no_grad():
                for param in [self.embedding] if self.transform is None else self.transform[-1].parameters():
                    param.zero_()

    def prefix(self) -> torch.Tensor:
        """P: E, or W₂ tanh(W₁ E + b₁) + b₂ with the projection."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(P_K^ℓ, P_V^ℓ) for each layer ℓ, each (batch, heads, n, head_dim)."""
        blocks = self.prefix().to(dtype).view(self.num_virtual_tokens, -1, self.num_heads, self.head_dim)
        blocks = blocks.permute(1, 2, 0, 3)  # (2L, heads, n, head_dim)
        return [
            (blocks[k].expand(batch, -1, -1, -1), blocks[v].expand(batch, -1, -1, -1)) for k, v in self.blocks
        ]

    def cache(self, batch: int, dtype: torch.dtype) -> Any:
        """A new transformers cache holding the prefix: the model appends to it and never writes into P."""
        from transformers import DynamicCache, EncoderDecoderCache

        self_attention = DynamicCache(self.key_values(batch, dtype))
        return EncoderDecoderCache(self_attention, DynamicCache()) if self.encoder_decoder else self_attention

    def prepare_inputs(self, inputs: dict[str, Any], model: nn.Module, task_type: Any) -> dict[str, Any]:
        if model.training:
            _check_no_checkpointing(model)
        return self._with_prefix(dict(inputs), model, batch_repeat=1)

    def prepare_generation_inputs(
        self, inputs: dict[str, Any], model: nn.Module, task_type: Any
    ) -> dict[str, Any]:
        """For `generate`: the prefix cache, sized for the beams, and the mask of prefix + prompt.

        With a mask longer than `input_ids`, transformers' generate takes the cache as holding the first
        tokens and feeds every prompt token, at positions n, n+1, ... from the mask. `inputs_embeds` are taken
        to cover the cached positions too, so n placeholder rows stand in front of them (never fed)."""
        inputs = dict(inputs)
        config = inputs.get("generation_config") or getattr(model, "generation_config", None)
        beams = inputs.get("num_beams") or getattr(config, "num_beams", None) or 1
        returned = inputs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
        if not self.encoder_decoder:
            rows = _rows(inputs)
            if inputs.get("attention_mask") is None:
                inputs["attention_mask"] = torch.ones(rows.shape[:2], dtype=torch.long, device=rows.device)
            if inputs.get("input_ids") is None:
                placeholders = rows.new_zeros(rows.shape[0], self.num_virtual_tokens, rows.shape[2])
                inputs["inputs_embeds"] = torch.cat([placeholders, rows], dim=1)
        return self._with_prefix(inputs, model, batch_repeat=max(beams, returned))

    def _with_prefix(self, inputs: dict[str, Any], model: nn.Module, batch_repeat: int) -> dict[str, Any]:
        given = [k for k in CACHE_KEYWORDS if inputs.get(k) is not None]
        if given:
            raise ValueError(
                f"{given[0]} is already set (by the caller, or by another active prefix-tuning "
                "adapter). Prefix tuning fills the cache with its prefix itself: activate one prefix-tuning "
                "adapter at a time, and use generate() to decode step by step."
            )
        batch, n = _rows(inputs).shape[0], self.num_virtual_tokens
        dtype = model.get_input_embeddings().weight.dtype
        inputs[self.cache_keyword] = self.cache(batch * batch_repeat, dtype)
        mask_key = "decoder_attention_mask" if self.encoder_decoder else "attention_mask"
        if inputs.get(mask_key) is not None:
            mask = inputs[mask_key]
            inputs[mask_key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        if inputs.get("position_ids") is not None:  # the caller counts from the first real token
            inputs["position_ids"] = inputs["position_ids"] + n
        return inputs

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix()}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.transform is not None:
            raise ValueError(
                f"{where}prompt_embeddings: the file holds a prefix saved with prefix_projection=True, "
                "i.e. the projection's output, not the MLP that produced it, so it cannot be loaded to train "
                "the MLP further. Load it for inference (is_trainable=False), or pass a config with "
                "prefix_projection=False to train the saved prefix itself."
            )
        copy_strict({"prompt_embeddings": self.embedding}, tensors, where)


def _rows(inputs: dict[str, Any]) -> torch.Tensor:
    """The (encoder's) input_ids or inputs_embeds: what the prefix cache is sized for."""
    rows = inputs.get("input_ids")
    rows = inputs.get("inputs_embeds") if rows is None else rows
    if rows is None:
        raise ValueError("Prefix tuning sizes its cache from input_ids or inputs_embeds; pass one of them.")
    return rows


def _fill_dimensions(model: nn.Module, config: PrefixTuningConfig) -> None:
    """token_dim, num_layers, num_attention_heads (key/value heads under GQA), encoder_hidden_size and
    num_transformer_submodules read off the model where the config leaves them None, as peft does; values
    the config sets must give the cache the model keeps (layers, heads, head width)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def read(*names: str) -> int | None:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    names = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    own = {option: read(*looked_for) for option, looked_for in names.items()}  # the model's, None if unknown
    for option, looked_for in names.items():
        if getattr(config, option) is None:
            if own[option] is None:
                raise ValueError(
                    f"PrefixTuningConfig: cannot read {option} from {type(model).__name__}'s config "
                    f"(looked for {', '.join(looked_for)}); set {option} in the config."
                )
            setattr(config, option, own[option])
    if config.token_dim % config.num_attention_heads:
        raise ValueError(
            f"PrefixTuningConfig: token_dim={config.token_dim} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}."
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    if kv_heads is not None:  # grouped-query attention caches only the key/value heads
        head_dim = getattr(cfg, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    _check_cache_shape(model, config, own, kv_heads, getattr(cfg, "head_dim", None))


def _check_cache_shape(
    model: nn.Module, config: PrefixTuningConfig, own: dict, kv_heads: int | None, head_dim: int | None
) -> None:
    """Refuse a prefix whose layers, heads or head width differ from the cache of the model (where its
    config tells them): the model would fail on it in the first forward, or ignore part of it."""
    where = f"{type(model).__name__}, whose attention cache has"
    if own["num_layers"] is not None and config.num_layers != own["num_layers"]:
        raise ValueError(
            f"PrefixTuningConfig: num_layers={config.num_layers} does not fit {where} {own['num_layers']} "
            "layers; leave num_layers None to read it off the model."
        )
    if own["token_dim"] is None or own["num_attention_heads"] is None:
        return
    heads = kv_heads or own["num_attention_heads"]
    width = head_dim or own["token_dim"] // own["num_attention_heads"]
    if (config.num_attention_heads, config.token_dim // config.num_attention_heads) != (heads, width):
        raise ValueError(
            f"PrefixTuningConfig: token_dim={config.token_dim} and num_attention_heads="
            f"{config.num_attention_heads} make a prefix of {config.num_attention_heads} heads of width "
            f"{config.token_dim // config.num_attention_heads}, which does not fit {where} {heads} heads of "
            f"width {width}; leave token_dim and num_attention_heads None to read them off the model."
        )


# The forward argument transformers models take their attention cache under: `cache` from 5.24 (where
# `past_key_values` still works, with a deprecation warning), `past_key_values` before.
CACHE_KEYWORDS = ("cache", "past_key_values")


def _cache_keyword(model: nn.Module) -> str:
    """The name under which `model` (or, for wrappers, the first submodule that does) takes its cache."""
    for module in model.modules():
        if callable(getattr(module, "forward", None)):
            parameters = inspect.signature(module.forward).parameters
            for keyword in CACHE_KEYWORDS:
                if keyword in parameters:
                    return keyword
    raise ValueError(
        "Prefix tuning hands its prefix to every attention layer through transformers' cache "
        f"(`cache`; `past_key_values` before transformers 5.24), which {type(model).__name__} does not "
        "take. Use prompt tuning (PromptTuningConfig), which prepends embeddings to the input instead, "
        "or LoRA."
    )


def _check_no_checkpointing(model: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError(
            "Prefix tuning passes its prefix through the model's cache, which transformers drops in layers "
            "that use gradient checkpointing. Call model.gradient_checkpointing_disable(), or use another "
            "method (LoRA, prompt tuning)."
        )


def _is_encoder_decoder(model: nn.Module, config: PrefixTuningConfig) -> bool:
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if config.num_transformer_submodules != (2 if encoder_decoder else 1):
        raise ValueError(
            f"PrefixTuningConfig: num_transformer_submodules={config.num_transformer_submodules} does not "
            f"fit {type(model).__name__}: use 2 for encoder-decoder models (SEQ_2_SEQ_LM), else 1."
        )
    return encoder_decoder


@register_method
class PrefixTuning(Method):
    config_class = PrefixTuningConfig

    def model_adapter(self, model: nn.Module, config: PrefixTuningConfig) -> ModelAdapter:
        cache_keyword = _cache_keyword(model)
        _check_no_checkpointing(model)
        _fill_dimensions(model, config)
        adapter = PrefixEncoder(config, _is_encoder_decoder(model, config), cache_keyword)
        return adapter.to(model.get_input_embeddings().weight.device)
