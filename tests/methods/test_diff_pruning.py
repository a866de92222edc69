"""Diff pruning: the hard-concrete gate, the L0 term, the projection, the sparse file and merging, against
hand computations of the paper's equations."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import VOCAB, snapshot, tiny_bert, tiny_gpt2, tiny_llama, train_and_check_frozen
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import NotMergeableError, PeftModel, get_peft_model
from peftkit.layer import TunedLayer, is_adapter_parameter
from peftkit.methods.diff_pruning import DiffPruningConfig

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_weights(hidden: int = 32, intermediate: int = 64, kv: int = 16, layers: int = 2) -> list[int]:
    """Sizes of the weights "all-linear" targets in a Llama: q, k, v, o, gate, up, down per block."""
    block = [hidden * hidden, kv * hidden, kv * hidden, hidden * hidden] + [intermediate * hidden] * 3
    return block * layers


def gpt2_weights() -> list[int]:
    """c_attn 32→96, attn c_proj 32→32, c_fc 32→128, mlp c_proj 128→32 per block (lm_head is left out)."""
    return [32 * 96, 32 * 32, 32 * 128, 128 * 32] * 2


def adapters(model: PeftModel, name: str = "default") -> dict[str, nn.Module]:
    return {
        n: m.adapters[name]
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, TunedLayer) and name in m.adapters
    }


def randomize(model: PeftModel, seed: int, name: str = "default") -> None:
    """Random δ and log α spread around 0, so that evaluation gates are a mix of 0, 1 and in between."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model, name).values():
            if a.projected:
                a.diff_values.copy_(torch.randn(a.diff_values.shape, generator=g) * 0.3)
            else:
                a.diff_weight.copy_(torch.randn(a.diff_weight.shape, generator=g) * 0.3)
                a.gate_log_alpha.copy_(torch.randn(a.gate_log_alpha.shape, generator=g) * 2)


def eval_gate(log_alpha: torch.Tensor, low: float = -1.5, high: float = 1.5) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(log_alpha) * (high - low) + low, 0, 1)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv1d = Conv1D(5, 6)  # weight stored (in=6, out=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.conv1d(x)


# ---- config -------------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    config = DiffPruningConfig()
    assert (config.density, config.target_modules, config.l0_penalty) == (0.005, "all-linear", 1.0)
    assert (config.gate_stretch_low, config.gate_stretch_high, config.gate_temperature) == (-1.5, 1.5, 1.0)
    assert config.to_dict()["peft_type"] == "DIFF_PRUNING"
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\] \(e.g. 0.005 for 0.5%\), got 0\."):
        DiffPruningConfig(density=0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\].*, got 1.5"):
        DiffPruningConfig(density=1.5)
    with pytest.raises(ValueError, match=r"gate_stretch_low must be a finite number < 0 .*, got 0.1"):
        DiffPruningConfig(gate_stretch_low=0.1)
    with pytest.raises(ValueError, match=r"gate_stretch_high must be a finite number > 1 .*, got 1.0"):
        DiffPruningConfig(gate_stretch_high=1.0)
    with pytest.raises(ValueError, match=r"l0_penalty must be a finite number >= 0 .*, got -1"):
        DiffPruningConfig(l0_penalty=-1)
    with pytest.raises(ValueError, match=r"gate_temperature must be a finite number > 0 .*, got '1'"):
        DiffPruningConfig(gate_temperature="1")
    with pytest.raises(TypeError, match=r"no option 'sparsity' \(did you mean 'density'\?\)"):
        DiffPruningConfig(sparsity=0.01)


# ---- counting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "weights", "total", "kept"),
    [(tiny_llama, llama_weights(), 18432, 92), (tiny_gpt2, gpt2_weights(), 24576, 120)],
)
def test_trainable_count_is_two_dense_tensors_per_weight_then_the_kept_entries(build, weights, total, kept):
    model = get_peft_model(build(), DiffPruningConfig())
    assert sum(weights) == total
    # δ and log α, each the size of its weight; nothing else trains (CAUSAL_LM has no trained head)
    assert model.get_nb_trainable_parameters()[0] == 2 * total
    assert len(adapters(model)) == len(weights)
    model.finalize_diff_pruning()
    assert sum(round(0.005 * n) for n in weights) == kept
    assert model.get_nb_trainable_parameters()[0] == kept  # the kept values go on training, mask fixed
    assert all(
        not hasattr(a, "diff_weight") and not hasattr(a, "gate_log_alpha") for a in adapters(model).values()
    )


