"""Prompt tuning (Lester et al., 2021): n trainable virtual-token embeddings P prepended to the input.

h = model([P; E[x]]) — the attention mask grows by n ones and causal-LM labels by n ignored positions.
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftConfig, TaskType, method_config
from ..domains import KEYWORD_ARGS, TEXT, Domain, integer, one_of, optional
from ..layer import ModelAdapter
from ..registry import Method, register_method

IGNORE_INDEX = -100
SUPPORTED_TASKS = [TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.FEATURE_EXTRACTION, None]


class PromptTuningInit(str, enum.Enum):
    """RANDOM: N(0, 1); TEXT: the embeddings of `prompt_tuning_init_text`; SAMPLE_VOCAB: random vocabulary
    rows."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class VirtualTokenConfig(PeftConfig):
    """What the configs of methods that learn virtual tokens share (no fields of its own): the domains of
    the options they all have, the model's dimensions among them (None: read off the model)."""

    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        "num_virtual_tokens": integer(1),
        "token_dim": optional(integer(1, "the model's embedding width")),
        "num_transformer_submodules": one_of([None, 1], "virtual tokens go to one transformer stack"),
        "num_attention_heads": optional(integer(1)),
        "num_layers": optional(integer(1)),
    }

    @classmethod
    def training_defaults(cls, total_steps: int) -> dict[str, Any]:
        return {"num_virtual_tokens": 20}  # these configs require it; 20 unless told otherwise


