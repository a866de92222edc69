"""IA3: learned vectors rescaling attention outputs and feed-forward inputs, against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, snapshot, tiny_bert, tiny_gpt2, tiny_llama, train_and_check_frozen
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import PeftModel, get_peft_model
from peftkit.layer import TunedLayer, is_adapter_parameter
from peftkit.methods.ia3 import (
    DEFAULT_FEEDFORWARD,
    DEFAULT_TARGETS,
    IA3Config,
    IA3Conv,
    IA3Linear,
)

LAYERS = ["lin", "conv1d", "conv"]


class Toy(nn.Module):
    """One layer of every kind IA3 adapts; the convolution is grouped, so a feed-forward vector must be
    laid out per group when merged."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv1d = Conv1D(5, 6)  # GPT-2's linear layer: weight stored (in=6, out=5)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def toy_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "lin": torch.randn(4, 6, generator=g),
        "conv1d": torch.randn(2, 3, 6, generator=g),
        "conv": torch.randn(2, 4, 5, 5, generator=g),
    }


def wrap_toy(feedforward: bool, **options) -> tuple[Toy, Toy]:
    """(reference copy, toy with IA3 on every layer, all feed-forward or none, random vectors)."""
    toy = Toy()
    config = IA3Config(target_modules=LAYERS, feedforward_modules=LAYERS if feedforward else [], **options)
    PeftModel(toy, config)
    return Toy(), toy


def vector(layer: TunedLayer, name: str = "default") -> torch.Tensor:
    return layer.adapters[name].ia3_l.detach()


def gpt2_with_biases() -> nn.Module:
    """Tiny GPT-2 with non-zero biases (transformers starts them at zero), so rescaling them shows."""
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1234))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# ---- forward equations ---------------------------------------------------------------------------


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scaled", "feed-forward"])
def test_forward_matches_the_equations(feedforward):
    ref, toy = wrap_toy(feedforward, init_ia3_weights=False)
    inputs = toy_inputs()
    with torch.no_grad():
        # nn.Linear (W is (out, in)): l ⊙ (W x + b), or W (l ⊙ x) + b
        x, vec = inputs["lin"], vector(toy.lin)
        if feedforward:
            assert vec.shape == (1, 6)
            expected = (x * vec[0]) @ ref.lin.weight.T + ref.lin.bias
        else:
            assert vec.shape == (5, 1)
            expected = vec[:, 0] * (x @ ref.lin.weight.T + ref.lin.bias)
        torch.testing.assert_close(toy.lin(x), expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(toy.lin(x), ref.lin(x), atol=1e-2)

        # Conv1D stores W as (in, out): l ⊙ (x W + b), or (l ⊙ x) W + b; l keeps peft's (out, 1) / (1, in)
        x, vec = inputs["conv1d"], vector(toy.conv1d)
        if feedforward:
            assert vec.shape == (1, 6)
            expected = (x * vec[0]) @ ref.conv1d.weight + ref.conv1d.bias
        else:
            assert vec.shape == (5, 1)
            expected = vec[:, 0] * (x @ ref.conv1d.weight + ref.conv1d.bias)
        torch.testing.assert_close(toy.conv1d(x), expected, atol=1e-6, rtol=1e-5)

        # Conv2d: l per output channel on conv(x, W) + b, or per input channel on x
        x, vec, conv = inputs["conv"], vector(toy.conv), ref.conv
        if feedforward:
            assert vec.shape == (1, 4, 1, 1)
            expected = F.conv2d(x * vec, conv.weight, conv.bias, padding=1, groups=2)
        else:
            assert vec.shape == (1, 6, 1, 1)
            expected = vec * F.conv2d(x, conv.weight, conv.bias, padding=1, groups=2)
        torch.testing.assert_close(toy.conv(x), expected, atol=1e-6, rtol=1e-5)


def test_two_active_adapters_multiply_their_vectors():
    ref, toy = Toy(), Toy()
    model = PeftModel(toy, IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False))
    model.add_adapter(
        "ff", IA3Config(target_modules=["lin"], feedforward_modules=["lin"], init_ia3_weights=False)
    )
    model.set_adapter(["default", "ff"])
    x = toy_inputs()["lin"]
    out_scale, in_scale = vector(toy.lin)[:, 0], vector(toy.lin, "ff")[0]
    with torch.no_grad():
        expected = out_scale * ((x * in_scale) @ ref.lin.weight.T + ref.lin.bias)
        torch.testing.assert_close(toy.lin(x), expected, atol=1e-6, rtol=1e-5)


# ---- initialisation and defaults -----------------------------------------------------------------


def test_default_init_is_ones_and_gives_the_base_model_exactly():
    inputs = batch()
    model = get_peft_model(tiny_llama(), IA3Config())
    vectors = [p for n, p in model.named_parameters() if n.endswith("ia3_l")]
    assert len(vectors) == 6 and all(torch.equal(v, torch.ones_like(v)) for v in vectors)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, tiny_llama()(**inputs).logits)


