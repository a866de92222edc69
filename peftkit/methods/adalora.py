"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each target layer learns its update in SVD form, P Λ Q with P = B, Λ = diag(E), Q = A:

    h = W x + s·B (E ⊙ A) x,   A ∈ R^{r₀×in}, E ∈ R^{r₀}, B ∈ R^{out×r₀},   s = α / (r₀ + 10⁻⁵)

where r₀ = `init_r` (the scale keeps dividing by r₀ as ranks shrink, as Hugging Face peft does). A rank
allocator prunes the triplets (Bᵢ, Eᵢ, Aᵢ) that matter least, from r₀ per layer down to `target_r` per
layer on average:

    importance of an entry w      I = |w · ∂L/∂w|,   Ī ← β₁Ī + (1 − β₁)I,   Ū ← β₂Ū + (1 − β₂)|I − Ī|
    score of triplet i            Sᵢ = Ī·Ū(Eᵢ) + mean_j Ī·Ū(A_ij) + mean_j Ī·Ū(B_ji)
    total budget at step t        b₀ for t ≤ tinit;  b_T + (b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³
                                  until T − tfinal;  b_T after   (b₀ = Σ r₀, b_T = target_r · layers)

every `deltaT` steps all but the b(t) best triplets get Eᵢ = 0; at step T − tfinal the mask is fixed and
`rank_pattern` records it. Training adds orth_reg_weight · R to the loss, R the mean over every A and B of
‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (Hugging Face peft's form of the paper's ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F).
Saved files hold only the kept triplets, so layers load at their allocated ranks.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import BOOLEAN, LAYER_SELECTION, Domain, integer, number, one_of, optional
from ..layer import LayerAdapter, ModelAdapter
from ..registry import Method, register_method
from ..targeting import is_linear, model_type
from .lora import Lora, LoraConfig, LowRankUpdate, dropout_or_identity, weight_out_in

# Hugging Face peft's AdaLoRA defaults for configs without target_modules, by transformers `model_type`.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    **dict.fromkeys(["bart", "opt"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox"], ["query_key_value"]),
    **dict.fromkeys(
        ["gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"],
        ["q_proj", "v_proj"],
    ),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

SCALE_EPS = 1e-5  # s = α / (r₀ + 1e-5), as Hugging Face peft computes it


@method_config
class AdaLoraConfig(PeftConfig):
    """Adaptive-rank LoRA. Field names and defaults are Hugging Face peft's (0.21).

    `total_step` (required) is the number of optimizer steps training takes. The rank starts at `init_r`
    per layer, stays there for `tinit` steps, shrinks on a cubic schedule to `target_r` per layer on
    average by step `total_step - tfinal`, and stays fixed for the last `tfinal` steps. `rank_pattern`
    is written by `update_and_allocate`: for each layer `"<module>.lora_E"`, which triplets are kept.
    """

    peft_type: ClassVar[str] = "ADALORA"
    default_learning_rate: ClassVar[float] = 1e-3

    @classmethod
    def training_defaults(cls, total_steps: int) -> dict[str, Any]:
        """The budget held for the first tenth of training and fixed for the last fifth."""
        return {"total_step": total_steps, "tinit": total_steps // 10, "tfinal": total_steps // 5}

    reference_fields: ClassVar[dict[str, Any]] = {
        **LoraConfig.reference_fields,
        "r": 8,  # AdaLoRA's rank is init_r
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    # LoRA options Hugging Face peft's AdaLoRA writes but ignores; peftkit reads and ignores them too.
    informational_fields: ClassVar[frozenset[str]] = LoraConfig.informational_fields | {
        "r",
        "alpha_pattern",
        "use_rslora",
    }
    option_aliases: ClassVar[dict[str, str]] = {
        "r": "init_r",
        "rank": "init_r",
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
    }

    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        **LAYER_SELECTION,
        "lora_alpha": number(above=0, note="the update is scaled by lora_alpha / init_r"),
        "lora_dropout": number(at_least=0, below=1),
        "fan_in_fan_out": BOOLEAN,
        "bias": one_of(["none", "all", "lora_only"]),
        "init_lora_weights": one_of([True, False]),
        "target_r": integer(0, "the average rank per layer that allocation ends at"),
        "init_r": integer(1, "each layer's rank before allocation"),
        "tinit": integer(0, "steps before the budget starts to shrink"),
        "tfinal": integer(0, "steps at the end with the final budget"),
        "deltaT": integer(1, "steps between allocations"),
        "beta1": number(above=0, below=1, note="the smoothing of the importance scores"),
        "beta2": number(above=0, below=1, note="the smoothing of their uncertainty"),
        "orth_reg_weight": number(at_least=0),
        "total_step": optional(integer(1, "the number of optimizer steps training takes")),
        "rank_pattern": Domain(
            "a dict from '<module>.lora_E' to init_r booleans", lambda v: v is None or isinstance(v, dict)
        ),
    }

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.total_step is None:
            raise ValueError(
                "AdaLoraConfig needs total_step, the number of optimizer steps training will take (with "
                "transformers' Trainer: max_steps, or epochs × steps per epoch); the rank budget shrinks "
                "from step tinit to step total_step - tfinal."
            )
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoraConfig: target_r={self.target_r} exceeds init_r={self.init_r}; AdaLoRA only prunes "
                "ranks. Raise init_r or lower target_r."
            )
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"AdaLoraConfig: tinit={self.tinit} + tfinal={self.tfinal} leave no budgeting phase in "
                f"total_step={self.total_step} steps (need tinit + tfinal < total_step). Lower tinit or "
                "tfinal, or raise total_step."
            )
        for key, kept in (self.rank_pattern or {}).items():
            if (
                not isinstance(key, str)
                or not re.fullmatch(r".+\.lora_E", key)
                or not isinstance(kept, list)
                or len(kept) != self.init_r
                or not all(isinstance(k, bool) for k in kept)
            ):
                raise ValueError(
                    f"AdaLoraConfig: rank_pattern[{key!r}] = {kept!r} is not a rank allocation. rank_pattern "
                    "maps '<module>.lora_E' to init_r booleans (the triplets kept), as update_and_allocate "
                    "records it; it is not a per-module rank as in LoraConfig. Set the rank with init_r."
                )


