"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual tokens made by a small prompt encoder.

n trainable embeddings E ∈ R^{n×d} pass through an encoder, and its output P is prepended to the input
like a soft prompt, h = model([P; E[x]]), where (the layout of Hugging Face peft 0.21)

    MLP:   P = W₃ ReLU(W₂ ReLU(W₁ E + b₁) + b₂) + b₃                  (hidden size h: d → h → h → d)
    LSTM:  P = W₂ ReLU(W₁ [LSTM→(E); LSTM←(E)] + b₁) + b₂             (bidirectional: d → 2h → 2h → d)

The encoder only eases optimisation; once trained, P alone decides the outputs. So, as Hugging Face peft
does, an adapter file holds P (`prompt_embeddings`), not the encoder. Loaded for inference, P is used as
saved. Loaded with `is_trainable=True` (which peft refuses), training continues on P directly, without
the encoder, and a warning says so.
"""

from __future__ import annotations

import enum
import warnings
from typing import ClassVar

import torch
from torch import nn

from ..config import method_config
from ..domains import Domain, integer, number, one_of, optional
from ..layer import ModelAdapter, copy_strict
from ..registry import Method, register_method
from .prompt_tuning import VirtualTokenConfig, VirtualTokens, complete_prompt_config

MLP_HIDDEN_LAYERS = 2  # the MLP encoder's depth, fixed as in Hugging Face peft


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The encoder that turns the virtual-token embeddings into the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@method_config
class PromptEncoderConfig(VirtualTokenConfig):
    """P-tuning's prompt encoder. Field names and defaults are Hugging Face peft's.

    `encoder_hidden_size` None means the model's token_dim. `encoder_num_layers` and `encoder_dropout`
    apply to the LSTM (layers, dropout between them); the MLP always has two hidden layers, as in peft."""

    peft_type: ClassVar[str] = "P_TUNING"
    default_learning_rate: ClassVar[float] = 3e-3
    field_domains: ClassVar[dict[str, Domain]] = {
        **VirtualTokenConfig.field_domains,
        "encoder_reparameterization_type": one_of([t.value for t in PromptEncoderReparameterizationType]),
        "encoder_hidden_size": optional(integer(1)),
        "encoder_num_layers": integer(1),
        "encoder_dropout": number(at_least=0, below=1),
    }

    num_virtual_tokens: int = None  # type: ignore[assignment]
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
            self.encoder_reparameterization_type
        )


class PromptEncoder(VirtualTokens):
    """P = MLP(E) or MLP(BiLSTM(E)) over the virtual-token embeddings E; see the module docstring.

    Built without an encoder (`with_encoder=False`, an adapter loaded from a file), P = E: the embedding
    holds the saved prompt itself."""

    def __init__(self, config: PromptEncoderConfig, with_encoder: bool) -> None:
        super().__init__()
        n, d, h = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(n, d)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if not with_encoder:
            return
        if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                d,
                h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )

    def prompts(self) -> torch.Tensor:
        e = self.embedding.weight  # (n, d)
        if self.mlp_head is None:
            return e
        if self.lstm_head is not None:
            e = self.lstm_head(e.unsqueeze(0))[0].squeeze(0)  # (n, 2h): forward and backward states
        return self.mlp_head(e)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """P as Hugging Face peft writes it, computed without dropout even in training mode."""
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                prompt = self.prompts()
        finally:
            self.train(training)
        return {"prompt_embeddings": prompt}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Take the saved P into the embedding; an encoder built for training is dropped, since P = E now."""
        copy_strict({"prompt_embeddings": self.embedding.weight}, tensors, where)
        if self.mlp_head is not None:
            warnings.warn(
                f"{where.partition(': ')[0]}: a P-tuning file holds the prompt its encoder produced "
                "(prompt_embeddings), not the encoder's weights. Training continues on that prompt "
                "directly, without the encoder's reparameterisation; the outputs start where the saved "
                "adapter left off.",
                stacklevel=2,
            )
            self.lstm_head = self.mlp_head = None


@register_method
class PTuning(Method):
    config_class = PromptEncoderConfig

    def model_adapter(self, model: nn.Module, config: PromptEncoderConfig) -> ModelAdapter:
        complete_prompt_config(model, config, "P-tuning")
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        with_encoder = not config.inference_mode  # an adapter loaded for inference is its saved prompt alone
        mlp = config.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP
        if with_encoder and mlp and config.encoder_num_layers != MLP_HIDDEN_LAYERS:
            warnings.warn(
                f"PromptEncoderConfig: encoder_num_layers={config.encoder_num_layers} is ignored by the MLP "
                f"encoder, which always has {MLP_HIDDEN_LAYERS} hidden layers (as in Hugging Face peft); it "
                "sets the depth of the LSTM encoder.",
                stacklevel=2,
            )
        return PromptEncoder(config, with_encoder).to(model.get_input_embeddings().weight.device)