# ---- forward ------------------------------------------------------------------------------------------


def test_eval_forward_uses_the_deterministic_gate():
    toy, reference = Toy(), Toy()
    PeftModel(toy, DiffPruningConfig(target_modules=["lin", "conv1d"]))
    toy.eval()
    g = torch.Generator().manual_seed(0)
    lin, conv = toy.lin.adapters["default"], toy.conv1d.adapters["default"]
    with torch.no_grad():
        for a in (lin, conv):
            a.diff_weight.copy_(torch.randn(a.diff_weight.shape, generator=g))
            a.gate_log_alpha.copy_(torch.randn(a.gate_log_alpha.shape, generator=g) * 2)
    gate = eval_gate(lin.gate_log_alpha.detach())
    assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        w_lin = reference.lin.weight + gate * lin.diff_weight  # (out, in)
        expected_lin = x @ w_lin.T + reference.lin.bias
        w_conv = reference.conv1d.weight + eval_gate(conv.gate_log_alpha) * conv.diff_weight  # (in, out)
        expected_conv = x @ w_conv + reference.conv1d.bias
        torch.testing.assert_close(toy.lin(x), expected_lin)
        torch.testing.assert_close(toy.conv1d(x), expected_conv)
        torch.testing.assert_close(toy.lin(x), toy.lin(x), atol=0, rtol=0)  # no sampling in eval


def test_training_forward_samples_a_reparameterised_hard_concrete_gate():
    toy, reference = Toy(), Toy()
    config = DiffPruningConfig(
        target_modules=["lin"], gate_temperature=2 / 3, gate_stretch_low=-0.1, gate_stretch_high=1.1
    )
    PeftModel(toy, config)
    toy.train()
    a = toy.lin.adapters["default"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a.diff_weight.copy_(torch.randn(5, 6, generator=g))
        a.gate_log_alpha.copy_(torch.randn(5, 6, generator=g))
    x = torch.randn(4, 6, generator=g)
    torch.manual_seed(5)
    u = torch.rand(5, 6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a.gate_log_alpha.detach()) / (2 / 3))
    z = torch.clamp(s * (1.1 + 0.1) - 0.1, 0, 1)
    expected = x @ (reference.lin.weight + z * a.diff_weight.detach()).T + reference.lin.bias
    torch.manual_seed(5)
    out = toy.lin(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    inside = (z > 0) & (z < 1)
    assert inside.any() and (~inside).any()
    # gradients reach log α through the sample exactly where the gate is not clipped
    assert torch.equal(a.gate_log_alpha.grad != 0, inside)
    assert not torch.equal(toy.lin(x), toy.lin(x))  # a fresh sample every call


def test_l0_term_matches_the_formula_and_only_applies_in_training(input_ids):
    config = DiffPruningConfig(
        l0_penalty=0.7, gate_temperature=2 / 3, gate_stretch_low=-0.1, gate_stretch_high=1.1
    )
    model = get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters(model).values():  # δ stays 0, so the task loss is the base loss whatever z is
            a.gate_log_alpha.copy_(torch.randn(a.gate_log_alpha.shape, generator=g))
    log_alphas = [a.gate_log_alpha.detach() for a in adapters(model).values()]
    expected_l0 = sum(torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1)).sum() for la in log_alphas)
    penalty = 0.7 * expected_l0 / sum(la.numel() for la in log_alphas)
    base = tiny_llama()(input_ids=input_ids, labels=input_ids).loss
    # the adapters start in the mode of the model they adapt (eval here): no sampling, no penalty
    torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, base)
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(loss, base + penalty)
    torch.testing.assert_close(model.diff_pruning_penalty(), penalty)
    loss.backward()
    a = next(iter(adapters(model).values()))
    assert a.gate_log_alpha.grad.abs().sum() > 0  # the penalty alone pushes the gates
    model.eval()
    torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, base)
    model.train()
    model.finalize_diff_pruning()  # no gates left: nothing is added
    torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, base)


