"""AdaLoRA against Hugging Face peft: adapters either library saves load in the other with the same logits,
before and after rank allocation; both write the same files; trained alike, both allocate the same ranks."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import peftkit
from peftkit.methods.adalora import AdaLoraConfig

CONFIGS = {"peft": peft.AdaLoraConfig, "peftkit": AdaLoraConfig}
MODELS = {"peft": peft.PeftModel, "peftkit": peftkit.PeftModel}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft-to-peftkit", "peftkit-to-peft"]
SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 6, "tinit": 1, "tfinal": 2, "lora_alpha": 16}

CASES = {
    "linear": (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}),
    "conv1d": (tiny_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "seq-cls": (tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "bias-lora-only": (
        tiny_gpt2,
        {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "lora_only"},
    ),
}


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1234))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def wrap(lib: str, build, **options) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (peft if lib == "peft" else peftkit).get_peft_model(build(), CONFIGS[lib](**options))


def load(lib: str, build, path: str, is_trainable: bool = False) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[lib].from_pretrained(build(), path, is_trainable=is_trainable)


def files(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return config, load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, saver, loader, tmp_path):
    build, options = CASES[case]
    inputs = batch()
    trained = wrap(saver, build, **SCHEDULE, **options)
    randomize_adapters(trained)  # E ≠ 0, so the adapter changes the logits
    trained.eval()
    expected = logits(trained, inputs)
    assert (expected - logits(build(), inputs)).abs().max() > 1e-2
    trained.save_pretrained(str(tmp_path))
    loaded = load(loader, build, str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_files_match_before_allocation(tmp_path):
    build, options = CASES["seq-cls"]
    for lib in CONFIGS:
        wrap(lib, build, **SCHEDULE, **options).save_pretrained(str(tmp_path / lib))
    (peft_config, peft_weights), (kit_config, kit_weights) = (
        files(str(tmp_path / "peft")),
        files(str(tmp_path / "peftkit")),
    )
    assert set(peft_config) - {"peft_version"} == set(kit_config)
    assert peft_config["rank_pattern"] is None and kit_config["rank_pattern"] is None
    assert {k: v.shape for k, v in peft_weights.items()} == {k: v.shape for k, v in kit_weights.items()}


def test_identical_training_allocates_identically(tmp_path):
    """The same adapter trained the same way in both libraries: the same losses, ranks and files; and each
    library's file, with layers at rank 0, loads in the other with the same logits."""
    options = {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    start = wrap("peft", tiny_llama, **options)
    randomize_adapters(start)
    start.save_pretrained(str(tmp_path / "start"))
    models = {lib: load(lib, tiny_llama, str(tmp_path / "start"), is_trainable=True) for lib in MODELS}
    allocate = {
        "peft": models["peft"].base_model.update_and_allocate,
        "peftkit": models["peftkit"].update_and_allocate,
    }
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = {lib: [] for lib in models}
    for lib, model in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        model.train()
        for step in range(1, 8):  # warm-up, budgeting, final allocation at step 4, fixed after
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            allocate[lib](step)
            optimizer.zero_grad()
            losses[lib].append(loss.item())
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that a rank-0 layer looks like an unsharded tensor
            model.save_pretrained(str(tmp_path / lib))
    torch.testing.assert_close(losses["peftkit"], losses["peft"], atol=1e-6, rtol=0)
    assert losses["peft"][-1] < losses["peft"][0] - 0.1  # training did something, orth penalty included

    (peft_config, peft_weights), (kit_config, kit_weights) = (
        files(str(tmp_path / "peft")),
        files(str(tmp_path / "peftkit")),
    )
    assert set(peft_config) - {"peft_version"} == set(kit_config)
    pattern = kit_config["rank_pattern"]
    assert pattern == peft_config["rank_pattern"]
    ranks = sorted(sum(kept) for kept in pattern.values())
    assert sum(ranks) == 2 * 6 and ranks[0] == 0 and len(set(ranks)) > 2, ranks  # uneven, some layers at 0
    assert {k: v.shape for k, v in kit_weights.items()} == {k: v.shape for k, v in peft_weights.items()}
    for key, value in peft_weights.items():
        torch.testing.assert_close(kit_weights[key], value, atol=1e-6, rtol=1e-5)

    inputs = batch()
    for saver, loader in DIRECTIONS:
        loaded = load(loader, tiny_llama, str(tmp_path / saver)).eval()
        torch.testing.assert_close(
            logits(loaded, inputs), logits(models[saver], inputs), atol=1e-5, rtol=1e-5
        )
