"""`add_weighted_adapter` against Hugging Face peft: the same two LoRA adapters in, the same merged logits
out, for every deterministic combination type; the merged adapter saved by peftkit loads in peft unchanged."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from test_peft_interop import batch, logits

import peftkit

DETERMINISTIC = ["svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
SAME_RANK = {"linear", "ties", "magnitude_prune"}


def two_adapters(tmp_path, build, same_rank: bool, gpt2: bool) -> list[str]:
    """Two LoRA adapters with random weights from peft, other ranks (unless `same_rank`) and targets."""
    if gpt2:
        options = [
            {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
            {
                "r": 4 if same_rank else 6,
                "lora_alpha": 3,
                "target_modules": ["c_attn", "c_fc"],
                "fan_in_fan_out": True,
            },
        ]
    else:
        options = [
            {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
            {
                "r": 4 if same_rank else 8,
                "lora_alpha": 5,
                "target_modules": ["q_proj", "k_proj", "down_proj"],
            },
        ]
    return saved_by_peft(tmp_path, build, peft.LoraConfig, options)


def saved_by_peft(tmp_path, build, config_class, options: list[dict]) -> list[str]:
    """One adapter per options dict, random weights, saved by peft; their folders."""
    folders = []
    for i, option in enumerate(options):
        model = peft.get_peft_model(build(), config_class(**option))
        randomize_adapters(model, seed=11 + i)
        folders.append(str(tmp_path / f"task{i}"))
        model.save_pretrained(folders[-1])
    return folders


def merged(lib, build, folders: list[str], weights=(0.7, -0.4), **options) -> torch.nn.Module:
    model = lib.PeftModel.from_pretrained(build(), folders[0], adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], list(weights), "merged", **options)
    model.set_adapter("merged")
    return model.eval()


@pytest.mark.parametrize("gpt2", [False, True], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_weighted_merge_gives_peft_logits(tmp_path, combination_type, gpt2):
    build = tiny_gpt2 if gpt2 else tiny_llama
    folders = two_adapters(tmp_path, build, combination_type in SAME_RANK, gpt2)
    options = {"combination_type": combination_type}
    if "ties" in combination_type or "prune" in combination_type:
        options["density"] = 0.4
    if combination_type.endswith("svd"):
        options["svd_rank"] = 5
    inputs = batch()
    base = logits(build(), inputs)
    ours = logits(merged(peftkit, build, folders, **options), inputs)
    theirs = logits(merged(peft, build, folders, **options), inputs)
    assert (ours - base).abs().max() > 1e-2  # the merge changed the model
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


def test_a_merged_adapter_saved_by_peftkit_loads_in_peft(tmp_path):
    folders = two_adapters(tmp_path, tiny_llama, False, False)
    model = merged(peftkit, tiny_llama, folders, combination_type="cat")
    expected = logits(model, batch())
    model.save_pretrained(str(tmp_path / "out"), selected_adapters=["merged"])
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "merged")).eval()
    torch.testing.assert_close(logits(reloaded, batch()), expected, atol=1e-5, rtol=1e-5)
    ours = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "merged"))
    merged_base = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged_base, batch()), expected, atol=1e-5, rtol=1e-5)


def test_weighted_ia3_gives_peft_logits(tmp_path):
    """IA3: l = Σ w_t l_t over the union of the targets, as Hugging Face peft combines them."""
    options = [
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    ]
    folders = saved_by_peft(tmp_path, tiny_llama, peft.IA3Config, options)
    results = [logits(merged(lib, tiny_llama, folders), batch()) for lib in (peftkit, peft)]
    assert (results[0] - logits(tiny_llama(), batch())).abs().max() > 1e-2
    torch.testing.assert_close(*results, atol=1e-5, rtol=1e-5)
