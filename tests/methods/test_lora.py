"""LoRA, rsLoRA, DoRA and the LoRA initialisations against hand computations of their equations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, snapshot, tiny_gpt2, tiny_llama, train_and_check_frozen
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.layer import TunedLayer, is_adapter_parameter


class Toy(nn.Module):
    """One layer of every kind LoRA adapts; targeting works on any nn.Module."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(6, 5)
        self.emb = nn.Embedding(10, 4)
        self.conv1d = Conv1D(5, 6)  # GPT-2's linear layer: weight stored (in=6, out=5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def toy_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "lin": torch.randn(4, 6, generator=g),
        "conv1d": torch.randn(2, 3, 6, generator=g),
        "emb": torch.randint(0, 10, (2, 5), generator=g),
        "conv": torch.randn(2, 3, 5, 5, generator=g),
    }


def adapter(layer: TunedLayer, name: str = "default"):
    return layer.adapters[name]


def wrap_toy(**config) -> tuple[Toy, Toy]:
    """(reference copy of the toy, toy wrapped with LoRA on every layer)."""
    reference = Toy()
    toy = Toy()
    config.setdefault("target_modules", ["lin", "emb", "conv1d", "conv"])
    PeftModel(toy, LoraConfig(**config))
    return reference, toy


def lin_A_B(a) -> tuple[torch.Tensor, torch.Tensor]:
    return a.lora_A.weight.detach(), a.lora_B.weight.detach()