class SVDLinear(LowRankUpdate):
    """h = W x + b + s·B (E ⊙ A) dropout(x), s = α / (r₀ + 10⁻⁵), for nn.Linear and Conv1D."""

    def __init__(self, base_layer: nn.Module, rank: int, config: AdaLoraConfig, pattern_key: str) -> None:
        super().__init__()
        out_features, in_features = weight_out_in(base_layer).shape
        self.lora_A = nn.Parameter(torch.randn(rank, in_features))  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.randn(rank, 1))  # Λ: singular values
        self.lora_B = nn.Parameter(torch.randn(out_features, rank))  # P: left singular vectors
        self.lora_dropout = dropout_or_identity(config.lora_dropout)
        self.scaling = config.lora_alpha
        self.ranknum = config.init_r + SCALE_EPS
        self.transposed = type(base_layer).__name__ == "Conv1D"
        self.config = config  # the adapter's config: its rank_pattern says which triplets are kept
        self.pattern_key = pattern_key
        if config.init_lora_weights:  # Λ = 0: the update starts at zero; False keeps N(0, 1) everywhere
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        update = x @ (self.lora_A * self.lora_E).T @ self.lora_B.T * self.scaling / self.ranknum
        return base_out + update.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B (E ⊙ A) in the base weight's layout."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / self.ranknum
        return delta.T if self.transposed else delta

    def kept(self) -> torch.Tensor | None:
        """Which of this layer's triplets the recorded allocation keeps; None when it keeps them all (no
        allocation yet, or the layer was built with only the kept ones)."""
        kept = (self.config.rank_pattern or {}).get(self.pattern_key)
        if kept is None or sum(kept) == self.lora_E.shape[0]:
            return None
        return torch.tensor(kept, device=self.lora_E.device)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets are written (Hugging Face peft's layout after allocation)."""
        keep = self.kept()
        if keep is None:
            return super().saved_state()
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}


