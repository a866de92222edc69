"""BitFit: only bias terms train (as deltas on top of the frozen bias)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, snapshot, tiny_bert, tiny_gpt2, tiny_llama, train_and_check_frozen
from torch import nn

from peftkit import BitFitConfig, PeftModel, get_peft_model
from peftkit.layer import ModulesToSave, TunedLayer


def bias_entries(model: nn.Module, skip_prefix: str = "classifier") -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith(".bias") and not n.startswith(skip_prefix)
    )


def batch():
    g = torch.Generator().manual_seed(21)
    input_ids = torch.randint(3, 100, (4, 6), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, 4:] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def test_trainable_count_is_every_bias_plus_the_classification_head():
    reference = tiny_bert()
    # The SEQ_CLS head is trained in full (modules_to_save); every other bias gets a trainable delta.
    biases = bias_entries(reference)
    head = sum(p.numel() for p in reference.classifier.parameters())
    # per layer: q k v, attention.output dense + LN, intermediate, output dense + LN; embeddings LN; pooler
    assert biases == 2 * (3 * 32 + 32 + 32 + 64 + 32 + 32) + 32 + 32
    model = get_peft_model(tiny_bert(), BitFitConfig(task_type="SEQ_CLS"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == biases + head
    assert total == sum(p.numel() for p in reference.parameters()) + trainable
    assert isinstance(model.get_base_model().classifier, ModulesToSave)
    layers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, TunedLayer)]
    expected = [
        n.rsplit(".", 1)[0]
        for n, _ in reference.named_parameters()
        if n.endswith(".bias") and not n.startswith("classifier")
    ]
    assert layers == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.bias"))


def test_training_lowers_loss_and_leaves_the_base_bit_identical():
    base = tiny_bert()
    frozen = snapshot(base)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS"))
    train_and_check_frozen(model, frozen, batch(), lr=5e-2)
    deltas = [p for n, p in model.named_parameters() if n.endswith("bias_delta")]
    assert deltas and all(d.abs().sum() > 0 for d in deltas)


def test_forward_adds_the_bias_delta():
    reference = tiny_gpt2()
    model = get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=["c_attn"]))
    randomize_adapters(model)
    x = torch.randn(2, 3, 32)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    delta = layer.adapters["default"].bias_delta.detach()
    with torch.no_grad():
        ref = reference.transformer.h[0].attn.c_attn
        torch.testing.assert_close(layer(x), x @ ref.weight + ref.bias + delta)


def test_conv2d_bias_delta_is_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    reference = nn.Conv2d(2, 3, 3)
    reference.load_state_dict(model[0].state_dict())
    PeftModel(model, BitFitConfig())
    with torch.no_grad():
        model[0].adapters["default"].bias_delta.copy_(torch.tensor([1.0, -2.0, 3.0]))
        x = torch.randn(1, 2, 5, 5)
        expected = torch.nn.functional.conv2d(
            x, reference.weight, reference.bias + torch.tensor([1.0, -2.0, 3.0])
        )
        torch.testing.assert_close(model(x), expected)


def test_merge_equals_unmerged_and_unmerge_restores():
    reference = tiny_bert()
    model = get_peft_model(tiny_bert(), BitFitConfig(task_type="SEQ_CLS"))
    randomize_adapters(model)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
        assert not torch.allclose(expected, reference(**inputs).logits, atol=1e-3)
        model.merge_adapter()
        query = model.get_base_model().bert.encoder.layer[0].attention.self.query
        torch.testing.assert_close(
            query.base_layer.bias,
            reference.bert.encoder.layer[0].attention.self.query.bias + query.adapters["default"].bias_delta,
        )
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(
            query.base_layer.bias, reference.bert.encoder.layer[0].attention.self.query.bias
        )
        merged = model.merge_and_unload()
        assert not any(isinstance(m, (TunedLayer, ModulesToSave)) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = get_peft_model(tiny_bert(), BitFitConfig(task_type="SEQ_CLS"))
    randomize_adapters(model)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default


def test_model_without_biases_gets_a_clear_error():
    with pytest.raises(
        ValueError, match=r"BitFit trains bias terms, but no module of LlamaForCausalLM has a bias"
    ):
        get_peft_model(tiny_llama(), BitFitConfig())
    with pytest.raises(ValueError, match=r"no module of LlamaForCausalLM has a bias .* such as LoRA"):
        get_peft_model(tiny_llama(), BitFitConfig(target_modules=["q_proj"]))


def test_layers_to_transform_limits_the_biases():
    model = get_peft_model(tiny_bert(), BitFitConfig(task_type="SEQ_CLS", layers_to_transform=[1]))
    layers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, TunedLayer)]
    assert layers and all(".layer.1." in n for n in layers)
    assert (
        len(layers) == 8
    )  # query key value attention.output.dense + LN, intermediate.dense, output.dense + LN