def test_training_lowers_the_task_loss_and_leaves_the_base_bit_identical(input_ids):
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, DiffPruningConfig(l0_penalty=0.1))
    inputs = {"input_ids": input_ids, "labels": input_ids}
    model.eval()
    with torch.no_grad():
        before = model(**inputs).loss.item()
    train_and_check_frozen(model, frozen, inputs, lr=1e-2)
    model.eval()
    with torch.no_grad():
        after = model(**inputs).loss.item()  # the task loss alone, with the evaluation gates
    assert after < before - 0.05, (before, after)
    assert all(a.diff_weight.abs().sum() > 0 for a in adapters(model).values())


# ---- projection -------------------------------------------------------------------------------------


def test_projection_keeps_exactly_the_largest_gated_entries_per_layer(input_ids):
    model = get_peft_model(tiny_llama(), DiffPruningConfig(density=0.02))
    randomize(model, seed=3)
    model.eval()
    expected = {}
    for name, a in adapters(model).items():
        gated = (eval_gate(a.gate_log_alpha) * a.diff_weight).detach().flatten()
        k = round(0.02 * gated.numel())
        order = gated.abs().argsort(descending=True)
        assert gated.abs()[order[k - 1]] > gated.abs()[order[k]]  # no tie at the cut in this draw
        kept = order[:k].sort().values
        expected[name] = (kept, gated[kept])
    with torch.no_grad():
        dense = model(input_ids=input_ids).logits
    model.finalize_diff_pruning()
    for name, a in adapters(model).items():
        assert a.diff_indices.dtype == torch.int64
        assert a.diff_values.numel() == round(0.02 * math.prod(a.weight_shape))
        assert torch.equal(a.diff_indices, expected[name][0])
        assert torch.equal(a.diff_values.detach(), expected[name][1])
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    indices, values = expected["model.layers.1.mlp.down_proj"]
    delta = torch.zeros(32 * 64)
    delta[indices] = values
    delta = delta.view(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + delta).T)
        sparse = model(input_ids=input_ids).logits
    assert not torch.allclose(sparse, dense, atol=1e-3)  # 98% of the diff is gone
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, sparse)  # no gate sampling any more


def test_projection_at_density_one_changes_no_output(input_ids):
    model = get_peft_model(tiny_llama(), DiffPruningConfig(density=1.0))
    randomize(model, seed=4)
    model.eval()
    with torch.no_grad():
        dense = model(input_ids=input_ids).logits
        model.finalize_diff_pruning()
        torch.testing.assert_close(model(input_ids=input_ids).logits, dense)


# ---- files --------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_sparse_and_exact(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), DiffPruningConfig())
    randomize(model, seed=5)
    model.finalize_diff_pruning()
    randomize(model, seed=6)  # the kept values train on: new values at the same positions
    model.eval()
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 2 * 14
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    assert saved[q + "diff_indices"].dtype == torch.int64 and saved[q + "diff_indices"].shape == (5,)
    assert saved[q + "diff_values"].dtype == torch.float32 and saved[q + "diff_values"].shape == (5,)
    assert sum(t.numel() for k, t in saved.items() if k.endswith("diff_values")) == 92

    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        out = model(input_ids=input_ids).logits
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, out, atol=0, rtol=0)
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=input_ids).logits, out, atol=1e-3)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert all(a.projected for a in adapters(loaded).values())
    trainable = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 92  # fixed-mask fine-tuning of the kept values