# ---- forward equations ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_matches_hand_computation(use_rslora):
    r, alpha = 4, 16
    ref, toy = wrap_toy(r=r, lora_alpha=alpha, init_lora_weights=False, use_rslora=use_rslora)
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    inputs = toy_inputs()
    with torch.no_grad():
        # nn.Linear: h = W x + b + s B A x
        x = inputs["lin"]
        A, B = lin_A_B(adapter(toy.lin))
        assert adapter(toy.lin).scaling == pytest.approx(s)
        expected = x @ ref.lin.weight.T + ref.lin.bias + s * (x @ A.T @ B.T)
        torch.testing.assert_close(toy.lin(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(toy.lin(x), ref.lin(x), atol=1e-3)

        # Conv1D stores W as (in, out): h = x W + b + s B A x
        x = inputs["conv1d"]
        A, B = lin_A_B(adapter(toy.conv1d))
        assert A.shape == (r, 6) and B.shape == (5, r)
        expected = x @ ref.conv1d.weight + ref.conv1d.bias + s * (x @ A.T @ B.T)
        torch.testing.assert_close(toy.conv1d(x), expected, atol=1e-5, rtol=1e-5)

        # nn.Embedding: h = E[x] + s (B A)ᵀ[x], A ∈ R^{r×vocab}, B ∈ R^{dim×r}
        x = inputs["emb"]
        a = adapter(toy.emb)
        A, B = a.lora_embedding_A.detach(), a.lora_embedding_B.detach()
        assert A.shape == (r, 10) and B.shape == (4, r)
        expected = ref.emb.weight[x] + s * (B @ A).T[x]
        torch.testing.assert_close(toy.emb(x), expected, atol=1e-5, rtol=1e-5)

        # nn.Conv2d: h = conv(x, W + s B∘A) + b, B a 1×1 kernel over A's r channels
        x = inputs["conv"]
        a = adapter(toy.conv)
        A, B = a.lora_A.weight.detach(), a.lora_B.weight.detach()
        assert A.shape == (r, 3, 3, 3) and B.shape == (4, r, 1, 1)
        delta = (B.flatten(1) @ A.flatten(1)).view_as(ref.conv.weight)
        expected = F.conv2d(x, ref.conv.weight + s * delta, ref.conv.bias, padding=1)
        torch.testing.assert_close(toy.conv(x), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scale_is_alpha_over_sqrt_r():
    model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8, use_rslora=True))
    plain = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert adapter(q).scaling == pytest.approx(8 / 4)
    assert adapter(plain.get_base_model().model.layers[0].self_attn.q_proj).scaling == pytest.approx(8 / 16)


def test_dora_forward_matches_formula():
    """h = m ⊙ (W + sBA) x / ‖W + sBA‖_row + b, for nn.Linear, GPT-2's Conv1D, Embedding and Conv2d."""
    r, alpha = 4, 8
    s = alpha / r
    ref, toy = wrap_toy(r=r, lora_alpha=alpha, use_dora=True)
    # Random A, B and magnitude: the magnitude no longer equals the norm, so every term matters.
    randomize_adapters(toy, seed=11)
    inputs = toy_inputs()
    with torch.no_grad():
        for name, weight_oi, bias in [
            ("lin", ref.lin.weight, ref.lin.bias),
            ("conv1d", ref.conv1d.weight.T, ref.conv1d.bias),
        ]:
            layer = getattr(toy, name)
            a = adapter(layer)
            A, B = lin_A_B(a)
            m = a.lora_magnitude_vector.detach()
            combined = weight_oi + s * B @ A
            x = inputs[name]
            expected = m * (x @ combined.T) / combined.norm(dim=1) + bias
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

        # Embedding: m ⊙ (E + s(BA)ᵀ)[x] / ‖E + s(BA)ᵀ‖ over the vocabulary, per dimension
        a = adapter(toy.emb)
        A, B, m = a.lora_embedding_A.detach(), a.lora_embedding_B.detach(), a.lora_magnitude_vector.detach()
        combined = ref.emb.weight + s * (B @ A).T
        x = inputs["emb"]
        expected = m * combined[x] / combined.norm(dim=0)
        torch.testing.assert_close(toy.emb(x), expected, atol=1e-5, rtol=1e-5)

        # Conv2d: one kernel W + s·B∘A, the norm per output filter
        a = adapter(toy.conv)
        A, B, m = a.lora_A.weight.detach(), a.lora_B.weight.detach(), a.lora_magnitude_vector.detach()
        combined = ref.conv.weight + s * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
        x = inputs["conv"]
        norm = combined.flatten(1).norm(dim=1).view(1, -1, 1, 1)
        expected = m * F.conv2d(x, combined, padding=1) / norm + ref.conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(toy.conv(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_at_init_is_the_base_model(input_ids):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", use_dora=True))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        adapter(q).lora_magnitude_vector.detach(), base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_dora_gradients_treat_the_norm_as_a_constant():
    ref, toy = wrap_toy(use_dora=True, target_modules=["lin"], init_lora_weights=False, lora_alpha=16, r=4)
    a = adapter(toy.lin)
    x = toy_inputs()["lin"]
    toy.lin(x).pow(2).sum().backward()
    # reference: the same formula by hand, with the row norm detached (DoRA paper, section 4.3)
    leaves = (a.lora_A.weight, a.lora_B.weight, a.lora_magnitude_vector)
    A, B, m = (t.detach().clone().requires_grad_() for t in leaves)
    combined = ref.lin.weight + 4 * B @ A
    (m * (x @ combined.T) / combined.norm(dim=1).detach() + ref.lin.bias).pow(2).sum().backward()
    for got, want in [(a.lora_A.weight, A), (a.lora_B.weight, B), (a.lora_magnitude_vector, m)]:
        assert want.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    assert toy.lin.base_layer.weight.grad is None


# ---- fused kernels and DoRA's cached norm --------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6), "transposed"])
def test_lora_linear_forward_for_any_input_layout(shape, grad):
    """h = W x + b + s B A x for unbatched, batched and non-contiguous x; without gradients the sum is
    written into the base output in place, with them it is a new tensor."""
    ref, toy = wrap_toy(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False)
    x = torch.randn(6, 4).T if shape == "transposed" else torch.randn(shape)
    A, B = lin_A_B(adapter(toy.lin))
    with torch.no_grad():
        expected = ref.lin(x) + 2 * (x @ A.T @ B.T)
    with torch.set_grad_enabled(grad):
        out = toy.lin(x)
    assert out.shape == expected.shape and out.requires_grad == grad
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("name", ["lin", "conv1d"])
def test_lora_gradients_equal_autograd_on_the_formula(name, x_needs_grad, dropout):
    """The update is added into the base output by a Function with its backward written out: ∂x, ∂A, ∂B
    and the output must equal autograd's on h = W x + b + s·B A dropout(x) (the same dropout mask)."""
    ref, toy = wrap_toy(
        r=4, lora_alpha=8, target_modules=[name], init_lora_weights=False, lora_dropout=dropout
    )
    layer, base = getattr(toy, name), getattr(ref, name)
    x = torch.randn(2, 3, 6, requires_grad=x_needs_grad)
    grad = torch.randn(2, 3, 5)
    torch.manual_seed(7)
    out = layer(x)
    out.backward(grad)
    a = adapter(layer)
    A, B = (w.detach().clone().requires_grad_() for w in (a.lora_A.weight, a.lora_B.weight))
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    torch.manual_seed(7)
    expected = base(x_ref) + 2 * (a.lora_dropout(x_ref) @ A.T @ B.T)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.lora_A.weight.grad, A.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.lora_B.weight.grad, B.grad, atol=1e-6, rtol=1e-5)
    if x_needs_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_dora_gradients_equal_autograd_on_the_formula(zero_magnitude):
    """DoRA's training Function (m/n rescaled in place when no m is 0, kept apart otherwise) against
    autograd on out = m ⊙ (W x + s·B A x) / n + b with n held constant."""
    ref, toy = wrap_toy(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False, use_dora=True)
    a = adapter(toy.lin)
    if zero_magnitude:
        with torch.no_grad():
            a.lora_magnitude_vector[1] = 0.0
    x = torch.randn(2, 3, 6, requires_grad=True)
    grad = torch.randn(2, 3, 5)
    toy.lin(x).backward(grad)
    A, B, m = (
        t.detach().clone().requires_grad_()
        for t in (a.lora_A.weight, a.lora_B.weight, a.lora_magnitude_vector)
    )
    x_ref = x.detach().clone().requires_grad_()
    weight, bias = ref.lin.weight, ref.lin.bias
    norm = torch.linalg.norm(weight + 2 * B @ A, dim=1).detach()
    expected = m * (x_ref @ weight.T + 2 * (x_ref @ A.T @ B.T)) / norm + bias
    expected.backward(grad)
    for ours, theirs in [
        (a.lora_magnitude_vector.grad, m.grad),
        (a.lora_A.weight.grad, A.grad),
        (x.grad, x_ref.grad),
    ]:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.lora_B.weight.grad, B.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_under_autocast_takes_the_plain_path(use_dora):
    """Under bfloat16 autocast the fused training Functions step aside (their in-place adds would meet mixed
    dtypes); the result is the float32 one to bfloat16 precision and gradients reach A and B."""
    ref, toy = wrap_toy(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False, use_dora=use_dora)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = toy.lin(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), toy.lin(x).detach(), atol=0.05, rtol=0.05)
    assert adapter(toy.lin).lora_A.weight.grad is not None and adapter(toy.lin).lora_B.weight.grad is not None


def test_lora_over_a_bfloat16_base_adds_the_float32_update_in_bfloat16():
    ref, toy = wrap_toy(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False)
    ref.to(torch.bfloat16)
    toy.lin.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 6).to(torch.bfloat16)
    A, B = lin_A_B(adapter(toy.lin))
    assert A.dtype == torch.float32
    with torch.no_grad():
        expected = ref.lin(x) + (2 * (x.float() @ A.T @ B.T)).to(torch.bfloat16)
        out = toy.lin(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def dora_expected(layer: TunedLayer, x: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + s B A) x / ‖W + s B A‖ + b, per output row, from the layer's tensors as they are now."""
    a = adapter(layer)
    A, B = lin_A_B(a)
    weight = layer.base_layer.weight.detach()
    combined = (weight.T if isinstance(layer.base_layer, Conv1D) else weight) + a.scaling * B @ A
    m = a.lora_magnitude_vector.detach()
    return m * (x @ combined.T) / torch.linalg.norm(combined, dim=1) + layer.base_layer.bias.detach()


def count_norms(monkeypatch, kind: type) -> list:
    calls = []
    compute = kind.compute_norm
    monkeypatch.setattr(kind, "compute_norm", lambda self, base: calls.append(1) or compute(self, base))
    return calls


@pytest.mark.parametrize("name", ["lin", "conv1d"])
def test_dora_norm_without_gradients_is_computed_again_exactly_when_w_a_or_b_change(name, monkeypatch):
    ref, toy = wrap_toy(use_dora=True, target_modules=[name], init_lora_weights=False)
    layer, x = getattr(toy, name), toy_inputs()[name]
    a = adapter(layer)
    calls = count_norms(monkeypatch, type(a))
    toy.eval()

    def check(computed: int) -> None:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dora_expected(layer, x), atol=1e-5, rtol=1e-5)
        assert len(calls) == computed

    check(1)  # computed in the first forward without gradients
    check(1)
    with torch.no_grad():
        a.lora_magnitude_vector.mul_(1.5)  # m is not part of the norm
    check(1)
    with torch.no_grad():
        a.lora_B.weight.add_(0.1)
    check(2)
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.1)  # the frozen base changes in place
    check(3)
    layer.base_layer.load_state_dict(ref.get_submodule(name).state_dict())
    check(4)
    layer.base_layer.weight.data = layer.base_layer.weight.data * 0.9  # new storage
    check(5)
    with torch.no_grad():
        before = layer(x)
        layer.merge(["default"])
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
        layer.unmerge()  # merging reused the norm; unmerging wrote W back
    check(6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["lin", "conv1d"])