def test_false_init_is_standard_normal():
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(64, 4096))
    PeftModel(module, IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False))
    vec = vector(module[0])
    assert vec.shape == (4096, 1)
    # 4096 draws of N(0, 1): mean within 4 standard errors of 0, std within a few percent of 1
    assert abs(vec.mean().item()) < 4 / 64
    assert vec.std().item() == pytest.approx(1.0, rel=0.05)


def adapted(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Adapted module name -> the shape of its vector."""
    return {
        n: tuple(m.adapters["default"].ia3_l.shape)
        for n, m in model.named_modules()
        if isinstance(m, TunedLayer)
    }


def test_model_type_defaults():
    llama = get_peft_model(tiny_llama(), IA3Config()).get_base_model()
    expected = {}
    for i in range(2):
        expected |= {
            f"model.layers.{i}.self_attn.k_proj": (16, 1),  # output-scaled: (out, 1), 2 kv heads × 8
            f"model.layers.{i}.self_attn.v_proj": (16, 1),
            f"model.layers.{i}.mlp.down_proj": (1, 64),  # feed-forward: (1, in)
        }
    assert adapted(llama) == expected

    gpt2 = get_peft_model(tiny_gpt2(), IA3Config()).get_base_model()
    assert adapted(gpt2) == {
        **{f"transformer.h.{i}.attn.c_attn": (96, 1) for i in range(2)},
        **{f"transformer.h.{i}.mlp.c_proj": (1, 128) for i in range(2)},  # attn.c_proj is not a target
    }

    bert = get_peft_model(tiny_bert(), IA3Config(task_type="SEQ_CLS")).get_base_model()
    prefix = "bert.encoder.layer.{}."
    assert adapted(bert) == {
        prefix.format(i) + name: shape
        for i in range(2)
        for name, shape in [
            ("attention.self.key", (32, 1)),
            ("attention.self.value", (32, 1)),
            ("attention.output.dense", (1, 32)),  # "output.dense" names both dense layers, as in peft
            ("output.dense", (1, 64)),
        ]
    }


def test_default_tables_are_consistent():
    """Every architecture with default targets has feed-forward defaults, and those are among its targets."""
    assert set(DEFAULT_TARGETS) == set(DEFAULT_FEEDFORWARD)
    for model_type, targets in DEFAULT_TARGETS.items():
        assert set(DEFAULT_FEEDFORWARD[model_type]) <= set(targets), model_type


def test_conv3d_and_layer_kinds():
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.Linear(3, 3))
    PeftModel(model, IA3Config(target_modules=["0", "1"], feedforward_modules=["0"]))
    assert isinstance(model[0].adapters["default"], IA3Conv) and vector(model[0]).shape == (1, 2, 1, 1, 1)
    assert isinstance(model[1].adapters["default"], IA3Linear) and vector(model[1]).shape == (3, 1)


# ---- config ----------------------------------------------------------------------------------------


def test_feedforward_modules_must_be_targets():
    with pytest.raises(
        ValueError,
        match=r"IA3Config: feedforward_modules \['mlp\.c_proj'\] are not in target_modules \['c_attn', "
        r"'c_proj'\]; a feed-forward module must also be a target, so list it in both\.",
    ):
        IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["mlp.c_proj"])
    # a regex on either side cannot be compared by name, as in peft
    IA3Config(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=["down_proj"])


def test_targets_without_feedforward_modules_take_the_model_types_default():
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"]))
    config = model.peft_config["default"]
    assert config.feedforward_modules == DEFAULT_FEEDFORWARD["llama"] == ["down_proj"]
    assert vector(model.get_base_model().model.layers[0].mlp.down_proj).shape == (1, 64)  # input side


def test_feedforward_modules_needed_where_there_is_no_default():
    with pytest.raises(
        ValueError,
        match=r"IA3Config: say which targets are feed-forward layers .* feedforward_modules=\['down_proj'\], "
        r"or \[\] for none; there is no default for Sequential \(model_type None\)",
    ):
        PeftModel(nn.Sequential(nn.Linear(3, 3)), IA3Config(target_modules=["0"]))


def test_sets_become_sorted_lists_and_unknown_options_are_named():
    config = IA3Config(target_modules={"v_proj", "k_proj"}, feedforward_modules=set())
    assert config.target_modules == ["k_proj", "v_proj"] and config.feedforward_modules == []
    assert config.to_dict()["peft_type"] == "IA3"
    with pytest.raises(
        TypeError, match=r"no option 'feed_forward_modules' \(did you mean 'feedforward_modules'"
    ):
        IA3Config(feed_forward_modules=["down_proj"])


def test_unknown_model_type_asks_for_targets():
    with pytest.raises(
        ValueError, match=r"IA3Config needs target_modules for Toy: for example \['lin', 'conv1d'\]"
    ):
        PeftModel(Toy(), IA3Config())


# ---- counting, training, saving --------------------------------------------------------------------


def test_trainable_parameter_count_is_analytic():
    model = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # k_proj and v_proj rescale their outputs (kv each), down_proj its input (intermediate_size)
    expected = cfg.num_hidden_layers * (2 * kv + cfg.intermediate_size)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected == 192
    assert total == expected + sum(p.numel() for p in tiny_llama().parameters())

    bert = get_peft_model(tiny_bert(), IA3Config(task_type="SEQ_CLS"))
    cfg = bert.config
    h, inter, labels = cfg.hidden_size, cfg.intermediate_size, cfg.num_labels
    # key, value (outputs, h each), attention.output.dense (input, h), output.dense (input, inter), the head
    expected = cfg.num_hidden_layers * (3 * h + inter) + (h + 1) * labels
    assert bert.get_nb_trainable_parameters()[0] == expected == 419


def test_training_lowers_loss_and_leaves_the_base_bit_identical():
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_adapter_parameter(n))
    inputs = batch()
    train_and_check_frozen(model, frozen, {**inputs, "labels": inputs["input_ids"]}, lr=0.1)
    vectors = [p for n, p in model.named_parameters() if n.endswith("ia3_l")]
    assert all((v != 1).any() for v in vectors)


def test_save_load_round_trip(tmp_path):
    model = get_peft_model(tiny_gpt2(), IA3Config(task_type="CAUSAL_LM"))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        **{f"base_model.model.transformer.h.{i}.attn.c_attn.ia3_l": (96, 1) for i in range(2)},
        **{f"base_model.model.transformer.h.{i}.mlp.c_proj.ia3_l": (1, 128) for i in range(2)},
    }
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        assert not torch.allclose(expected, tiny_gpt2()(**inputs).logits, atol=1e-3)
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


# ---- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scaled", "feed-forward"])
def test_merge_unmerge_every_layer_type(feedforward):
    ref, toy = wrap_toy(feedforward, init_ia3_weights=False)
    inputs = toy_inputs()
    with torch.no_grad():
        for name in LAYERS:
            layer, original = getattr(toy, name), getattr(ref, name)
            before = layer(inputs[name])
            layer.merge(["default"])
            assert layer.merged_adapters == ["default"]
            # merged: the base layer alone computes the adapted output
            torch.testing.assert_close(layer.base_layer(inputs[name]), before, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(layer(inputs[name]), before, atol=1e-6, rtol=1e-5)
            vec = vector(layer).flatten()
            if feedforward:  # the bias is applied after the rescaled input: it stays
                assert torch.equal(layer.base_layer.bias, original.bias)
            else:  # l ⊙ (W x + b): the bias is rescaled with the output
                torch.testing.assert_close(layer.base_layer.bias, vec * original.bias)
            layer.unmerge()
            assert layer.merged_adapters == []
            torch.testing.assert_close(layer.base_layer.weight, original.weight, atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(layer.base_layer.bias, original.bias, atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(layer(inputs[name]), before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, gpt2_with_biases], ids=["llama", "gpt2"])
def test_merge_and_unload_equals_unmerged_output(build):
    model = get_peft_model(build(), IA3Config(task_type="CAUSAL_LM"))
    randomize_adapters(model)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, TunedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(build()(**inputs).logits, expected, atol=1e-3)


def test_unmerge_restores_every_base_weight():
    reference = dict(gpt2_with_biases().named_parameters())
    model = get_peft_model(gpt2_with_biases(), IA3Config())
    randomize_adapters(model)

    def base_weights() -> dict[str, torch.Tensor]:
        return {
            n.replace(".base_layer", ""): p.detach().clone()
            for n, p in model.get_base_model().named_parameters()
            if not is_adapter_parameter(n)
        }

    model.merge_adapter()
    merged = base_weights()
    for name in ("attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_proj.weight"):
        assert not torch.allclose(merged[f"transformer.h.0.{name}"], reference[f"transformer.h.0.{name}"])
    assert torch.equal(
        merged["transformer.h.0.mlp.c_proj.bias"], reference["transformer.h.0.mlp.c_proj.bias"]
    )
    model.unmerge_adapter()
    restored = base_weights()
    assert restored.keys() == reference.keys()
    for name, param in reference.items():
        torch.testing.assert_close(restored[name], param, atol=1e-7, rtol=1e-6, msg=name)


def test_unmerging_a_vector_with_zeros_is_refused():
    _, toy = wrap_toy(False)
    with torch.no_grad():
        toy.lin.adapters["default"].ia3_l[2] = 0.0
    toy.lin.merge(["default"])
    with pytest.raises(
        ValueError, match=r"This IA3 vector has zero entries, so merging it erased the Linear"
    ):
        toy.lin.unmerge()
    assert toy.lin.merged_adapters == ["default"]  # still merged, weights untouched by the failed unmerge


# ---- mixed batches -----------------------------------------------------------------------------------


def test_mixed_batch_rows_match_each_adapter_alone():
    model = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"), adapter_name="a")
    randomize_adapters(model, seed=1)
    model.add_adapter(
        "b",
        IA3Config(
            target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"]
        ),
    )
    model.set_adapter("b")
    randomize_adapters(model, seed=2)
    inputs = batch()
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(**inputs).logits
        with model.disable_adapter():
            alone["__base__"] = model(**inputs).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=1e-5)
    assert (alone["a"] - alone["__base__"]).abs().max() > 1e-2
    assert (alone["b"] - alone["__base__"]).abs().max() > 1e-2
    assert (alone["a"] - alone["b"]).abs().max() > 1e-2