def test_sequence_classification_trains_and_saves_the_head_in_full(tmp_path):
    model = get_peft_model(tiny_bert(), DiffPruningConfig(task_type="SEQ_CLS"))
    # per block query, key, value, attention.output.dense (32×32), intermediate (64×32), output (32×64);
    # the pooler (32×32); the classifier head (32→3) is trained in full and is not a target
    weights = [32 * 32] * 4 + [64 * 32, 32 * 64]
    weights = weights * 2 + [32 * 32]
    head = 32 * 3 + 3
    assert model.get_nb_trainable_parameters()[0] == 2 * sum(weights) + head == 2 * 17408 + 99
    randomize(model, seed=12)
    model.finalize_diff_pruning()
    assert sum(round(0.005 * n) for n in weights) == 85
    assert model.get_nb_trainable_parameters()[0] == 85 + head
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["default"].bias.add_(1.0)
    model.eval()
    model.save_pretrained(str(tmp_path))
    assert "base_model.model.classifier.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_file_is_a_small_fraction_of_the_targeted_weights(tmp_path):
    model = get_peft_model(tiny_llama(hidden_size=128), DiffPruningConfig(density=0.005))
    weights = llama_weights(hidden=128, intermediate=256, kv=64)
    assert model.get_nb_trainable_parameters()[0] == 2 * sum(weights)
    randomize(model, seed=7)
    model.finalize_diff_pruning()
    model.save_pretrained(str(tmp_path))
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    kept = sum(round(0.005 * n) for n in weights)
    assert kept * 12 < size < kept * 12 + 4096  # 8 + 4 bytes per kept entry, and the header
    assert size < 0.03 * 4 * sum(weights), size / (4 * sum(weights))


def test_saving_before_finalizing_keeps_the_gates(tmp_path, input_ids):
    """A checkpoint saved in training holds δ and log α dense, and loads as the gated adapter it was."""
    model = get_peft_model(tiny_llama(), DiffPruningConfig(density=0.05))
    randomize(model, seed=8)
    model.eval()
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"diff_weight", "gate_log_alpha"}
    assert not any(a.projected for a in adapters(model).values())  # the model in memory goes on training
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not any(a.projected for a in adapters(loaded).values())
    with torch.no_grad():
        gated = model(input_ids=input_ids).logits
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, gated, atol=0, rtol=0)
        model.finalize_diff_pruning()
        loaded.finalize_diff_pruning()
        projected = model(input_ids=input_ids).logits
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, projected, atol=0, rtol=0)
    assert not torch.allclose(gated, projected, atol=1e-3)


def test_loading_with_another_density_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), DiffPruningConfig())
    model.finalize_diff_pruning()
    model.save_pretrained(str(tmp_path))
    wrong = DiffPruningConfig(density=0.01)
    with pytest.raises(
        ValueError,
        match=r"q_proj.diff_indices / diff_values have shapes \(5,\) / \(5,\) \(torch.int64 indices\) in the "
        r"file, but density=0.01 keeps 10 integer positions of this layer's 1024 weights",
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path), config=wrong)


# ---- merging and mixed batches ------------------------------------------------------------------------


def test_merge_equals_unmerged_and_unmerge_restores_exactly(input_ids):
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), DiffPruningConfig(density=0.05))
    randomize(model, seed=9)
    model.eval()
    with pytest.raises(NotMergeableError, match=r"call model.finalize_diff_pruning\(\) to project it"):
        model.merge_adapter()
    model.finalize_diff_pruning()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        model.merge_adapter()
        q = model.get_base_model().model.layers[0].self_attn.q_proj
        changed = q.base_layer.weight != reference.model.layers[0].self_attn.q_proj.weight
        assert changed.sum() == round(0.05 * 1024)
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        originals = dict(reference.named_parameters())
        for name, p in model.get_base_model().named_parameters():
            if not is_adapter_parameter(name):
                assert torch.equal(p, originals[name.replace(".base_layer", "")]), name
        merged = model.merge_and_unload()
        assert not any(isinstance(m, TunedLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_each_use_their_adapter(input_ids):
    model = get_peft_model(tiny_llama(), DiffPruningConfig(target_modules=LLAMA_LINEAR[:4], density=0.1))
    randomize(model, seed=10)
    model.finalize_diff_pruning()
    model.add_adapter("other", DiffPruningConfig())
    randomize(model, seed=11, name="other")  # still gated: rows use its evaluation gate
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=["other", "__base__", "default"]).logits
        alone = model(input_ids=input_ids).logits
        model.set_adapter("other")
        other = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    torch.testing.assert_close(mixed[0], other[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[2], alone[2])
    assert not torch.allclose(alone[2], base[2], atol=1e-3)
    assert not torch.allclose(other[0], base[0], atol=1e-3)