def test_dora_follows_every_optimizer_step_in_training_and_in_eval_between_steps(name, fused, monkeypatch):
    """The Trainer's loop: training steps with evaluation (no gradients) in between. A fused AdamW writes
    A, B and m without bumping their version counters; the norm must still follow every step."""
    ref, toy = wrap_toy(use_dora=True, target_modules=[name], init_lora_weights=False)
    layer, x = getattr(toy, name), toy_inputs()[name]
    a = adapter(layer)
    calls = count_norms(monkeypatch, type(a))
    optimizer = torch.optim.AdamW(a.parameters(), lr=0.1, fused=fused)
    for step in range(3):
        toy.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dora_expected(layer, x), atol=1e-5, rtol=1e-5)
            layer(x)  # kept while nothing changes
        toy.train()
        out = layer(x)
        torch.testing.assert_close(out, dora_expected(layer, x), atol=1e-5, rtol=1e-5)
        out.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert len(calls) == 2 * step + 2  # once in eval (then kept), once in training


def test_dora_norm_from_inference_mode_is_not_saved_for_backward(monkeypatch):
    ref, toy = wrap_toy(use_dora=True, target_modules=["lin"], init_lora_weights=False)
    a, x = adapter(toy.lin), toy_inputs()["lin"]
    calls = count_norms(monkeypatch, type(a))
    with torch.inference_mode():
        toy.lin(x)
        toy.lin(x)
    assert len(calls) == 1
    toy.lin(x).sum().backward()  # would raise if the inference-mode norm were saved for backward
    assert len(calls) == 2 and a.lora_magnitude_vector.grad is not None
    with torch.no_grad():
        toy.lin(x)
    assert len(calls) == 3  # a step may have followed the forward with gradients


