"""QLoRA: LoRA and DoRA on bitsandbytes 4-bit and 8-bit bases, against hand computations.

Quantized layers compute differently in train and eval mode: in train mode they dequantize and multiply in
float32; in eval mode under no_grad, 4-bit layers on CPUs with AVX512-BF16 pack their weight and compute in
bfloat16, and 8-bit layers quantize their input as well. Reference outputs here are therefore taken in train
mode (these models have no dropout), unless a test is about eval mode.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    VOCAB,
    one_torch_thread,
    randomize_adapters,
    snapshot,
    tiny_bert,
    tiny_llama,
    train_and_check_frozen,
)
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training, quantize
from peftkit.layer import TunedLayer
from peftkit.quantization import dequantized_weight

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

BLOCK = 64  # bitsandbytes' 4-bit block size (transformers' default too)
BF16_SCALE_ROUNDING = 2.0**-8  # packing stores the block scales as bfloat16: relative error at most 2^-8
SETTINGS_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
IDS_4BIT = ["nf4-double", "nf4", "fp4-double", "fp4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every test here runs bitsandbytes."""
    with one_torch_thread():
        yield


def quantized_llama(bits: int = 4, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """The tiny Llama at hidden size 64: every linear layer's shape is one bitsandbytes' CPU packing takes."""
    return quantize(tiny_llama(hidden_size=64), bits=bits, quant_type=quant_type, double_quant=double_quant)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1234))
    return {"input_ids": ids, "labels": ids}


def train_mode_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"]).logits


def tuned_layers(model: nn.Module) -> dict[str, TunedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TunedLayer)}


