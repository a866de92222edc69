"""The adapter lifecycle: add, activate, disable, delete, load, save, mix per row, combine methods, unload."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import (
    BitFitConfig,
    LayerAdapter,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
    inject_adapter_in_model,
)
from peftkit.layer import ModulesToSave, RowRouting, TunedLayer, alternative_form, holders_in, route_rows
from peftkit.methods.lora import LoraLinear


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def two_lora_adapters() -> PeftModel:
    """ "a" on q/v and "b" on o_proj/up_proj, each with its own random values."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="a")
    randomize_adapters(model, seed=1)
    model.add_adapter("b", LoraConfig(target_modules=["o_proj", "up_proj", "v_proj"]))
    model.set_adapter("b")
    randomize_adapters(model, seed=2)
    return model


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- activation ----------------------------------------------------------------------------------


def test_add_and_set_adapter(input_ids):
    base = logits(tiny_llama(), input_ids)
    model = two_lora_adapters()
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    assert list(model.peft_config) == ["a", "b"]
    out_b = logits(model, input_ids)
    assert trainable_names(model) and all(".b." in n for n in trainable_names(model))
    model.set_adapter("a")
    out_a = logits(model, input_ids)
    assert model.active_adapter == "a" and all(".a." in n for n in trainable_names(model))
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    assert not torch.allclose(out_a, base, atol=1e-3)
    # both at once: out = b(a(x)) on v_proj; differs from each alone
    model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    assert len(trainable_names(model)) == 2 * 2 * 2 + 3 * 2 * 2  # (A, B) per targeted layer, 2 layers
    both = logits(model, input_ids)
    assert not torch.allclose(both, out_a, atol=1e-3) and not torch.allclose(both, out_b, atol=1e-3)
    # a newly added adapter is inactive and frozen until set_adapter
    model.add_adapter("c", LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
    assert model.active_adapters == ["a", "b"]
    assert not any(".c." in n for n in trainable_names(model))
    torch.testing.assert_close(logits(model, input_ids), both, atol=0, rtol=0)


def test_two_active_adapters_add_up_on_a_shared_layer():
    model = two_lora_adapters()
    model.set_adapter(["a", "b"])
    v = model.get_base_model().model.layers[0].self_attn.v_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        delta = {n: v.adapters[n].delta_weight() for n in ("a", "b")}
        expected = x @ (v.base_layer.weight + delta["a"] + delta["b"]).T
        torch.testing.assert_close(v(x), expected, atol=1e-5, rtol=1e-5)


def test_disable_adapter_context(input_ids):
    base = logits(tiny_llama(), input_ids)
    model = two_lora_adapters()
    adapted = logits(model, input_ids)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=0, rtol=0)
    # a merged adapter is taken out while disabled
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_disable_adapter_restores_on_error(input_ids):
    model = two_lora_adapters()
    adapted = logits(model, input_ids)
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=0, rtol=0)


def test_delete_adapter_restores_original_modules(input_ids):
    base_model = tiny_llama()
    original_o = base_model.model.layers[0].self_attn.o_proj
    model = get_peft_model(base_model, LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="a")
    randomize_adapters(model, seed=1)
    out_a = logits(model, input_ids)
    model.add_adapter("b", LoraConfig(target_modules=["o_proj", "v_proj"]))
    model.set_adapter("b")
    attn = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attn.o_proj, TunedLayer)
    model.delete_adapter("b")
    assert attn.o_proj is original_o and type(attn.o_proj) is nn.Linear
    assert isinstance(attn.v_proj, TunedLayer) and list(attn.v_proj.adapters) == ["a"]
    assert list(model.peft_config) == ["a"] and model.active_adapters == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, input_ids), out_a, atol=0, rtol=0)
    assert all(".a." in n for n in trainable_names(model)) and trainable_names(model)
    model.delete_adapter("a")
    assert type(attn.q_proj) is nn.Linear and type(attn.v_proj) is nn.Linear
    assert model.peft_config == {}
    with pytest.raises(ValueError, match=r"No adapter named \['a'\]"):
        model.delete_adapter("a")