class RankAllocator(ModelAdapter):
    """The model-level part: importance scores, the budget schedule, masking, and the orthogonality
    penalty. Its running scores live in plain attributes, so they are never written to the adapter file."""

    exports = ("update_and_allocate",)

    def __init__(self, config: AdaLoraConfig) -> None:
        super().__init__()
        self.config = config
        self.allocated_before = config.rank_pattern is not None  # layers were built at allocated ranks
        self.scores: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (Ī, Ū) per tensor

    @property
    def initial_budget(self) -> int:
        return sum(layer.lora_E.shape[0] for layer in self.layer_adapters.values())

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.layer_adapters)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and mask to the step's budget. Call once per optimizer step, after
        `loss.backward()` (and `optimizer.step()`) and before `optimizer.zero_grad()`; `AdaLoraCallback`
        does it inside transformers' Trainer."""
        if self.allocated_before:
            raise ValueError(
                "This AdaLoRA adapter's ranks were allocated already (its config has a rank_pattern, so its "
                "layers hold only the kept triplets). Keep training it without update_and_allocate, or "
                "start from an AdaLoraConfig without rank_pattern to allocate again."
            )
        end = self.config.total_step - self.config.tfinal
        if global_step < end:
            self._update_scores()
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                self._mask_to_budget(budget)
        elif global_step == end:  # the final allocation: fixed from here on
            self._mask_to_budget(self.target_budget)
            self.scores.clear()
        else:
            if self.config.rank_pattern is None:
                raise ValueError(
                    f"update_and_allocate({global_step}) comes after the budgeting phase, which ends at step "
                    f"total_step - tfinal = {end}, but no allocation was made. Call it at every optimizer "
                    "step from the start of training."
                )
            with torch.no_grad():
                for layer in self.layer_adapters.values():
                    keep = layer.kept()
                    if keep is not None:
                        layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The running importance scores (Ī, Ū) as "<module>/<tensor>/smooth" and ".../uncertainty"."""
        state = {}
        for (name, tensor_name), (smooth, uncertainty) in self.scores.items():
            state[f"{name}/{tensor_name}/smooth"] = smooth
            state[f"{name}/{tensor_name}/uncertainty"] = uncertainty
        return state

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        scores: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, tensor_name, kind = key.rsplit("/", 2)
            if name not in self.layer_adapters:
                raise ValueError(f"AdaLoRA training state names a layer this model lacks: {name!r}.")
            scores.setdefault((name, tensor_name), {})[kind] = tensor
        self.scores = {key: (pair["smooth"], pair["uncertainty"]) for key, pair in scores.items()}

    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for name, layer in self.layer_adapters.items():
                for tensor_name in ("lora_A", "lora_E", "lora_B"):
                    param = getattr(layer, tensor_name)
                    if param.grad is None:
                        raise ValueError(
                            f"update_and_allocate needs the gradients, but {name}.{tensor_name} has none. "
                            "Call it after loss.backward() and before optimizer.zero_grad(), with the "
                            "adapter trainable."
                        )
                    importance = (param * param.grad).abs()
                    zero = torch.zeros_like(param)
                    smooth, uncertainty = self.scores.get((name, tensor_name), (zero, zero))
                    smooth = b1 * smooth + (1 - b1) * importance
                    uncertainty = b2 * uncertainty + (1 - b2) * (importance - smooth).abs()
                    self.scores[(name, tensor_name)] = (smooth, uncertainty)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Sᵢ for every triplet of every layer, by module name."""
        if not self.scores:
            raise ValueError(
                "No importance scores yet: call update_and_allocate at every optimizer step from the first."
            )
        score = {key: smooth * uncertainty for key, (smooth, uncertainty) in self.scores.items()}
        return {
            name: score[(name, "lora_E")].view(-1)
            + (score[(name, "lora_A")].mean(dim=1) + score[(name, "lora_B")].mean(dim=0))
            for name in self.layer_adapters
        }

    def _mask_to_budget(self, budget: int) -> None:
        """Zero E for all but the `budget` best triplets (ties at the threshold are dropped together)."""
        scores = self.triplet_scores()
        pruned = self.initial_budget - budget
        threshold = (
            torch.kthvalue(torch.cat(list(scores.values())), pruned).values if pruned > 0 else -torch.inf
        )
        pattern = {}
        with torch.no_grad():
            for name, layer in self.layer_adapters.items():
                drop = scores[name] <= threshold
                layer.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
                pattern[layer.pattern_key] = (~drop).tolist()
        self.config.rank_pattern = pattern

    def orthogonality_penalty(self) -> torch.Tensor:
        """R = mean over every A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F."""
        norms = []
        for layer in self.layer_adapters.values():
            for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        return torch.stack(norms).mean()

    def finish_outputs(self, outputs: Any) -> Any:
        """In training, loss + orth_reg_weight · R."""
        loss = getattr(outputs, "loss", None)
        if loss is None or not self.training or self.config.inference_mode or not self.config.orth_reg_weight:
            return outputs
        outputs.loss = loss + self.config.orth_reg_weight * self.orthogonality_penalty().to(loss.device)
        return outputs