def reference_weight(layer: nn.Module) -> torch.Tensor:
    """W of a bitsandbytes layer in its standard layout, straight from bitsandbytes (not through peftkit)."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return layer.weight.data.float() * scales.unsqueeze(1) / 127
    return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def stored_scales(state) -> torch.Tensor:
    """The block scales a 4-bit layer multiplies by (double-quantized ones after their own 8-bit round)."""
    if state.nested:
        return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


def rounding_bound(target: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """How far the layer's stored weight may be from the float `target` it was quantized from, per entry.

    4-bit: each entry becomes the code value nearest to it in units of its block's largest |entry| (a), so
    its error is at most that distance times a; the layer multiplies by its stored scale a' (a' = a unless
    the scales are quantized again), which adds at most |a' - a|. 8-bit: row-wise int8 of the float16
    weight, at most half a step (row max / 127) plus the float16 rounding (2^-11 relative)."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        row_max = target.to(torch.float16).float().abs().amax(dim=1, keepdim=True)
        return row_max / 254 + target.abs() * 2.0**-11 + 1e-6 * row_max
    state = layer.weight.quant_state
    blocks = target.reshape(-1, BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    nearest = ((blocks / scale).unsqueeze(-1) - state.code).abs().amin(dim=-1) * scale
    stored = stored_scales(state).reshape(-1, 1)
    return (nearest + (stored - scale).abs() + 1e-5 * scale).reshape(target.shape)


def expected_merge(adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W + s·B A for LoRA, (m/‖W + s·B A‖)(W + s·B A) for DoRA, written out from the adapter's tensors."""
    merged = weight + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
    if hasattr(adapter, "lora_magnitude_vector"):
        merged = (adapter.lora_magnitude_vector / merged.norm(dim=1)).unsqueeze(1) * merged
    return merged.detach()


def run_packed(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """A forward under no_grad in eval mode, which packs every 4-bit layer on CPUs with AVX512-BF16.
    Elsewhere the layers are packed afterwards with bitsandbytes' own converter, exactly as that forward
    would, so that what follows meets the packed layout on any CPU."""
    pack = getattr(bnbF, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes does not pack 4-bit weights on CPU")
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            assert not bnbF.has_avx512bf16()
            layer.weight.data, _ = pack(layer.weight.data, layer.weight.quant_state)
    assert layers and all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)


# ---- quantize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "quant_type", "double_quant"), [(4, "nf4", True), (4, "fp4", False), (8, "nf4", True)]
)
def test_quantize_swaps_every_linear_but_the_head(bits, quant_type, double_quant):
    model = tiny_llama(hidden_size=64)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    quantize(model, bits=bits, quant_type=quant_type, double_quant=double_quant)

    assert type(model.lm_head) is nn.Linear
    layers = {n: model.get_submodule(n) for n in original if n != "lm_head"}
    assert len(layers) == 14  # 7 per block: q, k, v, o, gate, up, down
    weight_bytes = 0
    for name, layer in layers.items():
        out_features, in_features = original[name].shape
        weight = layer.weight
        weight_bytes += weight.numel() * weight.element_size()
        if bits == 4:
            assert type(layer) is bnb.nn.Linear4bit and layer.compute_dtype == torch.float32
            state = weight.quant_state
            assert weight.dtype == torch.uint8 and weight.numel() == out_features * in_features // 2
            assert (state.quant_type, state.blocksize, state.nested) == (quant_type, BLOCK, double_quant)
            blocks = out_features * in_features // BLOCK
            assert state.absmax.numel() == blocks  # one scale per block: 1 byte when double-quantized, else 4
            assert state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
        else:
            assert type(layer) is bnb.nn.Linear8bitLt and not layer.state.has_fp16_weights
            assert weight.dtype == torch.int8 and weight.numel() == out_features * in_features
            assert weight.SCB.dtype == torch.float32 and weight.SCB.shape == (out_features,)
        err = (dequantized_weight(layer) - original[name]).abs()
        assert (err <= rounding_bound(original[name], layer)).all(), name
    float_bytes = sum(original[n].numel() * 4 for n in layers)
    assert weight_bytes * (8 // bits) == float_bytes // 4  # 4 bits or 8 bits a weight instead of 32


def test_quantize_keeps_biases_skips_modules_and_runs_any_shape():
    model = tiny_bert()  # hidden size 32: shapes bitsandbytes' CPU packing would raise on
    query_bias = model.bert.encoder.layer[0].attention.self.query.bias
    quantize(model, skip_modules=["classifier", "pooler.dense"])

    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query) is bnb.nn.Linear4bit and query.bias is query_bias
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    assert query.support_avx512bf16_for_cpu is False  # never packs: in_features 32 < the block size
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_quantize_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"bits=3 is not available; use 4 \(QLoRA's NF4/FP4\) or 8"):
        quantize(tiny_llama(), bits=3)
    with pytest.raises(ValueError, match=r"quant_type='int4' is not accepted; use one of \['nf4', 'fp4'\]"):
        quantize(tiny_llama(), quant_type="int4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="need bitsandbytes: pip install bitsandbytes"):
        quantize(tiny_llama())


# ---- training, saving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_leaves_the_quantized_base_bit_identical(bits):
    model = quantized_llama(bits)
    frozen = snapshot(model)
    scales = [
        m.weight.quant_state.absmax.clone() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    ]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))

    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, TunedLayer)]
    assert len(sizes) == 14
    assert peft_model.get_nb_trainable_parameters()[0] == sum(4 * (i + o) for i, o in sizes)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    train_and_check_frozen(peft_model, frozen, batch(), lr=1e-2)
    after = [m.weight.quant_state.absmax for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(torch.equal(a, b) for a, b in zip(scales, after, strict=True))


@pytest.mark.parametrize("bits", [4, 8])
def test_save_and_load_onto_a_fresh_quantized_base(bits, tmp_path):
    inputs = batch()
    model = get_peft_model(quantized_llama(bits), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    expected = train_mode_logits(model, inputs)
    assert (expected - train_mode_logits(quantized_llama(bits), inputs)).abs().max() > 1e-2
    model.save_pretrained(str(tmp_path))

    loaded = PeftModel.from_pretrained(quantized_llama(bits), str(tmp_path))
    torch.testing.assert_close(train_mode_logits(loaded, inputs), expected, atol=1e-6, rtol=1e-6)


# ---- merging -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "quant_type", "double_quant", "use_dora"),
    [(4, q, d, False) for q, d in SETTINGS_4BIT] + [(4, "nf4", True, True), (8, "nf4", True, False)],
    ids=[*IDS_4BIT, "nf4-double-dora", "8bit"],
)
def test_merge_into_a_quantized_base_costs_one_rounding(bits, quant_type, double_quant, use_dora):
    """merged = Q(W_deq + ΔW): each entry within the format's rounding of the exact float merge, the bound
    computed from the code table (`rounding_bound`); bit for bit what bitsandbytes stores for that weight."""
    inputs = batch()
    model = get_peft_model(
        quantized_llama(bits, quant_type, double_quant),
        LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora),
    )
    randomize_adapters(model)
    unmerged = train_mode_logits(model, inputs)
    targets = {
        name: expected_merge(layer.adapters["default"], reference_weight(layer.base_layer))
        for name, layer in tuned_layers(model.get_base_model()).items()
    }
    merged_model = model.merge_and_unload()

    for name, target in targets.items():
        layer = merged_model.get_submodule(name)
        assert type(layer) is (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
        merged = reference_weight(layer)
        assert ((merged - target).abs() <= rounding_bound(target, layer)).all(), name
        if bits == 4:  # the same as quantizing the float merge with bitsandbytes directly
            data, state = bnbF.quantize_4bit(target, compress_statistics=double_quant, quant_type=quant_type)
            assert torch.equal(merged, bnbF.dequantize_4bit(data, state)), name
    # the merged model keeps the adapter's effect: far closer to the adapted model than the base is
    base = train_mode_logits(quantized_llama(bits, quant_type, double_quant), inputs)
    merged = train_mode_logits(merged_model, inputs)
    assert (merged - unmerged).abs().max() < 0.5 * (base - unmerged).abs().max()


def test_unmerge_on_a_quantized_base_rounds_again():
    """unmerged = Q(Q(W + ΔW)_deq - ΔW): within the merge's error plus one more rounding of W."""
    model = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    layers = tuned_layers(model.get_base_model())
    before = {name: reference_weight(layer.base_layer) for name, layer in layers.items()}
    model.merge_adapter()
    merged = {name: reference_weight(layer.base_layer) for name, layer in layers.items()}
    model.unmerge_adapter()
    for name, layer in layers.items():
        delta = expected_merge(layer.adapters["default"], before[name]) - before[name]
        merge_error = (merged[name] - (before[name] + delta)).abs()
        target = merged[name] - delta
        error = (reference_weight(layer.base_layer) - before[name]).abs()
        assert (error <= merge_error + rounding_bound(target, layer.base_layer)).all(), name
        assert not layer.merged_adapters


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_dequantize_gives_the_exact_full_precision_model(bits):
    inputs = batch()
    model = get_peft_model(
        quantized_llama(bits), LoraConfig(r=4, target_modules="all-linear", use_dora=bits == 4)
    )
    randomize_adapters(model)
    expected = train_mode_logits(model, inputs)
    merged = model.merge_and_unload(dequantize=True)
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    assert all(m.weight.dtype == torch.float32 for m in merged.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(train_mode_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


# ---- bitsandbytes' CPU packing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", True), ("fp4", False)], ids=["nf4-double", "fp4"]
)
def test_merge_after_a_no_grad_forward_reads_the_packed_weight(quant_type, double_quant):
    inputs = batch()
    model = get_peft_model(
        quantized_llama(4, quant_type, double_quant), LoraConfig(r=4, target_modules="all-linear")
    )
    randomize_adapters(model)
    layers = tuned_layers(model.get_base_model())
    before = {name: reference_weight(layer.base_layer) for name, layer in layers.items()}
    run_packed(model, inputs)

    for name, layer in layers.items():
        scale = before[name].reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
        slack = (BF16_SCALE_ROUNDING * scale).expand(-1, BLOCK).reshape(before[name].shape) + 1e-6
        assert ((dequantized_weight(layer.base_layer) - before[name]).abs() <= slack).all(), name
        # what dequantize_4bit makes of the packed bytes (and what Hugging Face peft merges) is far off
        state = layer.base_layer.weight.quant_state
        naive = bnbF.dequantize_4bit(layer.base_layer.weight.data, state).float().reshape(before[name].shape)
        assert (naive - before[name]).abs().max() > 0.1 * before[name].abs().max(), name

    targets = {n: expected_merge(layer.adapters["default"], before[n]) for n, layer in layers.items()}
    merged_model = model.merge_and_unload()
    for name, target in targets.items():
        layer = merged_model.get_submodule(name)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        scale = target.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
        slack = (BF16_SCALE_ROUNDING * 2 * scale).expand(-1, BLOCK).reshape(target.shape)
        assert ((reference_weight(layer) - target).abs() <= rounding_bound(target, layer) + slack).all(), name


def test_state_dict_after_a_no_grad_forward_keeps_the_base():
    """bitsandbytes' own unpacking (in state_dict) leaves the scales transposed without double quantization;
    down_proj (128 inputs, two blocks a row) would come back scrambled."""
    model = get_peft_model(
        quantized_llama(4, "nf4", double_quant=False), LoraConfig(r=4, target_modules="all-linear")
    )
    layers = {n: m.base_layer for n, m in tuned_layers(model.get_base_model()).items()}
    before = {name: reference_weight(layer) for name, layer in layers.items()}
    run_packed(model, batch())
    state = model.state_dict()  # save_pretrained takes it too

    for name, layer in layers.items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(state[f"base_model.model.{name}.base_layer.weight"], layer.weight.data)
        scale = before[name].reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
        slack = (BF16_SCALE_ROUNDING * scale).expand(-1, BLOCK).reshape(before[name].shape) + 1e-6
        assert ((reference_weight(layer) - before[name]).abs() <= slack).all(), name


def test_training_after_a_no_grad_forward_still_reaches_every_adapter():
    """The packed kernel has no backward; without unpacking, gradients to earlier layers would be lost."""
    inputs = batch()

    def gradients(pack: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model)
        if pack:
            run_packed(model, inputs)
        model.train()
        model(**inputs).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    packed, plain = gradients(pack=True), gradients(pack=False)
    for (
        name,
        grad,
    ) in plain.items():  # the packed scales' bfloat16 rounding moves them by under 1% (90% if lost)
        assert (packed[name] - grad).norm() < 0.03 * grad.norm(), name


def test_dora_on_4bit_matches_the_equation_with_the_dequantized_weight():
    """h = (m/‖W + s·B A‖)(W x + s·B A x), W dequantized; in train mode, and packed (bfloat16) in eval."""
    model = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_adapters(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    adapter, weight = layer.adapters["default"], reference_weight(layer.base_layer)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))

    delta = adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
    scale = adapter.lora_magnitude_vector / (weight + delta).norm(dim=1)
    expected = scale * (F.linear(x, weight) + F.linear(x, delta))
    model.train()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        layer(x)  # packs on AVX512-BF16 CPUs; the second call computes in bfloat16
        packed = layer(x)
    torch.testing.assert_close(packed, expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


# ---- prepare_model_for_kbit_training -----------------------------------------------------------------------


def test_prepare_model_for_kbit_training_freezes_upcasts_and_checkpoints():
    model = quantize(tiny_llama(hidden_size=64).to(torch.bfloat16))
    prepare_model_for_kbit_training(model)

    assert not any(p.requires_grad for p in model.parameters())
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            assert param.dtype == torch.uint8 and param.quant_state.dtype == torch.bfloat16, name
        else:
            assert param.dtype == torch.float32, name  # norms, embeddings, the head
    blocks = model.model.layers
    assert all(block.gradient_checkpointing for block in blocks)
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert model.get_input_embeddings()(torch.tensor([[3]])).requires_grad

    frozen = snapshot(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train_and_check_frozen(peft_model, frozen, batch(), lr=1e-2)
    expected = train_mode_logits(peft_model, batch())
    merged = peft_model.merge_and_unload(dequantize=True)  # float32 layers, to match the upcast model
    assert {m.weight.dtype for m in merged.modules() if isinstance(m, nn.Linear)} == {torch.float32}
    torch.testing.assert_close(train_mode_logits(merged, batch()), expected, atol=1e-5, rtol=1e-5)

    other = prepare_model_for_kbit_training(
        quantize(tiny_llama()), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert other.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    with pytest.raises(
        ValueError, match="has no gradient_checkpointing_enable .* use_gradient_checkpointing=False"
    ):
        prepare_model_for_kbit_training(nn.Sequential(nn.Linear(4, 4)))
