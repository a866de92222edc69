"""AdaLoRA: the SVD-form update, the budget schedule, importance-based masking, the orthogonality penalty,
saving at allocated ranks, merging, and the Trainer callback, against hand computations."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import VOCAB, randomize_adapters, snapshot, tiny_gpt2, tiny_llama, train_and_check_frozen
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.layer import TunedLayer
from peftkit.methods.adalora import AdaLoraCallback, AdaLoraConfig, SVDLinear

QV = ["q_proj", "v_proj"]


def layers(model: PeftModel) -> dict[str, SVDLinear]:
    """Module name -> the default adapter's SVD layer."""
    return {
        name: module.adapters["default"]
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, TunedLayer)
    }


def kept_ranks(model: PeftModel) -> dict[str, int]:
    """Non-zero singular values per layer."""
    return {name: int((layer.lora_E != 0).sum()) for name, layer in layers(model).items()}


def train_step(model: PeftModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, step: int) -> float:
    """One step in the order AdaLoRA needs: backward, optimizer step, allocation, zero_grad."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.update_and_allocate(step)
    optimizer.zero_grad()
    return loss.item()


# ---- the layer's equation ------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv1d = Conv1D(5, 6)  # GPT-2's linear layer: weight stored (in=6, out=5)


def test_forward_is_the_svd_form_update():
    """h = W x + b + α/(r₀ + 1e-5) · B (E ⊙ A) x, for nn.Linear and Conv1D."""
    ref, toy = Toy(), Toy()
    config = AdaLoraConfig(
        target_modules=["lin", "conv1d"],
        init_r=3,
        target_r=2,
        lora_alpha=6,
        total_step=10,
        init_lora_weights=False,
    )
    PeftModel(toy, config)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    s = 6 / (3 + 1e-5)
    with torch.no_grad():
        for name, weight_oi in [("lin", ref.lin.weight), ("conv1d", ref.conv1d.weight.T)]:
            layer = getattr(toy, name).adapters["default"]
            A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
            assert (A.shape, E.shape, B.shape) == ((3, 6), (3, 1), (5, 3))
            expected = x @ weight_oi.T + getattr(ref, name).bias + s * (x @ (E * A).T @ B.T)
            torch.testing.assert_close(getattr(toy, name)(x), expected, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(getattr(toy, name)(x), getattr(ref, name)(x), atol=1e-2)


def test_default_init_is_the_base_model(input_ids):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), AdaLoraConfig(init_r=64, target_modules=["up_proj"], total_step=10))
    layer = next(iter(layers(model).values()))
    assert torch.equal(layer.lora_E, torch.zeros(64, 1))
    # A, B ~ N(0, 0.02²): 64·32 entries each, so the std is within a few percent
    assert layer.lora_A.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.lora_B.std().item() == pytest.approx(0.02, rel=0.1)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)


def test_trainable_count_is_analytic():
    # llama's default targets are q_proj (32 -> 32) and v_proj (32 -> 16); each layer trains A, E and B
    llama = get_peft_model(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    assert sorted({n.rsplit(".", 1)[-1] for n in layers(llama)}) == QV
    expected = 2 * (4 * (32 + 32 + 1) + 4 * (32 + 16 + 1))
    assert llama.get_nb_trainable_parameters() == (
        expected,
        expected + sum(p.numel() for p in tiny_llama().parameters()),
    )
    # GPT-2: c_attn, a Conv1D from 32 to 96
    gpt2 = get_peft_model(tiny_gpt2(), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    assert gpt2.get_nb_trainable_parameters()[0] == 2 * 4 * (32 + 96 + 1)


def test_training_lowers_loss_and_leaves_the_base_bit_identical(input_ids):
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, total_step=10, task_type="CAUSAL_LM"))
    train_and_check_frozen(model, frozen, {"input_ids": input_ids, "labels": input_ids}, lr=2e-2)


# ---- budget schedule and allocation --------------------------------------------------------------


def test_budget_schedule_follows_the_cubic_formula():
    # 4 layers: b₀ = 4·6 = 24, b_T = 4·2 = 8; the budget falls from step tinit=2 to total_step-tfinal=12
    config = AdaLoraConfig(
        target_modules=QV, init_r=6, target_r=2, tinit=2, tfinal=3, total_step=15, deltaT=2
    )
    allocator = get_peft_model(tiny_llama(), config).model_adapters["default"]
    got = [allocator.budget_schedule(step) for step in range(16)]
    # int(16·(1 − (t−2)/10)³ + 8), worked out by hand: 16·0.9³ = 11.664, 16·0.8³ = 8.192, 16·0.7³ = 5.488 ...
    by_hand = [24, 24, 24, 19, 16, 13, 11, 10, 9, 8, 8, 8, 8, 8, 8, 8]
    assert [budget for budget, _ in got] == by_hand
    assert [budget for budget, _ in got] == [
        24 if t <= 2 else 8 if t > 12 else int(16 * (1 - (t - 2) / 10) ** 3 + 8) for t in range(16)
    ]
    # masks every deltaT=2 steps during the budgeting phase, at every step after it, never in warm-up
    assert [step for step, (_, mask) in enumerate(got) if mask] == [4, 6, 8, 10, 12, 13, 14, 15]


def test_update_and_allocate_reaches_the_target_budget(input_ids, tmp_path):
    config = AdaLoraConfig(
        target_modules=QV, init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model)
    allocator = model.model_adapters["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    totals = []
    for step in range(1, 10):
        train_step(model, optimizer, input_ids, step)
        totals.append(sum(kept_ranks(model).values()))
        if step == 3:  # the allocator's running scores exist now, and must not reach the file
            model.save_pretrained(str(tmp_path / "mid"))
            keys = load_file(str(tmp_path / "mid" / "adapter_model.safetensors"))
            assert allocator.scores and all(
                k.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for k in keys
            )
    # step 1 is warm-up (16 triplets), 2..5 follow the schedule, step 6 = total_step - tfinal fixes 8 = 4·2
    assert totals == [16] + [allocator.budget_schedule(t)[0] for t in range(2, 6)] + [8, 8, 8, 8]
    assert totals[1:5] == [12, 9, 8, 8]  # int(8·0.8³ + 8), int(8·0.6³ + 8), ...: 12.096, 9.728, 8.512, 8.064
    assert not allocator.scores  # reset once the allocation is final
    pattern = model.peft_config["default"].rank_pattern
    assert set(pattern) == {f"model.layers.{i}.self_attn.{p}.lora_E" for i in (0, 1) for p in QV}
    assert sum(map(sum, pattern.values())) == 8
    for name, layer in layers(model).items():
        keep = torch.tensor(pattern[f"{name}.lora_E"])
        assert torch.equal(layer.lora_E.view(-1) != 0, keep)  # the masked ones stay zero after more steps


def test_masking_keeps_the_best_scored_triplets(input_ids):
    """Scores by hand: Ī·Ū per entry, Sᵢ = s(Eᵢ) + mean_j s(A_ij) + mean_j s(B_ji); the lowest are masked."""
    config = AdaLoraConfig(target_modules=QV, init_r=4, target_r=1, total_step=4, beta1=0.6, beta2=0.7)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model)
    seen = []  # per step: {(layer, tensor): (value, gradient)}
    for step in (0, 1):  # step 0: warm-up, scores only; step 1: masks to int(12·(1 − 1/4)³ + 4) = 9
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        seen.append(
            {
                (name, t): (getattr(layer, t).detach().clone(), getattr(layer, t).grad.clone())
                for name, layer in layers(model).items()
                for t in ("lora_A", "lora_E", "lora_B")
            }
        )
        model.update_and_allocate(step)
        model.zero_grad()
    allocator = model.model_adapters["default"]
    assert allocator.budget_schedule(1) == (9, True)
    score = {}
    for key in seen[0]:
        smooth = uncertainty = torch.zeros(())
        for record in seen:
            value, grad = record[key]
            importance = (value * grad).abs()
            smooth = 0.6 * smooth + 0.4 * importance
            uncertainty = 0.7 * uncertainty + 0.3 * (importance - smooth).abs()
        score[key] = smooth * uncertainty
    triplets = {
        name: score[name, "lora_E"].view(-1)
        + score[name, "lora_A"].mean(dim=1)
        + score[name, "lora_B"].mean(dim=0)
        for name in layers(model)
    }
    got = allocator.triplet_scores()
    for name, expected in triplets.items():
        torch.testing.assert_close(got[name], expected, atol=0, rtol=1e-6)
    flat = torch.cat(list(triplets.values()))
    kept = torch.cat([layer.lora_E.view(-1) != 0 for layer in layers(model).values()])
    assert set(kept.nonzero().view(-1).tolist()) == set(flat.topk(9).indices.tolist())


def allocated(seed: int = 0) -> PeftModel:
    """A llama adapter trained through its final allocation: 8 of 16 triplets kept, unevenly."""
    config = AdaLoraConfig(target_modules=QV, init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model, seed=seed)
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, 6):
        train_step(model, optimizer, ids, step)
    return model.eval()


def test_save_writes_the_kept_triplets_and_reloads_at_those_ranks(tmp_path, input_ids):
    model = allocated()
    ranks = kept_ranks(model)
    assert sum(ranks.values()) == 8 and len(set(ranks.values())) > 1, ranks
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == model.peft_config["default"].rank_pattern
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    out = {"q_proj": 32, "v_proj": 16}
    for name, r in ranks.items():
        prefix = f"base_model.model.{name}."
        shapes = {t: tuple(weights[prefix + t].shape) for t in ("lora_A", "lora_E", "lora_B")}
        assert shapes == {"lora_A": (r, 32), "lora_E": (r, 1), "lora_B": (out[name.rsplit(".", 1)[-1]], r)}
    assert len(weights) == 3 * len(ranks)

    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert {n: layer.lora_E.shape[0] for n, layer in layers(loaded).items()} == ranks
    assert loaded.get_nb_trainable_parameters()[0] == sum(
        r * (32 + out[n.rsplit(".", 1)[-1]] + 1) for n, r in ranks.items()
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(loaded(input_ids).logits, tiny_llama()(input_ids).logits, atol=1e-3)
    # saved again, the reloaded adapter gives the same file
    loaded.save_pretrained(str(tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in weights.items()) and again.keys() == weights.keys()
    with pytest.raises(ValueError, match="ranks were allocated already"):
        loaded.update_and_allocate(6)


def test_orthogonality_penalty_matches_a_hand_computation(input_ids):
    """loss + w · mean over every A and B of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F, in training only."""
    config = AdaLoraConfig(target_modules=QV, init_r=4, target_r=2, total_step=10, orth_reg_weight=0.3)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model)
    norms = []
    for layer in layers(model).values():
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        norms.append(((A @ A.T - torch.eye(4)) ** 2).sum().sqrt())
        norms.append(((B.T @ B - torch.eye(4)) ** 2).sum().sqrt())
    penalty = 0.3 * sum(norms) / len(norms)
    assert len(norms) == 8 and penalty > 0.1
    with torch.no_grad():
        plain = model.get_base_model()(input_ids=input_ids, labels=input_ids).loss
        model.eval()
        assert torch.equal(model(input_ids=input_ids, labels=input_ids).loss, plain)
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    torch.testing.assert_close(loss, plain + penalty, atol=1e-6, rtol=1e-6)
    # with E = 0 the task loss gives A and B no gradient; the penalty does
    for layer in layers(model).values():
        layer.lora_E.data.zero_()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in layers(model).values())
    assert model(input_ids=input_ids).loss is None  # no labels, nothing to add to


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_merge_equals_unmerged_and_unmerge_restores(builder, input_ids):
    base = builder()
    model = get_peft_model(builder(), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    randomize_adapters(model)
    weights = {
        n: layer.base_layer.weight.detach().clone()
        for n, layer in model.get_base_model().named_modules()
        if isinstance(layer, TunedLayer)
    }
    with torch.no_grad():
        expected = model(input_ids).logits
        assert not torch.allclose(expected, base(input_ids).logits, atol=1e-3)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        tuned = dict(model.get_base_model().named_modules())
        assert all(not torch.allclose(tuned[n].base_layer.weight, w, atol=1e-4) for n, w in weights.items())
        model.unmerge_adapter()
        for name, weight in weights.items():
            torch.testing.assert_close(tuned[name].base_layer.weight, weight, atol=1e-6, rtol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, TunedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "AdaLoraConfig needs total_step, the number of optimizer steps training will take"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, r"tinit=6 \+ tfinal=4 leave no budgeting phase in"),
        ({"total_step": 10, "target_r": 16}, "target_r=16 exceeds init_r=12; AdaLoRA only prunes ranks"),
        ({"total_step": 10, "deltaT": 0}, r"deltaT must be a positive integer \(steps between allocations\)"),
        ({"total_step": 10, "beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"total_step": 10, "orth_reg_weight": -1}, "orth_reg_weight must be a finite number >= 0, got -1"),
        ({"total_step": 10, "init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not accepted"),
        ({"total_step": 10, "rank_pattern": {"q_proj": 4}}, "it is not a per-module rank as in LoraConfig"),
    ],
)
def test_config_errors_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**options)


def test_lora_names_point_to_adalora_ones():
    with pytest.raises(TypeError, match="no option 'r' \\(did you mean 'init_r'\\?\\)"):
        AdaLoraConfig(r=4, total_step=10)
    with pytest.raises(ValueError, match="sets use_dora=True, a Hugging Face peft feature"):
        AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "use_dora": True})
    # peft writes r, use_rslora and alpha_pattern for AdaLoRA and ignores them; so does peftkit
    config = AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "r": 4, "use_rslora": True})
    assert config.to_dict()["r"] == 8 and config.init_r == 12


def test_update_and_allocate_misuse_is_explained(input_ids):
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=QV, init_r=4, target_r=2, total_step=5))
    with pytest.raises(ValueError, match="needs the gradients, but model.layers.0.self_attn.q_proj.lora_A"):
        model.update_and_allocate(1)
    with pytest.raises(ValueError, match="ends at step total_step - tfinal = 5, but no allocation was made"):
        model.update_and_allocate(6)
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=QV))
    assert not hasattr(lora, "update_and_allocate")  # exported only by an active AdaLoRA adapter


# ---- transformers' Trainer ---------------------------------------------------------------------------


def test_trainer_callback_masks_ranks(tmp_path):
    config = AdaLoraConfig(target_modules=QV, init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6)
    model = get_peft_model(tiny_llama(), config)
    rows = [{"input_ids": [3 + i, 9, 27, 40 + i, 11], "labels": [3 + i, 9, 27, 40 + i, 11]} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    calls = []
    allocate = model.model_adapters["default"].update_and_allocate

    def spy(step: int) -> None:  # records the step and that the gradients are still there
        calls.append((step, layers(model)["model.layers.0.self_attn.q_proj"].lora_E.grad is not None))
        allocate(step)

    model.model_adapters["default"].update_and_allocate = spy
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[AdaLoraCallback()]).train()
    assert calls == [(step, True) for step in range(1, 7)]
    ranks = kept_ranks(model)
    assert sum(ranks.values()) == 8 and model.peft_config["default"].rank_pattern is not None
    assert sum(map(sum, model.peft_config["default"].rank_pattern.values())) == 8


def test_trainer_callback_checks_the_model_and_the_step_count():
    callback = AdaLoraCallback()
    model = get_peft_model(
        tiny_llama(), AdaLoraConfig(target_modules=QV, init_r=4, target_r=2, total_step=100)
    )
    with pytest.warns(UserWarning, match="total_step=100 but the Trainer will take 40 optimizer steps"):
        callback.on_train_begin(None, types.SimpleNamespace(max_steps=40), None, model=model)
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=QV))
    with pytest.raises(ValueError, match="AdaLoraCallback needs the Trainer's model to be a PeftModel whose"):
        callback.on_optimizer_step(None, types.SimpleNamespace(global_step=0), None, model=lora)