def test_dora_norms_equal_the_direct_formula():
    """‖W + s·B A‖ over the rows (Linear, Conv1D) or the vocabulary (Embedding), against the plain formula."""
    ref, toy = wrap_toy(use_dora=True, init_lora_weights=False)
    randomize_adapters(toy, seed=3)
    with torch.no_grad():
        for name, combined, dim in [
            ("lin", lambda s, BA: ref.lin.weight + s * BA, 1),
            ("conv1d", lambda s, BA: ref.conv1d.weight.T + s * BA, 1),
            ("emb", lambda s, BA: ref.emb.weight + s * BA.T, 0),
        ]:
            layer = getattr(toy, name)
            a = adapter(layer)
            A, B = a.low_rank_factors()
            expected = torch.linalg.norm(combined(a.scaling, B @ A), dim=dim)
            torch.testing.assert_close(a.weight_norm(layer.base_layer), expected, atol=1e-6, rtol=1e-6)


def test_dora_embedding_norm_follows_its_factors(monkeypatch):
    ref, toy = wrap_toy(use_dora=True, target_modules=["emb"], init_lora_weights=False)
    a, x = adapter(toy.emb), toy_inputs()["emb"]
    calls = count_norms(monkeypatch, type(a))
    with torch.no_grad():
        toy.emb(x)
        a.lora_embedding_B.add_(1.0)
        out = toy.emb(x)
    assert len(calls) == 2  # in the first forward, then again once B had changed
    combined = ref.emb.weight + a.scaling * (a.lora_embedding_B @ a.lora_embedding_A).T.detach()
    expected = a.lora_magnitude_vector.detach() * combined[x] / combined.norm(dim=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---- initialisations -----------------------------------------------------------------------------


def test_default_init_gives_the_base_model_exactly(input_ids):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    model.add_adapter("emb", LoraConfig(target_modules=["embed_tokens"]))
    model.set_adapter(["default", "emb"])
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    A, B = lin_A_B(adapter(q))
    assert A.abs().sum() > 0 and torch.equal(B, torch.zeros_like(B))
    emb = adapter(model.get_base_model().model.embed_tokens, "emb")
    assert torch.equal(emb.lora_embedding_A, torch.zeros_like(emb.lora_embedding_A))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)