@register_method
class AdaLora(Lora):
    """LoRA's targeting and `bias` option, with SVD-form layers and a rank allocator."""

    config_class = AdaLoraConfig
    # LoRA's weighted merge and rank padding do not apply to the P Λ Q form with its rank budget: as for any
    # method, weighted merges are refused, and hot-swapping takes only an adapter of the same shapes
    weighted_config = Method.weighted_config
    padded_for_hotswap = Method.padded_for_hotswap

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def resolve_config(self, model: nn.Module, config: AdaLoraConfig) -> AdaLoraConfig:
        if config.target_modules is None:  # Hugging Face peft's default for the architecture, if it has one
            config.target_modules = DEFAULT_TARGETS.get(model_type(model))
        return config

    def layer_adapter(self, base_layer: nn.Module, module_name: str, config: AdaLoraConfig) -> LayerAdapter:
        key = f"{module_name}.lora_E"
        kept = (config.rank_pattern or {}).get(key)
        return SVDLinear(base_layer, config.init_r if kept is None else sum(kept), config, key)

    def model_adapter(self, model: nn.Module, config: AdaLoraConfig) -> ModelAdapter:
        return RankAllocator(config)

    def training_callbacks(self, config: AdaLoraConfig) -> list:
        return [_callback_class()()]


def _callback_class() -> type:
    """Build AdaLoraCallback on first use: it subclasses transformers' TrainerCallback, whose import
    pulls in the whole Trainer stack (seconds), which `import peftkit` should not pay for."""
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        """AdaLoRA's rank allocation in transformers' Trainer: `Trainer(..., callbacks=[AdaLoraCallback()])`.

        After each optimizer step, while the gradients still exist (the Trainer zeroes them next), it calls
        `model.update_and_allocate(step)` with step = the optimizer steps done, this one included (1 to
        max_steps), so that with total_step = max_steps the budget reaches target_r on the last step."""

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any
        ) -> None:
            total_step = self._config(model).total_step
            if state.max_steps and total_step != state.max_steps:
                warnings.warn(
                    f"AdaLoraConfig.total_step={total_step} but the Trainer will take {state.max_steps} "
                    "optimizer steps, so the rank budget schedule will not end where training does. Set "
                    "total_step to the Trainer's max_steps (epochs × steps per epoch).",
                    stacklevel=2,
                )

        def on_optimizer_step(
            self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any
        ) -> None:
            self._config(model)
            model.update_and_allocate(state.global_step + 1)

        @staticmethod
        def _config(model: nn.Module) -> AdaLoraConfig:
            configs = getattr(model, "peft_config", {})
            config = configs.get(getattr(model, "active_adapter", None)) if configs else None
            if not isinstance(config, AdaLoraConfig):
                raise ValueError(
                    "AdaLoraCallback needs the Trainer's model to be a PeftModel whose active adapter is "
                    f"AdaLoRA (get_peft_model(model, AdaLoraConfig(...))); got {type(model).__name__}."
                )
            return config

    AdaLoraCallback.__qualname__ = "AdaLoraCallback"
    return AdaLoraCallback


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":
        globals()[name] = _callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
