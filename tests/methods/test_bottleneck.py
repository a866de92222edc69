"""Bottleneck adapters, serial and parallel, against hand computations placed by forward hooks on a plain
copy of the base model: serial h + s·U f(D h) on a module's output, parallel h + s·U f(D x) on its input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    randomize_adapters,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    train_and_check_frozen,
)
from safetensors.torch import load_file
from torch import nn

from peftkit import LoraConfig, NotMergeableError, PeftModel, get_peft_model
from peftkit.layer import TunedLayer
from peftkit.methods.bottleneck import AdapterConfig, BottleneckConfig

R = 8  # adapter_size in these tests
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# (attention output, serial FFN output, parallel FFN site) of block {} in each tiny model
SITES = {
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp"),
    "bert": (
        "bert.encoder.layer.{}.attention.output.dense",
        "bert.encoder.layer.{}.output.dense",
        "bert.encoder.layer.{}.output.dense",
    ),
}
# (input width, output width) of each site: hidden 32 everywhere; BERT's parallel FFN adapter reads the
# 64-wide intermediate activation (the input of output.dense); LlamaMLP and GPT2MLP map 32 -> 32.
D_IN_PARALLEL_FFN = {"llama": 32, "gpt2": 32, "bert": 64}
ACTS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
VARIANTS = [(style, parallel) for style in ("houlsby", "pfeiffer") for parallel in (False, True)]


def sites(kind: str, style: str, parallel: bool) -> list[str]:
    attention, ffn_serial, ffn_parallel = SITES[kind]
    per_block = ([attention] if style == "houlsby" else []) + [ffn_parallel if parallel else ffn_serial]
    return [site.format(i) for i in (0, 1) for site in per_block]


def batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    input_ids = torch.randint(3, 100, (3, 6), generator=g)
    labels = torch.tensor([0, 2, 1]) if kind == "bert" else input_ids
    return {"input_ids": input_ids, "labels": labels}


def wrap(kind: str, **config) -> PeftModel:
    config.setdefault("adapter_size", R)
    return get_peft_model(BUILDERS[kind](), AdapterConfig(task_type=TASKS[kind], **config))


def adapter_tensors(model: PeftModel, site: str, name: str = "default") -> tuple[torch.Tensor, ...]:
    a = model.get_base_model().get_submodule(site).adapters[name]
    return tuple(
        t.detach()
        for t in (a.adapter_down.weight, a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias)
    )


def hooked_reference(kind: str, model: PeftModel, name: str = "default", reference: nn.Module | None = None):
    """A plain base model with the adapter's equation added by forward hooks at the adapter's sites."""
    config = model.peft_config[name]
    reference = reference if reference is not None else BUILDERS[kind]()
    act, s = ACTS[config.adapter_act], config.scaling
    wrapped = model.get_base_model()
    for site, module in wrapped.named_modules():
        if not (isinstance(module, TunedLayer) and name in module.adapters):
            continue
        D, d, U, u = adapter_tensors(model, site, name)

        def hook(_, inputs, out, D=D, d=d, U=U, u=u):
            v = inputs[0] if config.parallel else out  # parallel reads x, serial reads h
            return out + s * (act(v @ D.T + d) @ U.T + u)

        # a parallel FFN adapter wraps the block around a serial one's layer: "mlp.base_layer.down_proj"
        reference.get_submodule(site.replace(".base_layer", "")).register_forward_hook(hook)
    if kind == "bert":  # SEQ_CLS trains its own copy of the head
        reference.classifier.load_state_dict(wrapped.classifier.modules_to_save[name].state_dict())
    return reference


def wrapped_names(model: PeftModel) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, TunedLayer)]


# ---- placement and size --------------------------------------------------------------------------


@pytest.mark.parametrize("style,parallel", VARIANTS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_style_places_adapters_and_trainable_count_is_analytic(kind, style, parallel):
    model = wrap(kind, style=style, parallel=parallel)
    expected_sites = sites(kind, style, parallel)
    assert wrapped_names(model) == expected_sites
    # each adapter: D (r×d_in + r) and U (d_out×r + d_out); serial adapters read h, so d_in = d_out = 32
    expected = 0
    for site in expected_sites:
        d_in = D_IN_PARALLEL_FFN[kind] if parallel and "attention" not in site and "attn" not in site else 32
        expected += R * d_in + R + 32 * R + 32
    head = 32 * 3 + 3 if kind == "bert" else 0  # the SEQ_CLS classifier is trained in full
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected + head
    assert total == sum(p.numel() for p in BUILDERS[kind]().parameters()) + trainable
    if (style, parallel) == ("houlsby", False):
        assert expected == 4 * 552
    if (kind, style, parallel) == ("bert", "pfeiffer", True):
        assert expected == 2 * (8 * 64 + 8 + 32 * 8 + 32)


@pytest.mark.parametrize("style,parallel", VARIANTS)
def test_t5_placement_skips_cross_attention(style, parallel):
    model = get_peft_model(tiny_t5(), AdapterConfig(adapter_size=R, style=style, parallel=parallel))
    ffn = "DenseReluDense" if parallel else "DenseReluDense.wo"
    expected = []
    for stack, ffn_index in (("encoder", 1), ("decoder", 2)):
        for block in (0, 1):
            if style == "houlsby":
                expected.append(f"{stack}.block.{block}.layer.0.SelfAttention.o")
            expected.append(f"{stack}.block.{block}.layer.{ffn_index}.{ffn}")
    assert wrapped_names(model) == expected
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids).logits
        assert torch.equal(out, tiny_t5()(input_ids=ids, decoder_input_ids=ids).logits)
        randomize_adapters(model)
        reference = hooked_reference("t5", model, reference=tiny_t5())
        torch.testing.assert_close(
            model(input_ids=ids, decoder_input_ids=ids).logits,
            reference(input_ids=ids, decoder_input_ids=ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_explicit_targets_override_the_style_and_layers_to_transform_filters():
    model = wrap("llama", style="houlsby", target_modules=["v_proj"], layers_to_transform=[1])
    assert wrapped_names(model) == ["model.layers.1.self_attn.v_proj"]
    # serial on v_proj reads its 16-wide output (2 kv heads × 8)
    assert model.get_nb_trainable_parameters()[0] == R * 16 + R + 16 * R + 16
    parallel = wrap(
        "llama",
        parallel=True,
        target_modules=["v_proj"],
        exclude_modules=[r"model.layers.0.self_attn.v_proj"],
    )
    assert wrapped_names(parallel) == ["model.layers.1.self_attn.v_proj"]
    assert parallel.get_nb_trainable_parameters()[0] == R * 32 + R + 16 * R + 16  # reads the 32-wide input


def test_an_architecture_without_those_sites_gets_a_clear_error():
    toy = nn.Sequential()
    toy.add_module("fc1", nn.Linear(4, 8))
    toy.add_module("fc2", nn.Linear(8, 4))
    with pytest.raises(
        ValueError,
        match=r"matched nothing in Sequential\. Layers here that AdapterConfig can adapt: fc1, fc2\.",
    ):
        PeftModel(toy, AdapterConfig())
    PeftModel(toy, AdapterConfig(target_modules=["fc2"], adapter_size=2))
    assert isinstance(toy.fc2, TunedLayer)


# ---- the equations -------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_init_is_the_base_model_bit_exact(kind, parallel):
    model = wrap(kind, style="houlsby", parallel=parallel)
    for site in wrapped_names(model):
        D, d, U, u = adapter_tensors(model, site)
        assert D.abs().sum() > 0 and not U.any() and not u.any()
    inputs = {"input_ids": batch(kind)["input_ids"]}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, BUILDERS[kind]()(**inputs).logits)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind,act", [("llama", "silu"), ("gpt2", "gelu"), ("bert", "tanh")])
def test_forward_matches_hand_computation(kind, act, parallel):
    model = wrap(kind, style="houlsby", parallel=parallel, adapter_act=act, scaling=2.5)
    randomize_adapters(model)
    reference = hooked_reference(kind, model)
    inputs = {"input_ids": batch(kind)["input_ids"]}
    with torch.no_grad():
        out = model(**inputs).logits
        torch.testing.assert_close(out, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, BUILDERS[kind]()(**inputs).logits, atol=1e-3)


@pytest.mark.parametrize("act", list(ACTS))
def test_each_activation_on_one_layer(act):
    torch.manual_seed(0)
    toy = nn.Sequential(nn.Linear(6, 5))
    reference = nn.Linear(6, 5)
    reference.load_state_dict(toy[0].state_dict())
    PeftModel(toy, AdapterConfig(target_modules=["0"], adapter_size=3, adapter_act=act, scaling=0.5))
    randomize_adapters(toy, seed=3)
    a = toy[0].adapters["default"]
    D, d, U, u = (
        t.detach()
        for t in (a.adapter_down.weight, a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias)
    )
    x = torch.randn(4, 6)
    h = reference(x)
    with torch.no_grad():
        torch.testing.assert_close(toy(x), h + 0.5 * (ACTS[act](h @ D.T + d) @ U.T + u))


def test_dropout_acts_on_the_activation_inside_the_adapter():
    torch.manual_seed(0)
    toy = nn.Sequential(nn.Linear(6, 5))
    reference = nn.Linear(6, 5)
    reference.load_state_dict(toy[0].state_dict())
    PeftModel(
        toy,
        AdapterConfig(
            target_modules=["0"], adapter_size=4, adapter_dropout=0.5, parallel=True, adapter_act="tanh"
        ),
    )
    randomize_adapters(toy, seed=3)
    a = toy[0].adapters["default"]
    D, d, U, u = (
        t.detach()
        for t in (a.adapter_down.weight, a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias)
    )
    x = torch.randn(3, 6)
    toy.train()
    torch.manual_seed(1)
    out = toy(x)
    torch.manual_seed(1)
    expected = reference(x) + F.dropout(torch.tanh(x @ D.T + d), 0.5, training=True) @ U.T + u
    torch.testing.assert_close(out, expected)
    toy.eval()
    torch.testing.assert_close(toy(x), reference(x) + torch.tanh(x @ D.T + d) @ U.T + u)


# ---- training, files, lifecycle ------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_training_lowers_loss_and_leaves_the_base_bit_identical(kind, parallel):
    base = BUILDERS[kind]()
    frozen = snapshot(base)
    model = get_peft_model(
        base, AdapterConfig(task_type=TASKS[kind], adapter_size=R, style="houlsby", parallel=parallel)
    )
    initial_down = {site: adapter_tensors(model, site)[0].clone() for site in wrapped_names(model)}
    train_and_check_frozen(model, frozen, batch(kind), lr=1e-2)
    for site, before in initial_down.items():
        D, _, U, _ = adapter_tensors(model, site)
        assert U.abs().sum() > 0 and not torch.equal(
            D, before
        )  # U left zero, then D got gradients through it


@pytest.mark.parametrize("kind,parallel", [("bert", False), ("llama", True)])
def test_save_load_round_trip(tmp_path, kind, parallel):
    model = wrap(kind, style="houlsby", parallel=parallel, adapter_act="gelu", scaling=4.0)
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    options = ("adapter_size", "adapter_act", "parallel", "scaling", "style")
    assert [saved[k] for k in options] == [R, "gelu", parallel, 4.0, "houlsby"]
    assert saved["target_modules"] == model.peft_config["default"].target_modules
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {
        f"base_model.model.{site}.adapter_{part}.{p}"
        for site in sites(kind, "houlsby", parallel)
        for part in ("down", "up")
        for p in ("weight", "bias")
    }
    if kind == "bert":
        expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert keys == expected

    loaded = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    assert type(loaded) is type(model)
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default
    inputs = {"input_ids": batch(kind)["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
        assert not torch.allclose(loaded(**inputs).logits, BUILDERS[kind]()(**inputs).logits, atol=1e-3)


def test_mixed_batch_rows_use_their_own_adapter():
    model = wrap("llama", style="houlsby")
    model.add_adapter("par", AdapterConfig(adapter_size=4, parallel=True, adapter_act="tanh"))
    model.set_adapter(["default", "par"])
    randomize_adapters(model)
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["par", "__base__", "default"]).logits
        expected = {}
        for name in ("default", "par"):
            model.set_adapter(name)
            expected[name] = model(input_ids=ids).logits
            torch.testing.assert_close(
                expected[name], hooked_reference("llama", model, name)(input_ids=ids).logits
            )
        base = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], expected["par"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], expected["default"][2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected["par"][0], base[0], atol=1e-3)
    assert not torch.allclose(expected["default"][2], base[2], atol=1e-3)


MERGE_ERROR = (
    r"Bottleneck adapters cannot be merged into the base weights: the non-linearity f between the down- and "
    r"up-projection \(h \+ s·U f\(D ·\)\) is not a change of a weight matrix\. Keep the adapter on the model "
    r"to use it, or call unload\(\) to drop it and get the base model back\."
)


def test_merge_is_refused_and_unload_drops_the_adapter():
    model = wrap("gpt2", style="houlsby", parallel=True)
    randomize_adapters(model)
    ids = batch("gpt2")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with pytest.raises(NotMergeableError, match=MERGE_ERROR):
            model.merge_adapter()
        with pytest.raises(NotMergeableError, match=MERGE_ERROR):
            model.merge_and_unload()
        assert all(not model.get_base_model().get_submodule(s).merged_adapters for s in wrapped_names(model))
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
        plain = model.unload()
        assert not any(isinstance(m, TunedLayer) for m in plain.modules())
        assert torch.equal(plain(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits)


@pytest.mark.parametrize("parallel", [False, True])
def test_lora_on_attention_and_adapters_on_the_ffn(tmp_path, parallel):
    """The mission's example: LoRA on q/v, bottleneck adapters on the feed-forward, both active at once."""
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    model.add_adapter("ffn", AdapterConfig(task_type="CAUSAL_LM", adapter_size=R, parallel=parallel))
    model.set_adapter(["default", "ffn"])
    assert wrapped_names(model) == [
        name
        for i in (0, 1)
        for name in (
            f"model.layers.{i}.self_attn.q_proj",
            f"model.layers.{i}.self_attn.v_proj",
            sites("llama", "pfeiffer", parallel)[i],
        )
    ]
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q: 32 -> 32, v: 32 -> 16 per block
    adapters = 2 * (R * 32 + R + 32 * R + 32)
    assert model.get_nb_trainable_parameters()[0] == lora + adapters
    train_and_check_frozen(model, frozen, batch("llama"), lr=1e-2)
    model.eval()

    # reference: LoRA folded into a plain copy's q/v weights by hand, the adapters added by hooks
    reference = tiny_llama()
    with torch.no_grad():
        for i in (0, 1):
            for proj in ("q_proj", "v_proj"):
                a = model.get_base_model().model.layers[i].self_attn.get_submodule(proj).adapters["default"]
                getattr(reference.model.layers[i].self_attn, proj).weight += (
                    2 * a.lora_B.weight @ a.lora_A.weight
                )
    reference = hooked_reference("llama", model, "ffn", reference=reference)
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        both = model(input_ids=ids).logits
        torch.testing.assert_close(both, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        model.set_adapter("default")
        lora_only = model(input_ids=ids).logits
        model.set_adapter(["default", "ffn"])
        assert not torch.allclose(both, lora_only, atol=1e-3)

    # each adapter saved and loaded: "default" at the top, "ffn" in its sub-folder
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "ffn" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert all(".adapter_" in k for k in load_file(tmp_path / "ffn" / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "ffn", adapter_name="ffn")
    loaded.set_adapter(["default", "ffn"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, both, atol=0, rtol=0)

        # LoRA merges while the bottleneck adapter stays; merging the bottleneck is refused
        model.merge_adapter(["default"])
        torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-5, rtol=1e-5)
        with pytest.raises(NotMergeableError, match=MERGE_ERROR):
            model.merge_adapter(["ffn"])
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-5, rtol=1e-5)


# ---- the config ----------------------------------------------------------------------------------


def test_targets_come_from_the_style_when_wrapping():
    """The config keeps target_modules=None; wrapping resolves it from the style, and that gets saved."""
    config = BottleneckConfig(style="pfeiffer")
    assert config.target_modules is None
    pfeiffer = get_peft_model(tiny_llama(), config).peft_config["default"]
    assert pfeiffer.target_modules == (
        r"(.*\.)?(mlp\.down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|DenseReluDense\.wo)"
    )
    houlsby = get_peft_model(tiny_llama(), dataclasses.replace(config, style="houlsby", parallel=True))
    assert houlsby.peft_config["default"].target_modules == (
        r"(.*\.)?(mlp|layer\.\d+\.output\.dense|DenseReluDense|"
        r"self_attn\.o_proj|attn\.c_proj|attention\.output\.dense|SelfAttention\.o)"
    )
    explicit = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=("up_proj", "down_proj")))
    assert explicit.peft_config["default"].target_modules == ["down_proj", "up_proj"]
    saved = houlsby.peft_config["default"]
    assert AdapterConfig.from_dict(json.loads(saved.to_json())) == dataclasses.replace(
        saved, inference_mode=True
    )
    defaults = ("adapter_size", "adapter_act", "adapter_dropout", "parallel", "scaling")
    assert [getattr(config, k) for k in defaults] == [64, "relu", 0.0, False, 1.0]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"adapter_size": 0}, r"adapter_size must be a positive integer \(the bottleneck width\), got 0\."),
        (
            {"adapter_act": "sigmoid"},
            r"adapter_act='sigmoid' is not accepted; use one of \['relu', 'gelu', 'silu', 'swish', 'tanh'\]",
        ),
        ({"style": "lora"}, r"style='lora' is not accepted; use one of \['houlsby', 'pfeiffer'\]"),
        ({"parallel": "yes"}, r"parallel must be True or False, got 'yes'"),
        ({"adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\), got 1\.0"),
        ({"scaling": "4"}, r"scaling must be a finite number, got '4'"),
    ],
)
def test_config_errors_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**options)


def test_config_suggests_the_real_option_name():
    with pytest.raises(TypeError, match=r"AdapterConfig has no option 'r' \(did you mean 'adapter_size'\?\)"):
        AdapterConfig(r=8)
