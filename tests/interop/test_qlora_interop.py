"""QLoRA against Hugging Face peft + bitsandbytes, on bases that transformers quantizes on loading
(`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`): `peftkit.quantize` builds the same
quantized layers, adapters move both ways with the same outputs and the same files, and merging into a
4-bit base stores the same bytes.

Outputs are compared in train mode (the models have no dropout), where both libraries' bases dequantize and
multiply in float32; in eval mode under no_grad bitsandbytes' CPU packing changes how the base computes.
"""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, one_torch_thread, randomize_adapters, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftkit

bnb = pytest.importorskip("bitsandbytes")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft-to-peftkit", "peftkit-to-peft"]
MIN_EFFECT = 1e-2  # the adapter must move some logit by at least this much, or the comparison proves nothing
CASES = {  # quantization, LoraConfig options
    "4bit-lora": ("4bit", {"target_modules": ["q_proj", "v_proj"]}),
    "4bit-dora": ("4bit", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    "4bit-all-linear": ("4bit", {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}),
    "8bit-lora": ("8bit", {"target_modules": ["q_proj", "v_proj"]}),
    "8bit-dora": ("8bit", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every test here runs bitsandbytes."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny Llama (hidden size 64) saved as a transformers checkpoint, to be loaded quantized."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    tiny_llama(hidden_size=64).save_pretrained(path)
    return path


def load_quantized(checkpoint: str, kind: str) -> nn.Module:
    if kind == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu")


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1234))
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def saved(path: str) -> tuple[dict, dict[str, torch.Size]]:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return config, {k: v.shape for k, v in load_file(os.path.join(path, "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantize_builds_what_bitsandbytesconfig_loading_builds(kind, checkpoint):
    ours = peftkit.quantize(tiny_llama(hidden_size=64), bits=int(kind[0]))
    theirs = load_quantized(checkpoint, kind)
    ours_layers, their_layers = quantized_layers(ours), quantized_layers(theirs)
    assert list(ours_layers) == list(their_layers) and len(ours_layers) == 14  # the head stays nn.Linear
    for name, layer in ours_layers.items():
        other = their_layers[name]
        assert type(layer) is type(other), name
        assert torch.equal(layer.weight.data, other.weight.data), name
        if kind == "4bit":
            mine, their = layer.weight.quant_state.as_dict(), other.weight.quant_state.as_dict()
            assert mine.keys() == their.keys(), name
            for key, value in mine.items():
                assert torch.equal(value, their[key]) if torch.is_tensor(value) else value == their[key], key
        else:
            assert torch.equal(layer.weight.SCB, other.weight.SCB), name
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_round_trip(case, saver, loader, checkpoint, tmp_path):
    kind, options = CASES[case]
    base_logits = logits(load_quantized(checkpoint, kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = LIBS[saver].get_peft_model(
            load_quantized(checkpoint, kind), LIBS[saver].LoraConfig(r=4, **options)
        )
        randomize_adapters(trained)
        expected = logits(trained)
        assert (expected - base_logits).abs().max() > MIN_EFFECT, "the adapter barely changes the logits"
        trained.save_pretrained(str(tmp_path / saver))

        loaded = LIBS[loader].PeftModel.from_pretrained(
            load_quantized(checkpoint, kind), str(tmp_path / saver)
        )
        torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
        loaded.save_pretrained(str(tmp_path / loader))  # the same adapter written by the other library

    (config_a, tensors_a), (config_b, tensors_b) = saved(str(tmp_path / saver)), saved(str(tmp_path / loader))
    assert tensors_a == tensors_b
    assert config_a.keys() - {"peft_version"} == config_b.keys() - {"peft_version"}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merging_into_a_4bit_base_stores_what_peft_stores(use_dora, checkpoint, tmp_path):
    """Dequantize, add, requantize with the layer's settings: the same bytes as Hugging Face peft's merge."""
    options = {"target_modules": ["q_proj", "v_proj"], "use_dora": use_dora}
    model = peftkit.get_peft_model(load_quantized(checkpoint, "4bit"), peftkit.LoraConfig(r=4, **options))
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            load_quantized(checkpoint, "4bit"), str(tmp_path)
        ).merge_and_unload()
    ours = model.merge_and_unload()
    their_layers = quantized_layers(theirs)
    for name, layer in quantized_layers(ours).items():
        assert torch.equal(layer.weight.data, their_layers[name].weight.data), name
        torch.testing.assert_close(
            layer.weight.quant_state.absmax, their_layers[name].weight.quant_state.absmax
        )