def test_delete_adapter_restores_the_classification_head():
    bert = tiny_bert()
    head = bert.classifier
    model = get_peft_model(bert, LoraConfig(task_type="SEQ_CLS"), adapter_name="a")
    model.add_adapter("b", LoraConfig(task_type="SEQ_CLS", target_modules=["key"]))
    wrapped = model.get_base_model().classifier
    assert isinstance(wrapped, ModulesToSave) and list(wrapped.modules_to_save) == ["a", "b"]
    model.delete_adapter("a")
    assert list(wrapped.modules_to_save) == ["b"] and model.active_adapters == ["b"]
    model.delete_adapter("b")
    assert model.get_base_model().classifier is head


def test_load_a_second_adapter(tmp_path, input_ids):
    source = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    randomize_adapters(source, seed=3)
    expected = logits(source, input_ids)
    source.save_pretrained(tmp_path)

    model = two_lora_adapters()
    before_b = logits(model, input_ids)
    model.load_adapter(str(tmp_path), adapter_name="loaded")
    assert model.active_adapters == ["b"]  # loading does not activate
    torch.testing.assert_close(logits(model, input_ids), before_b, atol=0, rtol=0)
    model.set_adapter("loaded")
    torch.testing.assert_close(logits(model, input_ids), expected, atol=0, rtol=0)
    assert trainable_names(model) == set()  # loaded for inference
    model.load_adapter(str(tmp_path), adapter_name="again", is_trainable=True)
    model.set_adapter("again")
    assert trainable_names(model) and all(".again." in n for n in trainable_names(model))


def test_save_pretrained_several_adapters(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    randomize_adapters(model, seed=4)
    model.add_adapter("other", LoraConfig(target_modules=["down_proj"], r=2))
    model.set_adapter("other")
    randomize_adapters(model, seed=5)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, input_ids)

    model.save_pretrained(tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == [
        "adapter_composition.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other",
    ]
    assert sorted(os.listdir(tmp_path / "all" / "other")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "all"))
    loaded.load_adapter(str(tmp_path / "all" / "other"), adapter_name="other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, input_ids), expected[name], atol=0, rtol=0)

    model.save_pretrained(tmp_path / "some", selected_adapters=["other"])
    assert os.listdir(tmp_path / "some") == ["other"]
    only = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "some" / "other"), adapter_name="other")
    assert only.peft_config["other"].r == 2
    torch.testing.assert_close(logits(only, input_ids), expected["other"], atol=0, rtol=0)


# ---- mixed batches -------------------------------------------------------------------------------


