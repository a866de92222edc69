"""Merging task vectors: weighted sums, TIES, DARE and SVD re-factorisation, as plain tensor functions.

A task vector τ_t is what fine-tuning added for task t (a LoRA factor, or a delta weight s·B A). These
functions know nothing of models: `PeftModel.add_weighted_adapter` gathers each layer's τ_t and a
method's layer adapter writes the result back.

* Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"): τ = Σ_t w_t τ_t.
* TIES (Yadav et al., 2023, "TIES-Merging"): trim each τ_t to its largest-magnitude entries, elect a sign
  per entry, and average the weighted entries that agree with it.
* DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry with probability 1 − p and
  rescale the survivors by 1/p, then sum (DARE-linear) or TIES-merge (DARE-TIES).
"""

from __future__ import annotations

import dataclasses

import torch

COMBINATION_TYPES = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
PRUNING_TYPES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
SIGN_METHODS = ["total", "frequency"]


@dataclasses.dataclass(frozen=True)
class WeightedMerge:
    """How `add_weighted_adapter` combines adapters (Hugging Face peft's option names), checked once."""

    combination_type: str = "svd"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None

    def __post_init__(self) -> None:
        if self.combination_type not in COMBINATION_TYPES:
            raise ValueError(
                f"combination_type={self.combination_type!r} is not one peftkit knows; use one of "
                f"{COMBINATION_TYPES}."
            )
        if self.base_type in PRUNING_TYPES:
            density = self.density
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
                raise ValueError(
                    f"combination_type={self.combination_type!r} keeps a share `density` of each task "
                    f"vector's entries; pass density in (0, 1], got {density!r}."
                )
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(
                f"majority_sign_method={self.majority_sign_method!r} is not accepted; use one "
                f"of {SIGN_METHODS}."
            )
        if self.svd_rank is not None and (
            isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int) or self.svd_rank <= 0
        ):
            raise ValueError(f"svd_rank must be a positive integer or None, got {self.svd_rank!r}.")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise ValueError(f"svd_clamp is a quantile in (0, 1] or None, got {self.svd_clamp!r}.")

    @property
    def uses_svd(self) -> bool:
        return self.combination_type.endswith("svd")

    @property
    def base_type(self) -> str:
        """How the task vectors combine: "ties_svd" as "ties", "svd" as "linear"."""
        if self.combination_type == "svd":
            return "linear"
        return self.combination_type.removesuffix("_svd")


def _broadcast(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Weights (T,) shaped to multiply a stack of task vectors (T, ...)."""
    return weights.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Trim (TIES step 1): keep the ⌊density·n⌋ entries of largest |τ|, zero the rest."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def random_drop_and_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: τ ⊙ m / p with m_i ~ Bernoulli(p), p = density (the expectation of the result is τ)."""
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Elect sign (TIES step 2): γ = sign(Σ_t τ_t) ("total") or sign(Σ_t sign τ_t) ("frequency"), ties
    going to +; returns sign(τ_t) = γ for each task and entry."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def disjoint_merge(stacked: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """Disjoint merge (TIES step 3): τ = Σ_t [agrees_t] τ_t / max(1, Σ_t [agrees_t]), entry by entry."""
    kept = agrees.to(stacked.dtype)
    return (stacked * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1.0)


def combine(tensors: list[torch.Tensor], weights: list[float], plan: WeightedMerge) -> torch.Tensor:
    """One task vector from several of the same shape, by `plan.base_type`:

    linear          Σ w_t τ_t
    magnitude_prune Σ w_t trim(τ_t)
    ties            disjoint_merge(w_t trim(τ_t)) over the signs elected from the trimmed τ_t
    dare_linear     Σ w_t drop_rescale(τ_t)
    dare_ties       disjoint_merge(w_t drop_rescale(τ_t)) over the signs elected from the rescaled τ_t
    """
    kind = plan.base_type
    if kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune(t, plan.density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_drop_and_rescale(t, plan.density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * _broadcast(torch.tensor(weights, dtype=torch.float64), stacked)
    if kind in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, plan.majority_sign_method))
    return weighted.sum(dim=0)


def svd_factors(delta: torch.Tensor, rank: int, plan: WeightedMerge) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factorise a merged delta Δ (out × in) at rank r: Δ ≈ B A with B = U_r S_r, A = V_rᵀ, from
    Δ = U S Vᵀ; with `svd_clamp` = q both are clamped to ±(the q-quantile of their entries together)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=plan.svd_full_matrices, driver=plan.svd_driver)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if plan.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), plan.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return b, a
