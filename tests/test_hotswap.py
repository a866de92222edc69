"""hotswap_adapter and prepare_model_for_compiled_hotswap: a swapped-in adapter computes what it computes
when loaded on its own, a compiled model runs it without recompiling, and what cannot be swapped is refused
before anything changes."""

from __future__ import annotations

import peft
import peft.utils.hotswap
import pytest
import torch
import torch._dynamo
from conftest import randomize_adapters, tiny_llama

from peftkit import (
    IA3Config,
    LoraConfig,
    PeftModel,
    get_peft_model,
    hotswap_adapter,
    prepare_model_for_compiled_hotswap,
)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def saved(folder, config, seed: int) -> str:
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return str(folder)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def alone(folder: str) -> torch.Tensor:
    """The outputs of the adapter in `folder` loaded on its own."""
    return logits(PeftModel.from_pretrained(tiny_llama(), folder))


def lora(**options) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **options})


@pytest.mark.parametrize(
    "second",
    [lora(lora_alpha=32), lora(use_rslora=True, lora_alpha=3), lora(r=4, rank_pattern={"v_proj": 2})],
    ids=["other-alpha", "rslora", "rank-pattern"],
)
def test_swapped_adapter_computes_as_if_loaded_alone(tmp_path, second):
    first, other = saved(tmp_path / "a", lora(), 1), saved(tmp_path / "b", second, 2)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    hotswap_adapter(model, other, adapter_name="default")
    after = logits(model)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, alone(other), rtol=1e-5, atol=1e-5)


def test_prepared_model_takes_smaller_and_larger_ranks_and_saves_faithfully(tmp_path):
    first = saved(tmp_path / "a", lora(r=2, lora_alpha=4), 1)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    config = model.peft_config["default"]
    user_config = {"default": lora(r=2, lora_alpha=4)}
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=user_config)
    torch.testing.assert_close(logits(model), before, rtol=1e-6, atol=1e-6)  # padding changes nothing
    assert model.peft_config["default"].r == user_config["default"].r == 8
    assert model.peft_config["default"] is not config
    model.save_pretrained(tmp_path / "padded")  # the padded adapter reloads as it computes
    torch.testing.assert_close(alone(str(tmp_path / "padded")), before, rtol=1e-5, atol=1e-5)
    for rank, seed in ((4, 2), (8, 3)):
        other = saved(tmp_path / f"r{rank}", lora(r=rank, lora_alpha=rank * 3), seed)
        hotswap_adapter(model, other)
        torch.testing.assert_close(logits(model), alone(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_compiled_model_runs_the_swapped_adapter_without_recompiling(tmp_path, use_dora):
    first = saved(tmp_path / "a", lora(r=2, use_dora=use_dora), 1)
    others = [saved(tmp_path / f"{r}", lora(r=r, lora_alpha=5 * r, use_dora=use_dora), r) for r in (4, 2)]
    model = PeftModel.from_pretrained(tiny_llama(), first)
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(logits(compiled), alone(first), rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for other in others:
            hotswap_adapter(compiled, other)
            torch.testing.assert_close(logits(compiled), alone(other), rtol=1e-5, atol=1e-5)


def test_same_shapes_of_any_method_swap(tmp_path):
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    first, other = saved(tmp_path / "a", config, 1), saved(tmp_path / "b", config, 2)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    hotswap_adapter(model, other)
    torch.testing.assert_close(logits(model), alone(other), rtol=1e-6, atol=1e-6)


def test_swaps_as_hugging_face_peft_does(tmp_path):
    first, other = saved(tmp_path / "a", lora(r=2), 1), saved(tmp_path / "b", lora(r=4, lora_alpha=8), 2)
    ours = PeftModel.from_pretrained(tiny_llama(), first)
    prepare_model_for_compiled_hotswap(ours, target_rank=4)
    hotswap_adapter(ours, other)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), first)
    peft.utils.hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=4)
    peft.utils.hotswap.hotswap_adapter(theirs, other, adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            lora(r=8),
            r"rank here is 8, above the 4 .*prepare_model_for_compiled_hotswap\(model, target_rank=8\)",
        ),
        (
            lora(target_modules=["q_proj", "k_proj"]),
            r"adapts other layers; it has 4 weights 'default' has no",
        ),
        (lora(use_dora=True), r"use_dora=True where this adapter has False"),
        (lora(lora_dropout=0.1), r"lora_dropout=0.1 where this adapter has 0.0"),
        (IA3Config(), r"it is a IA3 adapter, not a LORA one"),
        (lora(init_lora_weights="olora"), r"'olora' changed the base weights"),
    ],
    ids=["larger-rank", "other-targets", "dora", "dropout", "other-method", "olora"],
)
def test_what_cannot_be_swapped_is_refused_and_changes_nothing(tmp_path, second, message):
    first, other = saved(tmp_path / "a", lora(), 1), saved(tmp_path / "b", second, 2)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        hotswap_adapter(model, other)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_adapter_and_bad_preparations_are_refused(tmp_path):
    first = saved(tmp_path / "a", lora(), 1)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights .* unmerge_adapter\(\) first"):
        hotswap_adapter(model, first)
    model.unmerge_adapter()
    with pytest.raises(ValueError, match=r"No adapter named \['other'\]"):
        hotswap_adapter(model, first, adapter_name="other")
    with pytest.raises(ValueError, match=r"rank 4, above target_rank=2"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match=r"check_compiled='never'"):
        prepare_model_for_compiled_hotswap(model, target_rank=8, check_compiled="never")
    with pytest.raises(ValueError, match=r"before torch.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"), target_rank=8)
    ia3 = PeftModel.from_pretrained(tiny_llama(), saved(tmp_path / "ia3", IA3Config(), 1))
    with pytest.raises(ValueError, match=r"no adapter here has a rank to grow .*'IA3'"):
        prepare_model_for_compiled_hotswap(ia3, target_rank=8)
    with pytest.raises(TypeError, match="works on a PeftModel"):
        hotswap_adapter(tiny_llama(), first)