@method_config
class PromptTuningConfig(VirtualTokenConfig):
    """Soft prompt of `num_virtual_tokens` embeddings. Field names and defaults are Hugging Face peft's."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    default_learning_rate: ClassVar[float] = 3e-2
    field_domains: ClassVar[dict[str, Domain]] = {
        **VirtualTokenConfig.field_domains,
        "prompt_tuning_init": one_of([i.value for i in PromptTuningInit]),
        "prompt_tuning_init_text": optional(TEXT),
        "tokenizer_name_or_path": optional(TEXT),
        "tokenizer_kwargs": optional(KEYWORD_ARGS),
    }

    num_virtual_tokens: int = None  # type: ignore[assignment]
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError(
                "PromptTuningConfig: prompt_tuning_init=TEXT needs prompt_tuning_init_text and "
                "tokenizer_name_or_path (a local tokenizer folder)."
            )
        if self.tokenizer_kwargs and not text:
            raise ValueError(
                f"PromptTuningConfig: tokenizer_kwargs={self.tokenizer_kwargs!r} are for the tokenizer that "
                f"prompt_tuning_init=TEXT reads, but prompt_tuning_init is {self.prompt_tuning_init.value}. "
                "Drop tokenizer_kwargs, or set prompt_tuning_init='TEXT'."
            )


class VirtualTokens(ModelAdapter):
    """n virtual-token embeddings P ∈ R^{n×d} prepended to every sequence: inputs_embeds ← [P; E[x]].

    Shared by the methods that learn a soft prompt; each says how it makes P (`prompts`). The attention
    mask grows by n ones, token_type_ids by n zeros and causal-LM labels by n ignored positions."""

    rewrites_inputs = True

    def prompts(self) -> torch.Tensor:
        """P, shape (num_virtual_tokens, token_dim)."""
        raise NotImplementedError

    def prepare_inputs(self, inputs: dict[str, Any], model: nn.Module, task_type: Any) -> dict[str, Any]:
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids", None)
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        prompt = self.prompts()
        batch, n = embeds.shape[0], prompt.shape[0]
        inputs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        if inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if inputs.get("token_type_ids") is not None:
            types = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        if inputs.pop("position_ids", None) is not None:
            warnings.warn(
                "position_ids are ignored with virtual tokens; positions are recomputed.", stacklevel=3
            )
        if task_type == TaskType.CAUSAL_LM and inputs.get("labels") is not None:
            labels = inputs["labels"]
            inputs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        return inputs


class PromptEmbedding(VirtualTokens):
    """The virtual tokens P ∈ R^{n×d} themselves are the trained parameters."""

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, token_dim))

    def prompts(self) -> torch.Tensor:
        return self.prompt_embeddings


def complete_prompt_config(model: nn.Module, config: PeftConfig, method: str) -> None:
    """Check that virtual tokens support the config's task, and fill in the model's dimensions
    (token_dim, num_layers, num_attention_heads, num_transformer_submodules) that the config leaves None."""
    if config.task_type not in SUPPORTED_TASKS:
        raise ValueError(
            f"{method} in peftkit supports task_type {[t.value for t in SUPPORTED_TASKS if t]}; "
            f"got {config.task_type.value}."
        )
    cfg = getattr(model, "config", None)
    width = model.get_input_embeddings().embedding_dim
    if config.token_dim not in (None, width):
        raise ValueError(
            f"{type(config).__name__}: token_dim={config.token_dim} does not fit {type(model).__name__}, "
            f"whose input embeddings are {width} wide; leave token_dim None to read it off the model."
        )

    def first(*names: str) -> int | None:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    dims = {
        "token_dim": width,
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads"),
        "num_transformer_submodules": 1,
    }
    for key, value in dims.items():
        if getattr(config, key) is None:
            setattr(config, key, value)


@register_method
class PromptTuning(Method):
    config_class = PromptTuningConfig

    def model_adapter(self, model: nn.Module, config: PromptTuningConfig) -> ModelAdapter:
        complete_prompt_config(model, config, "Prompt tuning")
        adapter = PromptEmbedding(config.num_virtual_tokens, config.token_dim)
        embeddings = model.get_input_embeddings()
        adapter.to(embeddings.weight.device)
        if config.inference_mode:
            return adapter  # the weights come from a file; no tokenizer needed
        with torch.no_grad():
            if config.prompt_tuning_init == PromptTuningInit.TEXT:
                token_ids = _init_token_ids(config)
                if int(token_ids.max()) >= embeddings.num_embeddings:
                    raise ValueError(
                        f"PromptTuningConfig: the tokenizer in tokenizer_name_or_path="
                        f"{config.tokenizer_name_or_path!r} gives prompt_tuning_init_text token id "
                        f"{int(token_ids.max())}, beyond the {embeddings.num_embeddings} rows of "
                        f"{type(model).__name__}'s input embeddings; use the model's own tokenizer."
                    )
                adapter.prompt_embeddings.copy_(embeddings(token_ids.to(embeddings.weight.device)).float())
            elif config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
                rows = torch.randint(0, embeddings.num_embeddings, (config.num_virtual_tokens,))
                adapter.prompt_embeddings.copy_(embeddings.weight[rows.to(embeddings.weight.device)])
        return adapter


def _init_token_ids(config: PromptTuningConfig) -> torch.Tensor:
    """The init text's token ids, repeated or cut to num_virtual_tokens."""
    from transformers import AutoTokenizer

    path, kwargs = config.tokenizer_name_or_path, config.tokenizer_kwargs or {}
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"PromptTuningConfig: tokenizer_name_or_path={path!r} is not a folder. prompt_tuning_init=TEXT "
            "reads the tokenizer from a local folder (tokenizer.save_pretrained writes one); peftkit never "
            "downloads."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"PromptTuningConfig: no tokenizer loads from tokenizer_name_or_path={path!r} with "
            f"tokenizer_kwargs={kwargs!r} ({error}). Give a folder that tokenizer.save_pretrained wrote."
        ) from error
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(
            f"PromptTuningConfig: prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens "
            f"with the tokenizer in {path!r}; give a text with words in it."
        )
    ids = (ids * math.ceil(config.num_virtual_tokens / len(ids)))[: config.num_virtual_tokens]
    return torch.tensor(ids)
