"""A combined model saved by peftkit, read part by part by Hugging Face peft: each part that peft has a method
for loads there alone (the first from the top level, the others from their sub-folders) and gives the logits
peftkit gives with that part alone active."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from test_peft_interop import batch, logits

import peftkit

PARTS = {
    "llama": (
        tiny_llama,
        {
            "default": peftkit.LoraConfig(target_modules=["q_proj", "v_proj"], r=4),
            "ffn": peftkit.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
            "prompt": peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
            "block": peftkit.BottleneckConfig(target_modules=["mlp"], adapter_size=4),  # not in peft
        },
    ),
    "gpt2": (
        tiny_gpt2,
        {
            "default": peftkit.LoraConfig(target_modules=["c_fc"], use_dora=True),
            "block": peftkit.BottleneckConfig(target_modules=["mlp"], adapter_size=4),
            "prefix": peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
            "attn": peftkit.AdaLoraConfig(target_modules=["c_attn"], init_r=4, target_r=2, total_step=10),
        },
    ),
}


@pytest.mark.parametrize("model_kind", list(PARTS))
def test_each_part_of_a_combination_loads_in_peft(model_kind, tmp_path):
    build, parts = PARTS[model_kind]
    names = list(parts)
    model = peftkit.get_peft_model(build(), parts[names[0]])
    for name in names[1:]:
        model.add_adapter(name, parts[name])
    model.set_adapter(names)
    randomize_adapters(model, seed=9)
    model.eval()
    inputs = batch()
    together = logits(model, inputs)
    model.save_pretrained(str(tmp_path))
    restored = peftkit.PeftModel.from_composition(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(restored, inputs), together, atol=1e-6, rtol=1e-5)

    loaded_in_peft = 0
    for name in names:
        if isinstance(parts[name], peftkit.BottleneckConfig):
            continue
        folder = str(tmp_path) if name == "default" else str(tmp_path / name)
        theirs = peft.PeftModel.from_pretrained(build(), folder).eval()
        model.set_adapter(name)
        torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), atol=1e-5, rtol=1e-4)
        loaded_in_peft += 1
    assert loaded_in_peft == 3