def rows_alone(model, names, run) -> list[torch.Tensor]:
    """Row i of `run()` computed with adapter names[i] alone active (or disabled for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run()[i])
        else:
            model.set_adapter(name)
            rows.append(run()[i])
    return rows


def test_mixed_batch_lora(input_ids):
    model = two_lora_adapters()
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        alone = rows_alone(model, names, lambda: model(input_ids=input_ids).logits)
    for i in range(3):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], logits(tiny_llama(), input_ids)[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], alone[2], atol=1e-3)


def test_mixed_batch_bitfit_and_lora():
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn", "c_fc"]), adapter_name="lora")
    randomize_adapters(model, seed=1)
    model.add_adapter("bitfit", BitFitConfig())
    model.set_adapter("bitfit")
    randomize_adapters(model, seed=2)
    input_ids = torch.randint(3, 100, (6, 5), generator=torch.Generator().manual_seed(0))
    names = ["bitfit", "lora", "__base__", "lora", "bitfit", "bitfit"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        alone = rows_alone(model, names, lambda: model(input_ids=input_ids).logits)
    for i in range(6):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3) and not torch.allclose(
        mixed[1], mixed[2], atol=1e-3
    )


def test_mixed_batch_seq_cls_uses_each_adapters_head():
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS"), adapter_name="a")
    randomize_adapters(model, seed=1)
    model.add_adapter("b", LoraConfig(task_type="SEQ_CLS", target_modules=["key", "dense"]))
    model.set_adapter("b")
    randomize_adapters(model, seed=2)
    head = model.get_base_model().classifier
    assert not torch.equal(head.modules_to_save["a"].weight, head.modules_to_save["b"].weight)
    input_ids = torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, 4:] = 0
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits
        alone = rows_alone(model, names, lambda: model(input_ids=input_ids, attention_mask=mask).logits)
        base = tiny_bert()(input_ids=input_ids, attention_mask=mask).logits
    for i in range(4):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=1e-5)


def test_mixed_batch_refuses_merged_adapters(input_ids):
    model = two_lora_adapters()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"need unmerged adapters; call unmerge_adapter\(\) first"):
        model(input_ids=input_ids, adapter_names=["a", "b", "a"])


def test_generate_with_adapter_names(input_ids):
    model = two_lora_adapters()
    names = ["a", "__base__", "b"]
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        alone = rows_alone(model, names, lambda: model.generate(input_ids=input_ids, **kwargs))
    assert mixed.shape == (3, 7 + 4)
    for i in range(3):
        assert torch.equal(mixed[i], alone[i])
    with torch.no_grad():
        assert torch.equal(mixed[1], tiny_llama().generate(input_ids=input_ids, **kwargs)[1])
    assert not torch.equal(alone[0], alone[2])


# ---- mixed batches in one call (LayerAdapter.forward_mixed; LoRA has it) -------------------------


@pytest.fixture
def batched(monkeypatch) -> list[bool]:
    """Records each call of LoraLinear.forward_mixed: True when it gave the rows' output, False when it
    left them to the per-adapter loop."""
    calls = []
    original = LoraLinear.forward_mixed.__func__

    def spy(cls, *args):
        out = original(cls, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LoraLinear, "forward_mixed", classmethod(spy))
    return calls


def batched_and_loop(run, monkeypatch) -> tuple:
    """`run()` as it is, then again with LoraLinear's batched form switched off (the per-adapter loop)."""
    first = run()
    with monkeypatch.context() as patch:
        patch.setattr(LoraLinear, "forward_mixed", classmethod(lambda cls, *args: None))
        return first, run()


def many_lora_adapters(base: nn.Module, targets: list[str], n: int) -> PeftModel:
    """n LoRA adapters "a0".."a{n-1}" with ranks 1..4 and alphas 2..4 cycling, every weight random."""
    configs = [LoraConfig(r=1 + i % 4, lora_alpha=2 + i % 3, target_modules=targets) for i in range(n)]
    model = get_peft_model(base, configs[0], adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", configs[i])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def test_row_index_gives_each_row_its_adapters_position():
    routing = RowRouting(["a", "__base__", "b", "c"])
    assert routing.row_index(4, ("b", "a")) == [1, -1, 0, -1]  # c is not on this layer
    assert routing.row_index(8, ("a", "b", "c")) == [0, 0, -1, -1, 1, 1, 2, 2]  # beams
    assert routing.row_index(4, ("b", "a")) is routing.row_index(4, ("b", "a"))  # once per batch


def test_forward_mixed_runs_once_for_a_layer_whose_adapters_share_a_class():
    class Batched(LayerAdapter):
        calls: ClassVar[list] = []

        def forward(self, x, base_out, base_layer):
            return base_out + 1

        @classmethod
        def forward_mixed(cls, adapters, row_index, x, base_out, base_layer):
            cls.calls.append((len(adapters), row_index))
            return base_out + torch.tensor([[float(k >= 0)] for k in row_index])

    class SameForward(Batched):
        pass

    class OtherForward(Batched):
        def forward(self, x, base_out, base_layer):
            return base_out + 2

    mixed = [alternative_form(kind, "forward_mixed") for kind in (SameForward, LayerAdapter, OtherForward)]
    assert mixed[0] is not None and mixed[1] is not None
    assert mixed[2] is None  # its forward_mixed would compute Batched's forward
    layer = TunedLayer(nn.Linear(4, 3))
    layer.add("same", SameForward())
    layer.add("same2", SameForward())
    layer.add("other", OtherForward())
    x = torch.randn(3, 4)
    with torch.no_grad():
        base = layer.base_layer(x)
        with route_rows(["same2", "__base__", "same"]):
            torch.testing.assert_close(layer(x) - base, torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3]))
        assert Batched.calls == [(2, [0, -1, 1])]
        with route_rows(["other", "same", "__base__"]):  # two classes: the loop
            torch.testing.assert_close(layer(x) - base, torch.tensor([[2.0] * 3, [1.0] * 3, [0.0] * 3]))
        assert len(Batched.calls) == 1


