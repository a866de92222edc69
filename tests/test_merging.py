"""The merge algorithms on tensors (against hand-computed values and statistics), and
`add_weighted_adapter`'s DARE types and refusals on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_llama

import peftkit
from peftkit.merging import (
    WeightedMerge,
    combine,
    disjoint_merge,
    magnitude_prune,
    majority_sign_mask,
    random_drop_and_rescale,
    svd_factors,
)


def test_magnitude_prune_keeps_the_largest_entries():
    tensor = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    assert magnitude_prune(tensor, 0.5).tolist() == [[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    stacked = torch.tensor([[1.0, -2.0, 3.0], [-3.0, -1.0, 1.0]])
    assert majority_sign_mask(stacked, "total").tolist() == [[False, True, True], [True, True, True]]
    # "frequency" counts votes: 1 − 1 = 0 on the first entry, a tie that goes to +
    assert majority_sign_mask(stacked, "frequency").tolist() == [[True, True, True], [False, True, True]]
    agrees = majority_sign_mask(stacked, "total")
    assert disjoint_merge(stacked, agrees).tolist() == [-3.0, -1.5, 2.0]


def test_combine_ties_equals_the_written_out_steps():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    weights = [0.5, -1.0, 2.0]
    trimmed = torch.stack([magnitude_prune(t, 0.3) for t in tensors])
    signs = majority_sign_mask(trimmed)
    weighted = trimmed * torch.tensor(weights).view(-1, 1, 1)
    expected = (weighted * signs).sum(0) / signs.sum(0).clamp(min=1)
    plan = WeightedMerge("ties", density=0.3)
    torch.testing.assert_close(combine(tensors, weights, plan), expected)
    linear = sum(w * t for w, t in zip(weights, tensors, strict=True))
    torch.testing.assert_close(combine(tensors, weights, WeightedMerge("linear")), linear)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_keeps_a_share_density_of_entries_and_rescales_them_by_its_inverse(density):
    torch.manual_seed(0)
    tensor = torch.randn(400, 500) + 5.0  # no zero entries, so a zero means dropped
    dropped = random_drop_and_rescale(tensor, density)
    kept = dropped != 0
    n = tensor.numel()
    share = kept.float().mean().item()
    assert abs(share - density) < 4 * (density * (1 - density) / n) ** 0.5  # four standard errors
    torch.testing.assert_close(dropped[kept], tensor[kept] / density)
    assert abs(dropped.mean().item() / tensor.mean().item() - 1) < 0.02  # E[drop_rescale(τ)] = τ


def test_dare_at_density_one_is_its_deterministic_twin():
    tensors = [torch.randn(4, 3), torch.randn(4, 3)]
    for dare, twin in [("dare_linear", "linear"), ("dare_ties", "ties")]:
        torch.testing.assert_close(
            combine(tensors, [0.6, 0.4], WeightedMerge(dare, density=1.0)),
            combine(tensors, [0.6, 0.4], WeightedMerge(twin, density=1.0)),
        )


def test_svd_factors_recover_a_low_rank_delta_and_clamp():
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 3, generator=generator) @ torch.randn(3, 9, generator=generator)
    b, a = svd_factors(delta, 3, WeightedMerge("svd"))
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    b, a = svd_factors(delta, 3, WeightedMerge("svd", svd_clamp=0.5))
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.5)
    assert max(b.abs().max(), a.abs().max()) <= high.abs() + 1e-6 and (b.abs() == high.abs()).any()


def lora_model(ranks=(4, 4), use_dora=False) -> peftkit.PeftModel:
    model = peftkit.get_peft_model(
        tiny_llama(), peftkit.LoraConfig(r=ranks[0], target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    )
    model.add_adapter("b", peftkit.LoraConfig(r=ranks[1], target_modules=["q_proj", "k_proj"]))
    randomize_adapters(model)
    return model.eval()


def merged_logits(model, input_ids, name, **options) -> torch.Tensor:
    model.add_weighted_adapter(["default", "b"], [0.6, 0.4], name, **options)
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize(
    ("dare", "twin"),
    [
        ("dare_linear", "linear"),
        ("dare_ties", "ties"),
        ("dare_linear_svd", "svd"),
        ("dare_ties_svd", "ties_svd"),
    ],
)
def test_dare_merges_at_density_one_give_their_twins_logits(input_ids, dare, twin):
    model = lora_model()
    twin_options = {"density": 1.0} if "ties" in twin else {}
    expected = merged_logits(model, input_ids, "twin", combination_type=twin, **twin_options)
    got = merged_logits(model, input_ids, "dare", combination_type=dare, density=1.0)
    torch.testing.assert_close(got, expected)


def test_a_merged_adapter_is_ordinary_and_frozen_until_activated(input_ids):
    model = lora_model()
    model.add_weighted_adapter(["default", "b"], [1.0, -1.0], "diff", combination_type="cat")
    assert model.active_adapters == ["default"]
    assert model.peft_config["diff"].r == 8 and model.peft_config["diff"].target_modules == [
        "k_proj",
        "q_proj",
        "v_proj",
    ]
    # cat is exact: the merged update is s_a·B_a A_a − s_b·B_b A_b in every layer
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    expected = layer.adapters["default"].delta_weight() - layer.adapters["b"].delta_weight()
    torch.testing.assert_close(layer.adapters["diff"].delta_weight(), expected)
    assert not any(p.requires_grad for p in layer.adapters["diff"].parameters())
    model.set_adapter("diff")
    assert all(p.requires_grad for p in layer.adapters["diff"].parameters())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"combination_type": "average"}, "is not one peftkit knows"),
        ({"combination_type": "ties"}, "pass density in (0, 1]"),
        ({"combination_type": "dare_linear", "density": 1.5}, "pass density in (0, 1]"),
        (
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"},
            "majority_sign_method",
        ),
        ({"combination_type": "svd", "svd_rank": 0}, "svd_rank must be a positive integer"),
        ({"combination_type": "linear", "weights": [1.0]}, "one weight per adapter"),
        ({"combination_type": "linear", "adapter_name": "b"}, "exists already"),
        ({"combination_type": "linear", "adapters": ["default", "nope"]}, "No adapter named ['nope']"),
    ],
)
def test_bad_merge_options_are_refused_and_leave_no_adapter(call, message):
    model = lora_model()
    args = {"adapters": ["default", "b"], "weights": [0.5, 0.5], "adapter_name": "m", **call}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        model.add_weighted_adapter(**args)
    assert "m" not in model.peft_config


def test_ranks_that_differ_need_cat_or_svd():
    model = lora_model(ranks=(4, 8))
    with pytest.raises(ValueError, match=r"theirs are \[4, 8\]. Use 'cat' \(rank 12\)"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m", combination_type="linear")
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m", combination_type="svd")
    assert model.peft_config["m"].r == 8


def test_dora_and_other_methods_and_shared_heads_are_refused():
    with pytest.raises(ValueError, match="DoRA adapters cannot be combined"):
        lora_model(use_dora=True).add_weighted_adapter(
            ["default", "b"], [0.5, 0.5], "m", combination_type="svd"
        )
    model = lora_model()
    model.add_adapter("ia3", peftkit.IA3Config())
    with pytest.raises(ValueError, match=r"adapters of one method; .* \['LORA', 'IA3'\]"):
        model.add_weighted_adapter(["default", "ia3"], [0.5, 0.5], "m")
    adalora = peftkit.get_peft_model(tiny_llama(), peftkit.AdaLoraConfig(total_step=10))
    adalora.add_adapter("b", peftkit.AdaLoraConfig(total_step=10))
    with pytest.raises(ValueError, match="ADALORA adapters cannot be combined"):
        adalora.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m", combination_type="svd")
    bitfit = peftkit.get_peft_model(tiny_bert(), peftkit.BitFitConfig())
    bitfit.add_adapter("b", peftkit.BitFitConfig())
    with pytest.raises(ValueError, match=r"BITFIT adapters cannot be combined .* are \['IA3', 'LORA'\]"):
        bitfit.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m")
    classifier = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(task_type="SEQ_CLS"))
    classifier.add_adapter("b", peftkit.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"own copy of \['classifier'\] \(modules_to_save"):
        classifier.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m", combination_type="linear")


def test_an_rslora_merge_computes_what_was_combined():
    """The new adapter's own scale (α/√r with α = r) is divided out (peft keeps it: √r too large)."""
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"]}
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**config))
    model.add_adapter("b", peftkit.LoraConfig(**config))
    randomize_adapters(model)
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "m", combination_type="cat")
    adapters = model.get_base_model().model.layers[0].self_attn.q_proj.adapters
    expected = 0.5 * adapters["default"].delta_weight() + 2.0 * adapters["b"].delta_weight()
    torch.testing.assert_close(adapters["m"].delta_weight(), expected)


def test_ia3_combines_linearly_only():
    model = peftkit.get_peft_model(tiny_llama(), peftkit.IA3Config())
    model.add_adapter("b", peftkit.IA3Config())
    with pytest.raises(
        ValueError, match="IA3 adapters combine as l = Σ w_t l_t only; combination_type='ties'"
    ):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "m", combination_type="ties", density=0.5)
    other = peftkit.IA3Config(target_modules=["down_proj"], feedforward_modules=[])
    model.add_adapter("c", other)
    with pytest.raises(ValueError, match="feedforward_modules differ"):
        model.add_weighted_adapter(["default", "c"], [0.5, 0.5], "m", combination_type="linear")
    assert "m" not in model.peft_config
