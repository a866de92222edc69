"""Diff pruning (Guo, Rush & Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning").

Each targeted weight W gets a task-specific difference, W + z ⊙ δ, with a dense δ (zero at the start) and a
per-weight hard-concrete gate z (Louizos, Welling & Kingma, 2018) that the expected-L0 penalty pushes shut:

    training   u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β),  z = min(1, max(0, s·(ζ − γ) + γ))
    evaluation z = min(1, max(0, σ(log α)·(ζ − γ) + γ))
    h = (W + z ⊙ δ) x + b,    loss = task loss + λ · Σ σ(log α − β·log(−γ/ζ)) / N

(the sum is the expected number of non-zero gates, E‖z‖₀; N is the number of weights the adapter targets).
At the end of training `model.finalize_diff_pruning()` projects each layer's gated diff z ⊙ δ onto the L0
ball: it keeps the round(density · numel) entries of largest magnitude and drops gates and dense tensors.
From then on h = (W + δ_sparse) x + b; the kept values stay trainable (the paper's fixed-mask fine-tuning),
merging adds δ_sparse into W, and the adapter file holds only the kept positions and values. Saved before
that (a checkpoint of training in progress), the file holds δ and log α themselves, dense: it loads as the
gated adapter it was, computing the same outputs and projecting to the same sparse diff when finalized.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, method_config
from ..domains import LAYER_SELECTION, Domain, number
from ..layer import LayerAdapter, ModelAdapter, NotMergeableError
from ..registry import Method, register_method
from ..targeting import ALL_LINEAR, is_linear


@method_config
class DiffPruningConfig(PeftConfig):
    """Diff pruning on linear layers (nn.Linear, transformers' Conv1D). Hugging Face peft has no such method;
    the file layout is peft's with `peft_type: "DIFF_PRUNING"`.

    density              share of each targeted weight matrix allowed to change, in (0, 1]; the paper's
                         0.5% is the default. `finalize_diff_pruning()` keeps round(density · numel) entries
                         per layer.
    target_modules       names (suffixes), a regex, or "all-linear" (the default: every linear layer but the
                         output head). `exclude_modules`, `layers_to_transform`, `layers_pattern` and
                         `modules_to_save` work as for every method.
    l0_penalty           λ: the training loss gets λ · E‖z‖₀ / N, that is λ times the expected share of
                         weights that change (so the term lies in [0, λ]). The paper adds λ' · E‖z‖₀ with
                         λ' = 1.25e-7; λ = λ' · N gives the same gradients, so the default λ = 1 is close to
                         the paper's on MiniLM-L6 with all linear layers targeted (N ≈ 10.8M, λ' · N ≈ 1.3).
    gate_temperature     β of the hard-concrete distribution (> 0). 1.0, as in the paper's code; Louizos et
                         al. use 2/3.
    gate_stretch_low     γ < 0, and `gate_stretch_high` ζ > 1: the sigmoid is stretched to (γ, ζ) and clipped
                         to [0, 1], so gates are exactly 0 or 1 with non-zero probability. The paper uses
                         γ = −1.5, ζ = 1.5 (Louizos et al. −0.1, 1.1).
    gate_init_log_alpha  log α at the start, for every gate. The paper's 5 opens 97% of sampled gates fully
                         and every evaluation gate.
    """

    peft_type: ClassVar[str] = "DIFF_PRUNING"
    default_learning_rate: ClassVar[float] = 5e-4
    # the paper's code's flags, and common names, for the options here
    option_aliases: ClassVar[dict[str, str]] = {
        "target_sparsity": "density",
        "sparsity": "density",
        "sparsity_pen": "l0_penalty",
        "temperature": "gate_temperature",
        "concrete_lower": "gate_stretch_low",
        "concrete_upper": "gate_stretch_high",
        "alpha_init": "gate_init_log_alpha",
    }
    field_domains: ClassVar[dict[str, Domain]] = {
        **PeftConfig.field_domains,
        **LAYER_SELECTION,
        "density": number(above=0, at_most=1, note="e.g. 0.005 for 0.5%"),
        "l0_penalty": number(at_least=0, note="0 turns the penalty off"),
        "gate_temperature": number(above=0, note="e.g. 1.0, or 2/3 as in Louizos et al."),
        "gate_stretch_low": number(below=0, note="e.g. -1.5"),
        "gate_stretch_high": number(above=1, note="e.g. 1.5"),
        "gate_init_log_alpha": number(note="e.g. 5"),
    }

    density: float = 0.005
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    l0_penalty: float = 1.0
    gate_temperature: float = 1.0
    gate_stretch_low: float = -1.5
    gate_stretch_high: float = 1.5
    gate_init_log_alpha: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


class DiffPruningLinear(LayerAdapter):
    """One weight's diff, in the base weight's own layout (Conv1D stores it (in, out)).

    While training: `diff_weight` δ and `gate_log_alpha` log α, both dense, h = (W + z ⊙ δ) x + b.
    After `project()` or loading a finalized file: `diff_indices` (flat positions in W) and `diff_values`,
    h = (W + δ_sparse) x + b.
    """

    def __init__(self, base_layer: nn.Module, config: DiffPruningConfig) -> None:
        super().__init__()
        self.weight_shape = tuple(base_layer.weight.shape)
        self.numel = base_layer.weight.numel()
        self.kept = round(config.density * self.numel)
        self.density = config.density
        self.transposed = type(base_layer).__name__ == "Conv1D"
        self.beta = config.gate_temperature
        self.gamma, self.zeta = config.gate_stretch_low, config.gate_stretch_high
        self.projected = False
        self.register_buffer("merged_original", None, persistent=False)
        self.train(base_layer.training)  # an eval-mode model samples no gates until model.train()
        if config.inference_mode:  # weights come from a file: hold the sparse form directly, no dense tensors
            self.hold_sparse(torch.arange(self.kept), torch.zeros(self.kept), requires_grad=False)
        else:
            self.diff_weight = nn.Parameter(torch.zeros(self.weight_shape))
            log_alpha = torch.full(self.weight_shape, float(config.gate_init_log_alpha))
            self.gate_log_alpha = nn.Parameter(log_alpha)

    # ---- the gate and the diff ---------------------------------------------------------------------

    def gate(self, sample: bool) -> torch.Tensor:
        """z: a reparameterised hard-concrete sample, or the deterministic gate used for evaluation."""
        log_alpha = self.gate_log_alpha
        if sample:
            u = torch.rand_like(log_alpha)
            s = torch.sigmoid((torch.logit(u, eps=1e-6) + log_alpha) / self.beta)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        """E‖z‖₀ = Σ P(z ≠ 0) = Σ σ(log α − β log(−γ/ζ))."""
        return torch.sigmoid(self.gate_log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def delta_weight(self) -> torch.Tensor:
        """The diff added to W, in W's layout: z ⊙ δ while gated, δ_sparse scattered into zeros after."""
        if self.projected:
            flat = self.diff_values.new_zeros(self.numel).scatter(0, self.diff_indices, self.diff_values)
            return flat.view(self.weight_shape)
        return self.gate(sample=self.training) * self.diff_weight

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        delta = self.delta_weight()
        x = x.to(delta.dtype)
        update = x @ delta if self.transposed else F.linear(x, delta)  # (W + Δ) x + b = base_out + Δ x
        return base_out + update.to(base_out.dtype)

    # ---- projection to the target density ----------------------------------------------------------

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of the `kept` entries of z ⊙ δ (evaluation gate) largest in magnitude."""
        with torch.no_grad():
            gated = (self.gate(sample=False) * self.diff_weight).flatten()
            indices = gated.abs().topk(self.kept).indices.sort().values
            return indices, gated[indices]

    def project(self) -> None:
        """Replace the gated dense diff by its projection; a no-op once projected."""
        if not self.projected:
            indices, values = self.projection()
            self.hold_sparse(indices, values, requires_grad=self.diff_weight.requires_grad)

    def hold_sparse(self, indices: torch.Tensor, values: torch.Tensor, requires_grad: bool) -> None:
        """Keep the diff as (diff_indices, diff_values), dropping the dense δ and log α."""
        for name in ("diff_weight", "gate_log_alpha"):
            if name in self._parameters:
                delattr(self, name)
        self.register_buffer("diff_indices", indices.to(torch.int64))
        self.diff_values = nn.Parameter(values, requires_grad=requires_grad)
        self.projected = True

    def hold_gated(self, diff: torch.Tensor, log_alpha: torch.Tensor, requires_grad: bool) -> None:
        """Keep the diff as the dense δ and log α of training, dropping a sparse diff."""
        for name in ("diff_indices", "diff_values"):
            if hasattr(self, name):
                delattr(self, name)
        self.diff_weight = nn.Parameter(diff, requires_grad=requires_grad)
        self.gate_log_alpha = nn.Parameter(log_alpha, requires_grad=requires_grad)
        self.projected = False

    # ---- merging -----------------------------------------------------------------------------------

    def merge(self, base_layer: nn.Module) -> None:
        """W[i] ← W[i] + δ_sparse[i] for the kept positions; the old entries are kept so unmerge is exact."""
        if not self.projected:
            raise NotMergeableError(
                "A diff-pruning adapter merges its sparse diff, which exists after training: call "
                "model.finalize_diff_pruning() to project it to the target density first."
            )
        flat = base_layer.weight.data.view(-1)
        self.merged_original = flat[self.diff_indices].clone()
        flat.index_add_(0, self.diff_indices, self.diff_values.detach().to(flat.dtype))

    def unmerge(self, base_layer: nn.Module) -> None:
        base_layer.weight.data.view(-1).index_copy_(0, self.diff_indices, self.merged_original)
        self.merged_original = None

    # ---- the adapter file --------------------------------------------------------------------------

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What the layer holds: `diff_indices` (int64 flat positions in W's layout) and `diff_values` once
        finalized; before, `diff_weight` δ and `gate_log_alpha` log α, dense in W's layout, so that a
        checkpoint saved in training loads as the gated adapter it is (projecting a copy would load as an
        adapter computing something else)."""
        if self.projected:
            return {"diff_indices": self.diff_indices, "diff_values": self.diff_values}
        return {"diff_weight": self.diff_weight, "gate_log_alpha": self.gate_log_alpha}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Check the stored diff (sparse, or dense and gated) against this layer, then hold it."""
        like = self.diff_values if self.projected else self.diff_weight
        forms = {"diff_indices", "diff_values"}, {"diff_weight", "gate_log_alpha"}
        if set(tensors) not in forms:
            raise ValueError(
                f"{where}: a diff-pruning layer is stored as diff_indices and diff_values (finalized) or as "
                f"diff_weight and gate_log_alpha (in training); the file has {sorted(tensors)}. Load it onto "
                "the base model it was trained on, with the adapter_config.json saved beside it."
            )
        values_in_file = {k: t for k, t in tensors.items() if k != "diff_indices"}
        not_float = [k for k, t in sorted(values_in_file.items()) if not t.is_floating_point()]
        if not_float:
            raise ValueError(
                f"{where}{not_float[0]} holds {tensors[not_float[0]].dtype} values in the file; diff-pruning "
                "values are floating point (float32, float16 or bfloat16)."
            )
        if "diff_weight" in tensors:
            wrong = [(k, tuple(t.shape)) for k, t in sorted(tensors.items()) if t.shape != self.weight_shape]
            if wrong:
                raise ValueError(
                    f"{where}{wrong[0][0]} has shape {wrong[0][1]} in the file, but this layer's weight is "
                    f"{self.weight_shape}. The base model differs from the one the adapter was saved with."
                )
            placed = {k: t.to(device=like.device, dtype=like.dtype) for k, t in tensors.items()}
            self.hold_gated(placed["diff_weight"], placed["gate_log_alpha"], requires_grad=like.requires_grad)
            return
        indices, values = tensors["diff_indices"], tensors["diff_values"]
        shapes = (tuple(indices.shape), tuple(values.shape))
        integer = not indices.is_floating_point() and not indices.is_complex() and indices.dtype != torch.bool
        if shapes != ((self.kept,), (self.kept,)) or not integer:
            raise ValueError(
                f"{where}diff_indices / diff_values have shapes {shapes[0]} / {shapes[1]} "
                f"({indices.dtype} indices) in the file, but density={self.density} keeps {self.kept} "
                f"integer positions of this layer's {self.numel} weights. The config's density or the base "
                "model differs from the one the adapter was saved with."
            )
        if self.kept and (
            indices.min() < 0 or indices.max() >= self.numel or indices.unique().numel() != self.kept
        ):
            raise ValueError(
                f"{where}diff_indices must be distinct positions in [0, {self.numel}); the file's are not."
            )
        values = values.to(device=like.device, dtype=like.dtype)
        self.hold_sparse(indices.to(like.device), values, requires_grad=like.requires_grad)


class DiffPruningRegularizer(ModelAdapter):
    """The model-wide part: the L0 term added to the training loss, and the projection at the end.

    Exported on the model while the adapter is active:
      `model.finalize_diff_pruning()`  project every layer's diff to the target density (see the module
                                       docstring); afterwards only `diff_values` train, so build a new
                                       optimizer if you fine-tune further with the mask fixed.
      `model.diff_pruning_penalty()`   λ · E‖z‖₀ / N, the term `forward` adds to `outputs.loss` in training;
                                       add it yourself when your model returns no loss (a plain module, or
                                       a loss computed outside the model).
    Optimising log α: the paper gives the gates their own optimizer (AdamW, learning rate 0.1) without
    weight decay, which would pull log α towards 0, where (with γ = −ζ) the evaluation gate closes; select
    them by the parameter name `gate_log_alpha`.
    """

    exports: ClassVar[tuple[str, ...]] = ("finalize_diff_pruning", "diff_pruning_penalty")

    def __init__(self, l0_penalty: float) -> None:
        super().__init__()
        self.l0_penalty = l0_penalty

    def gated_layers(self) -> list[DiffPruningLinear]:
        return [a for a in self.layer_adapters.values() if not a.projected]

    def diff_pruning_penalty(self) -> torch.Tensor:
        """λ · Σ_layers E‖z‖₀ / Σ_layers numel over the layers not yet projected (0 when none is left)."""
        layers = self.gated_layers()
        if not layers:
            return torch.zeros(())
        device = layers[0].gate_log_alpha.device
        expected = torch.stack([layer.expected_l0().to(device) for layer in layers]).sum()
        return self.l0_penalty * expected / sum(layer.numel for layer in layers)

    def finish_outputs(self, outputs: Any) -> Any:
        loss = getattr(outputs, "loss", None)
        if self.training and loss is not None and self.gated_layers():
            outputs.loss = loss + self.diff_pruning_penalty().to(loss.device)
        return outputs

    def finalize_diff_pruning(self) -> None:
        """Project every layer of this adapter to its round(density · numel) largest gated entries.

        Per layer rather than over the whole model (the paper projects the whole diff vector at once): the
        diffs of different layers have different scales, so one global threshold could leave some layers
        no change at all; per layer, every layer's size on disk follows from the config alone and loading
        can check it."""
        for layer in self.layer_adapters.values():
            layer.project()


@register_method
class DiffPruning(Method):
    config_class = DiffPruningConfig
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def layer_adapter(
        self, base_layer: nn.Module, module_name: str, config: DiffPruningConfig
    ) -> LayerAdapter:
        return DiffPruningLinear(base_layer, config)

    def model_adapter(self, model: nn.Module, config: DiffPruningConfig) -> ModelAdapter:
        return DiffPruningRegularizer(config.l0_penalty).train(model.training)

    def training_callbacks(self, config: DiffPruningConfig) -> list:
        """Projects the diff to its density when training ends, so that what is evaluated is what is saved."""
        from transformers import TrainerCallback

        class FinalizeDiffPruning(TrainerCallback):
            def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kw: Any):
                model.finalize_diff_pruning()

        return [FinalizeDiffPruning()]