def big_linear_adapter(init):
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(256, 256))
    PeftModel(module, LoraConfig(r=8, target_modules=["0"], init_lora_weights=init))
    return adapter(module[0])


def test_gaussian_init_statistics():
    a = big_linear_adapter("gaussian")
    A, B = lin_A_B(a)
    assert A.shape == (8, 256) and B.shape == (256, 8)
    assert torch.equal(B, torch.zeros_like(B))
    # A ~ N(0, (1/r)²): 2048 samples, so the std is within a few percent and the mean near 0.
    assert A.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert abs(A.mean().item()) < 4 * (1 / 8) / math.sqrt(A.numel())


def test_false_init_makes_both_factors_random():
    a = big_linear_adapter(False)
    A, B = lin_A_B(a)
    # nn.Linear's default: U(-1/√fan_in, 1/√fan_in), std = 1/√(3·fan_in)
    assert A.abs().max() <= 1 / math.sqrt(256) and B.abs().max() <= 1 / math.sqrt(8)
    assert A.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.1)
    assert B.std().item() == pytest.approx(1 / math.sqrt(3 * 8), rel=0.1)


def test_false_init_changes_outputs(input_ids):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, base(input_ids).logits, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_pissa_olora_keep_outputs_and_split_the_weight(init, builder, input_ids):
    base = builder()
    r, alpha = 4, 8
    s = alpha / r
    targets = ["q_proj", "o_proj", "down_proj"] if builder is tiny_llama else ["c_attn", "c_fc"]
    model = get_peft_model(
        builder(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=init)
    )
    original = dict(base.named_parameters())
    layers = [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, TunedLayer)]
    assert len(layers) == 2 * len(targets)
    for name, layer in layers:
        transposed = type(layer.base_layer).__name__ == "Conv1D"
        w = original[f"{name}.weight"].detach()
        w_oi = w.T if transposed else w
        residual = layer.base_layer.weight.detach()
        residual_oi = residual.T if transposed else residual
        A, B = lin_A_B(adapter(layer))
        # W_res + s·B A == W_original, and the adapter carries a real part of W
        torch.testing.assert_close(residual_oi + s * B @ A, w_oi, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(residual_oi, w_oi, atol=1e-3)
        if init == "pissa":  # s·B A is the best rank-r approximation of W
            u, sv, vh = torch.linalg.svd(w_oi)
            torch.testing.assert_close(
                s * B @ A, u[:, :r] @ torch.diag(sv[:r]) @ vh[:r], atol=1e-5, rtol=1e-5
            )
        if init == "olora":  # B holds orthonormal columns (the first r of Q)
            torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, atol=1e-4, rtol=1e-4)