@pytest.mark.parametrize("shape", [(5, 8), (5, 4, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("scalings", [(0.5, 2.0, 1.5), (2.0, 2.0, 2.0)], ids=["own-s", "one-s"])
def test_lora_mixed_rows_equal_the_written_out_update(shape, scalings, batched):
    """Row i: W x_i + b + s_k·B_k A_k x_i for its adapter k (ranks 2, 5, 3), W x_i + b for a base row."""
    torch.manual_seed(0)
    layer = TunedLayer(nn.Linear(8, 6))
    for name, r, scaling in zip("abc", (2, 5, 3), scalings, strict=True):
        adapter = LoraLinear(layer.base_layer, r, scaling, dropout=0.0)
        nn.init.normal_(adapter.lora_B.weight)
        layer.add(name, adapter)
    names = ["b", "__base__", "a", "c", "b"]
    x = torch.randn(shape)
    with torch.no_grad(), route_rows(names):
        out = layer(x)
    assert batched == [True]
    with torch.no_grad():
        W, b = layer.base_layer.weight, layer.base_layer.bias
        for i, name in enumerate(names):
            expected = x[i] @ W.T + b
            if name != "__base__":
                adapter = layer.adapters[name]
                A, B, s = adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling
                expected = expected + s * (x[i] @ A.T @ B.T)
            torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_lora_mixed_rows_over_a_bfloat16_base_match_the_loop(batched, monkeypatch):
    """float32 adapters on a bfloat16 layer: the update is formed in float32 and added in bfloat16."""
    torch.manual_seed(0)
    layer = TunedLayer(nn.Linear(8, 6).to(torch.bfloat16))
    for name, r in [("a", 2), ("b", 4)]:
        adapter = LoraLinear(layer.base_layer, r, 2.0, dropout=0.0)
        nn.init.normal_(adapter.lora_B.weight)
        layer.add(name, adapter)
    x = torch.randn(4, 3, 8).to(torch.bfloat16)

    def run():
        with torch.no_grad(), route_rows(["b", "a", "__base__", "b"]):
            return layer(x)

    mixed, loop = batched_and_loop(run, monkeypatch)
    assert batched == [True] and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, loop)
    assert not torch.equal(mixed[0], mixed[1]) and torch.equal(mixed[2], layer.base_layer(x)[2])


def test_lora_mixed_batch_of_16_adapters_matches_the_loop(batched, monkeypatch):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = many_lora_adapters(tiny_llama(), targets, 16)
    names = [f"a{i}" for i in range(16)] + ["__base__"] + [f"a{i}" for i in range(0, 16, 3)]
    input_ids = torch.randint(3, 100, (len(names), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed, loop = batched_and_loop(
            lambda: model(input_ids=input_ids, adapter_names=names).logits, monkeypatch
        )
        base = tiny_llama()(input_ids=input_ids).logits
    assert batched == [True] * 2 * len(targets)  # every layer in one call
    torch.testing.assert_close(mixed, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[16], base[16], atol=1e-5, rtol=1e-5)
    assert all(not torch.allclose(mixed[i], base[i], atol=1e-2) for i in range(16))
    model.set_adapter("a5")
    with torch.no_grad():
        torch.testing.assert_close(mixed[5], model(input_ids=input_ids).logits[5], atol=1e-5, rtol=1e-5)


def test_lora_mixed_batch_on_gpt2_conv1d_matches_the_loop(batched, monkeypatch):
    model = many_lora_adapters(tiny_gpt2(), ["c_attn", "c_proj", "c_fc"], 3)
    names = ["a2", "a0", "__base__", "a1", "a2", "a0"]
    input_ids = torch.randint(3, 100, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed, loop = batched_and_loop(
            lambda: model(input_ids=input_ids, adapter_names=names).logits, monkeypatch
        )
        alone = rows_alone(model, names, lambda: model(input_ids=input_ids).logits)
    assert len(batched) == 2 * 4 and all(batched)  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    torch.testing.assert_close(mixed, loop, atol=1e-5, rtol=1e-5)
    for i in range(6):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3) and not torch.allclose(
        mixed[1], mixed[3], atol=1e-3
    )


def test_lora_mixed_batch_gradients_match_the_loop(batched, monkeypatch):
    """Training mode, no dropout: each adapter's A and B get the gradient of its own rows only."""
    model = many_lora_adapters(tiny_llama(), ["q_proj", "v_proj", "down_proj"], 4)
    model.train()
    params = {n: p.requires_grad_() for n, p in model.named_parameters() if ".lora_" in n}
    names = ["a2", "a0", "__base__", "a2", "a1"]  # a3 has no row
    input_ids = torch.randint(3, 100, (5, 6), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids, adapter_names=names).loss.backward()
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    mixed, loop = batched_and_loop(grads, monkeypatch)
    assert batched == [True] * 2 * 3
    used = {n for n in params if ".a3." not in n}
    assert set(mixed) == set(loop) == used
    for name in used:
        torch.testing.assert_close(mixed[name], loop[name], atol=1e-5, rtol=1e-4)
        assert mixed[name].abs().max() > 0, name


def test_lora_mixed_batch_with_dropout_in_training_uses_the_loop(batched, monkeypatch):
    """Each adapter draws its own dropout mask in the loop; the batched form steps aside for it."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5), "a")
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], lora_dropout=0.5))
    randomize_adapters(model, seed=1)
    model.set_adapter("a")
    randomize_adapters(model, seed=2)
    model.train()
    input_ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(0))

    def run():
        torch.manual_seed(0)
        return model(input_ids=input_ids, adapter_names=["b", "a", "b"]).logits.detach()

    first, loop = batched_and_loop(run, monkeypatch)
    assert batched == [False, False]
    assert torch.equal(first, loop)
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, adapter_names=["b", "a", "b"])
    assert batched[2:] == [True, True]  # eval: no dropout, one call


def test_mixed_batch_of_dora_and_lora_adapters(input_ids):
    """DoRA overrides LoRA's forward, and a layer holding both kinds runs the per-adapter loop."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    randomize_adapters(model, seed=1)
    model.add_adapter("dora", LoraConfig(target_modules=["v_proj", "o_proj"], use_dora=True))
    model.set_adapter("dora")
    randomize_adapters(model, seed=2)
    model.add_adapter("dora2", LoraConfig(target_modules=["v_proj"], use_dora=True))
    model.set_adapter("dora2")
    randomize_adapters(model, seed=3)
    names = ["dora", "lora", "dora2"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        alone = rows_alone(model, names, lambda: model(input_ids=input_ids).logits)
    for i in range(3):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


# ---- combining methods ---------------------------------------------------------------------------


def test_lora_and_bitfit_in_one_model(input_ids):
    """LoRA on c_attn + BitFit everywhere equals plain GPT-2 with W += s(BA)ᵀ and b += Δb applied by hand."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]), adapter_name="lora")
    model.add_adapter("bitfit", BitFitConfig())
    model.set_adapter(["lora", "bitfit"])
    randomize_adapters(model)
    reference = tiny_gpt2()
    n_biases = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(".bias"))
    lora_params = 2 * 8 * (32 + 96)
    assert model.get_nb_trainable_parameters()[0] == n_biases + lora_params
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if not isinstance(module, TunedLayer):
                continue
            target = reference.get_submodule(name)
            if "lora" in module.adapters:
                target.weight += module.adapters["lora"].delta_weight()
            target.bias += module.adapters["bitfit"].bias_delta
        expected = reference(input_ids=input_ids).logits
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    c_attn = model.get_base_model().transformer.h[0].attn.c_attn
    assert list(c_attn.adapters) == ["lora", "bitfit"]
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_and_lora_in_one_model(input_ids):
    """[P; E[x]] fed to the LoRA-adapted model; deleting the prompt adapter leaves LoRA alone."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adapter_name="lora")
    randomize_adapters(model)
    lora_only = logits(model, input_ids)
    model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.set_adapter(["lora", "prompt"])
    prompt = model.model_adapters["prompt"].prompt_embeddings.detach()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt.expand(3, -1, -1), embeds], dim=1)
        with model.disable_adapter():  # LoRA off and no prompt: must differ from the reference below
            plain = model.get_base_model()(inputs_embeds=embeds).logits
        expected = model.get_base_model()(inputs_embeds=embeds).logits
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=0, rtol=0)
    model.delete_adapter("prompt")
    assert "prompt" not in model.model_adapters and model.active_adapters == ["lora"]
    torch.testing.assert_close(logits(model, input_ids), lora_only, atol=0, rtol=0)


# ---- model-level helpers ------------------------------------------------------------------


def test_inject_adapter_in_model(input_ids):
    base = logits(tiny_llama(), input_ids)
    model = tiny_llama()
    returned = inject_adapter_in_model(LoraConfig(target_modules=["q_proj", "v_proj"]), model)
    assert returned is model
    assert isinstance(model.model.layers[1].self_attn.q_proj, TunedLayer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(".adapters.default.lora_" in n for n in trainable)
    torch.testing.assert_close(logits(model, input_ids), base, atol=0, rtol=0)
    randomize_adapters(model)
    assert not torch.allclose(logits(model, input_ids), base, atol=1e-3)


def test_trainable_parameter_counts_and_printout(capsys):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    total_base = sum(p.numel() for p in tiny_llama().parameters())
    trainable = 2 * 2 * (32 + 32)
    assert model.get_nb_trainable_parameters() == (trainable, total_base + trainable)
    model.print_trainable_parameters()
    expected = (
        f"trainable params: {trainable:,d} || all params: {total_base + trainable:,d} || "
        f"trainable%: {100 * trainable / (total_base + trainable):.4f}\n"
    )
    assert capsys.readouterr().out == expected
    assert expected == "trainable params: 256 || all params: 25,248 || trainable%: 1.0139\n"


def test_unload_drops_unmerged_adapters(input_ids):
    base = logits(tiny_llama(), input_ids)
    model = two_lora_adapters()
    model.set_adapter(["a", "b"])
    plain = model.unload()
    assert not any(isinstance(m, TunedLayer) for m in plain.modules())
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, input_ids), base, atol=0, rtol=0)


def test_unload_keeps_merged_adapters(input_ids):
    model = two_lora_adapters()
    model.set_adapter("a")
    expected = logits(model, input_ids)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, TunedLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_attribute_passthrough():
    model = get_peft_model(tiny_llama(), LoraConfig())
    assert model.config.model_type == "llama"
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.in_features == 32 and q.weight is q.base_layer.weight


def test_a_failed_merge_leaves_no_layer_merged(input_ids):
    """If the last layer's adapter refuses to merge, the layers merged before it are rolled back."""
    from peftkit import NotMergeableError

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    last_v = model.get_base_model().model.layers[1].self_attn.v_proj
    last_v.adapters["default"].merge = lambda base_layer: (_ for _ in ()).throw(NotMergeableError("no"))
    with pytest.raises(NotMergeableError):
        model.merge_adapter()
    assert all(not layer.merged_adapters for layer in model.modules() if isinstance(layer, TunedLayer))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


def test_holders_are_found_in_module_order_without_walking_into_adapters():
    model = get_peft_model(
        tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    )
    model.add_adapter("two", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    expected = [
        (n, m)
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, (TunedLayer, ModulesToSave))
    ]
    assert holders_in(model.get_base_model()) == expected and len(expected) == 5  # 2 layers × 2, and the head