# ---- merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_every_layer_type(use_dora):
    targets = ["lin", "emb", "conv1d", "conv"]
    ref, toy = wrap_toy(init_lora_weights=False, use_dora=use_dora, target_modules=targets)
    randomize_adapters(toy, seed=2)
    inputs = toy_inputs()
    with torch.no_grad():
        before = {n: getattr(toy, n)(inputs[n]) for n in targets}
        for n in targets:
            getattr(toy, n).merge(["default"])
            layer = getattr(toy, n)
            assert layer.merged_adapters == ["default"]
            assert not torch.allclose(layer.base_layer.weight, getattr(ref, n).weight, atol=1e-4)
            # merged: the base layer alone computes the adapted output
            torch.testing.assert_close(layer.base_layer(inputs[n]), before[n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer(inputs[n]), before[n], atol=1e-5, rtol=1e-5)
            layer.unmerge()
            assert layer.merged_adapters == []
            torch.testing.assert_close(layer.base_layer.weight, getattr(ref, n).weight, atol=1e-6, rtol=1e-5)
            if n != "emb":
                assert torch.equal(layer.base_layer.bias, getattr(ref, n).bias)
            torch.testing.assert_close(layer(inputs[n]), before[n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_equals_unmerged_output(use_dora, input_ids):
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_dora=use_dora),
    )
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(input_ids).logits
        plain = model.merge_and_unload()
        assert not any(isinstance(m, TunedLayer) for m in plain.modules())
        assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(plain(input_ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(tiny_llama()(input_ids).logits, expected, atol=1e-3)


def test_merge_adapter_then_unmerge_restores_the_model(input_ids):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged_free = {
            n.replace(".base_layer", ""): p
            for n, p in model.get_base_model().named_parameters()
            if not is_adapter_parameter(n)
        }
        for name, p in base.named_parameters():
            torch.testing.assert_close(merged_free[name], p, atol=1e-6, rtol=1e-5)


def test_merging_a_tied_weight_warns(input_ids):
    """GPT-2 ties wte and lm_head: merging a LoRA on wte would change lm_head too."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["wte"]))
    randomize_adapters(model)
    with pytest.warns(UserWarning, match=r"'transformer.wte' also changes \['lm_head.weight'\], which share"):
        model.merge_adapter()
    untied = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "lm_head"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*share its weights.*")
        untied.merge_adapter()


def test_bias_all_and_lora_only_train_base_biases():
    reference = tiny_gpt2()
    all_biases = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(".bias"))
    lora_params = 2 * 8 * (32 + 96)  # c_attn: in 32, out 96, two blocks
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="all"), adapter_name="a")
    assert model.get_nb_trainable_parameters()[0] == lora_params + all_biases
    # a second, inactive adapter that also trains the biases must not freeze them for the active one
    model.add_adapter("b", LoraConfig(target_modules=["c_attn"], bias="all"))
    assert model.get_nb_trainable_parameters()[0] == lora_params + all_biases
    only = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in only.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("bias")} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)
    }
    assert only.get_nb_trainable_parameters()[0] == lora_params + 2 * 96


# ---- training ------------------------------------------------------------------------------------


def test_training_lowers_loss_and_leaves_the_base_bit_identical(input_ids):
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_adapter_parameter(n))
    assert len(frozen) == 21
    train_and_check_frozen(model, frozen, {"input_ids": input_ids, "labels": input_ids}, lr=1e-2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_parameter_count_is_analytic(use_dora):
    r = 4
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules="all-linear", use_dora=use_dora))
    cfg = model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [
        (h, h),
        (h, kv),
        (h, kv),
        (h, h),
        (h, inter),
        (h, inter),
        (inter, h),
    ]  # (in, out): q k v o gate up down
    per_layer = sum(r * (i + o) + (o if use_dora else 0) for i, o in shapes)
    expected = cfg.num_hidden_layers * per_layer
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in tiny_llama().parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_rank_and_alpha_patterns_reach_the_layers():
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
        ),
    )
    layers = model.get_base_model().model.layers
    assert adapter(layers[0].self_attn.q_proj).lora_A.out_features == 4
    assert adapter(layers[0].self_attn.q_proj).scaling == pytest.approx(2.0)
    assert adapter(layers[1].self_attn.q_proj).scaling == pytest.approx(8.0)
    assert adapter(layers[0].self_attn.v_proj).lora_A.out_features == 2
    assert adapter(layers[0].self_attn.v_proj).scaling == pytest.approx(4.0)


def test_dropout_only_touches_the_lora_path():
    ref, toy = wrap_toy(target_modules=["lin"], lora_dropout=0.5, init_lora_weights=False)
    x = toy_inputs()["lin"]
    toy.train()
    torch.manual_seed(0)
    out = toy.lin(x)
    torch.manual_seed(0)
    kept = F.dropout(x, 0.5, training=True)
    A, B = lin_A_B(adapter(toy.lin))
    expected = ref.lin(x) + (kept @ A.T @ B.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    toy.eval()
    torch.testing.assert_close(toy.lin(x), ref.lin(x) + x @ A.T @ B.T, atol=1e-5, rtol=1e-5)
