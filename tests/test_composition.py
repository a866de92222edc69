"""Different methods in one model: every pair trains together, saves as one, and restores in one call;
merging folds what can fold and names what cannot."""

import itertools
import json
import warnings

import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2
from transformers import GPT2ForSequenceClassification

from peftkit import (
    AdaLoraConfig,
    BitFitConfig,
    BottleneckConfig,
    DiffPruningConfig,
    IA3Config,
    LoraConfig,
    NotMergeableError,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.layer import TunedLayer
from peftkit.serialization import adapter_parameters

INPUT_IDS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def config(method: str):
    """One config per method, on GPT-2 layers chosen so that pairs share some layers and not others."""
    return {
        "lora": lambda: LoraConfig(target_modules=["c_attn"]),
        "dora": lambda: LoraConfig(target_modules=["c_attn", "c_proj"], use_dora=True),
        "ia3": lambda: IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]),
        "bottleneck": lambda: BottleneckConfig(target_modules=["mlp"], adapter_size=4),
        "parallel-bottleneck": lambda: BottleneckConfig(
            target_modules=["c_fc"], adapter_size=4, parallel=True
        ),
        "diff-pruning": lambda: DiffPruningConfig(target_modules=["c_fc"], density=0.2),
        "adalora": lambda: AdaLoraConfig(target_modules=["c_attn"], total_step=10, init_r=4, target_r=2),
        "bitfit": lambda: BitFitConfig(),
        "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "p-tuning": lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=16
        ),
        "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[method]()


METHODS = [
    "lora",
    "dora",
    "ia3",
    "bottleneck",
    "parallel-bottleneck",
    "diff-pruning",
    "adalora",
    "bitfit",
    "prompt-tuning",
    "p-tuning",
    "prefix-tuning",
]


def combined(first: str, second: str, seed: int = 0) -> PeftModel:
    """GPT-2 with `first` as "default" and `second` as "second", both active, weights made non-trivial."""
    model = get_peft_model(tiny_gpt2(), config(first))
    model.add_adapter("second", config(second))
    model.set_adapter(["default", "second"])
    randomize_adapters(model, seed=seed)
    return model


def logits(model, input_ids=INPUT_IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(METHODS, 2)))
def test_two_methods_train_together_and_restore_in_one_call(first, second, tmp_path):
    model = combined(first, second)
    own = {name: {id(p) for p in adapter_parameters(model, name)} for name in ("default", "second")}
    model.train()
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:  # only the two adapters' tensors train, and every one of them gets a gradient
            assert id(param) in own["default"] | own["second"], name
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    for name, ids in own.items():
        grads = [p.grad for p in model.parameters() if id(p) in ids and p.grad is not None]
        assert any(g.abs().sum() > 0 for g in grads), f"adapter {name} ({first}, {second}) got no gradient"
    model.zero_grad()
    if "diff-pruning" in (first, second):
        model.finalize_diff_pruning()  # its sparse diff is what it saves
    expected = logits(model)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), expected[:, -INPUT_IDS.shape[1] :], atol=1e-4)

    model.save_pretrained(tmp_path)
    composition = json.loads((tmp_path / "adapter_composition.json").read_text())
    assert composition == {"adapters": ["default", "second"], "active": ["default", "second"]}
    restored = PeftModel.from_composition(tiny_gpt2(), str(tmp_path))
    assert restored.active_adapters == ["default", "second"]
    torch.testing.assert_close(logits(restored), expected, atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for p in restored.parameters())  # loaded for inference by default

    by_hand = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    by_hand.load_adapter(str(tmp_path / "second"), "second")
    by_hand.set_adapter(["default", "second"])
    torch.testing.assert_close(logits(by_hand), expected, atol=1e-6, rtol=1e-5)


def test_from_composition_restores_the_active_subset_and_can_train(tmp_path):
    model = get_peft_model(tiny_gpt2(), config("lora"))
    model.add_adapter("ffn", config("bottleneck"))
    model.add_adapter("prompt", config("prompt-tuning"))
    model.set_adapter(["prompt", "default", "ffn"])
    randomize_adapters(model, seed=3)
    model.set_adapter(["ffn", "default"])  # the prompt is saved but inactive
    expected = logits(model)
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_composition(tiny_gpt2(), str(tmp_path), is_trainable=True)
    assert list(restored.peft_config) == ["default", "ffn", "prompt"]
    assert restored.active_adapters == ["ffn", "default"]
    torch.testing.assert_close(logits(restored), expected, atol=1e-6, rtol=1e-5)
    trainable = [n for n, p in restored.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n or ".ffn." in n for n in trainable)


def test_from_composition_reads_a_single_adapter_folder_and_explains_a_missing_file(tmp_path):
    model = get_peft_model(tiny_gpt2(), config("lora"))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "one")
    restored = PeftModel.from_composition(tiny_gpt2(), str(tmp_path / "one"))
    torch.testing.assert_close(logits(restored), logits(model), atol=0, rtol=0)
    model.add_adapter("other", config("ia3"))
    model.save_pretrained(tmp_path / "some", selected_adapters=["other"])  # a sub-folder only
    with pytest.raises(FileNotFoundError, match="adapter_composition.json.*load_adapter"):
        PeftModel.from_composition(tiny_gpt2(), str(tmp_path / "some"))
    model.save_pretrained(tmp_path / "both")
    (tmp_path / "both" / "other" / "adapter_config.json").unlink()
    (tmp_path / "both" / "other" / "adapter_model.safetensors").unlink()
    (tmp_path / "both" / "other").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lists adapters \['other'\] whose folders are not in"):
        PeftModel.from_composition(tiny_gpt2(), str(tmp_path / "both"))
    not_a_list = '{"adapters": ["default"], "active": "default"}'
    (tmp_path / "both" / "adapter_composition.json").write_text(not_a_list)
    with pytest.raises(ValueError, match="needs 'adapters' .* each a list of adapter names"):
        PeftModel.from_composition(tiny_gpt2(), str(tmp_path / "both"))


def test_a_classification_combination_trains_one_head():
    """Each adapter of a classifier holds a copy of the head; the first active one's is used and trained."""
    model = get_peft_model(
        GPT2ForSequenceClassification(tiny_gpt2().config),
        LoraConfig(task_type="SEQ_CLS", target_modules=["c_attn"]),
    )
    model.add_adapter("ffn", BottleneckConfig(task_type="SEQ_CLS", target_modules=["mlp"], adapter_size=4))
    model.config.pad_token_id = 0
    model.set_adapter(["default", "ffn"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if ".modules_to_save." in n]
    assert heads == ["base_model.model.score.modules_to_save.default.weight"]
    assert any(".ffn." in n for n in trainable)
    model.set_adapter(["ffn", "default"])
    assert [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n] == [
        "base_model.model.score.modules_to_save.ffn.weight"
    ]


# ---- merging a combination -----------------------------------------------------------------------


def lora_bottleneck_prompt() -> PeftModel:
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn", "c_fc"]))
    model.add_adapter("ffn", BottleneckConfig(target_modules=["c_fc"], adapter_size=4))
    model.add_adapter("prompt", config("prompt-tuning"))
    model.add_adapter("ia3", IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    model.set_adapter(["default", "ffn", "prompt", "ia3"])
    randomize_adapters(model, seed=5)
    return model


def test_merge_and_unload_refuses_what_it_cannot_fold_and_changes_nothing():
    model = lora_bottleneck_prompt()
    expected = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NotMergeableError) as caught:
        model.merge_and_unload()
    message = str(caught.value)
    assert "'ffn' (Bottleneck adapters cannot be merged" in message
    assert "'prompt' (it changes the model's inputs, not its weights)" in message
    assert "merge_adapter() folds ['default', 'ia3']" in message
    assert "merge_and_unload(adapter_names=['default', 'ia3'])" in message
    assert not any(layer.merged_adapters for layer in model.modules() if isinstance(layer, TunedLayer))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_merge_adapter_folds_what_it_can_and_keeps_the_rest_computing():
    model = lora_bottleneck_prompt()
    expected = logits(model)
    kept = r"Kept as adapters, unmerged: 'ffn' \(Bottleneck.*'prompt' \(it changes"
    with pytest.warns(UserWarning, match=kept):
        model.merge_adapter()
    c_attn = model.get_base_model().transformer.h[0].attn.c_attn
    c_fc = model.get_base_model().transformer.h[0].mlp.c_fc
    assert c_attn.merged_adapters == ["default", "ia3"] and c_fc.merged_adapters == ["default"]
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_after_an_unmergeable_one_on_a_shared_layer_stays_unmerged():
    """out = U f(h) + h then + ΔW x: folding ΔW into W would put it inside the bottleneck's input."""
    model = get_peft_model(tiny_gpt2(), BottleneckConfig(target_modules=["c_fc"], adapter_size=4))
    model.add_adapter("lora", LoraConfig(target_modules=["c_fc", "c_attn"]))
    model.set_adapter(["default", "lora"])
    randomize_adapters(model, seed=2)
    expected = logits(model)
    kept = r"folded: 'default' \(Bottleneck.*'lora' \(it follows 'default' on transformer.h.0.mlp.c_fc,"
    with pytest.raises(NotMergeableError, match=kept):
        model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [["default", "ia3"], ["ia3", "default"]])
def test_merge_and_unload_of_layer_methods_sharing_layers_keeps_the_order(order):
    """l ⊙ (W + ΔW) x and l ⊙ W x + ΔW x differ; each order folds into its own merged weight."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn", "c_proj"]))
    model.add_adapter("ia3", IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]))
    model.add_adapter("bias", BitFitConfig())
    model.set_adapter([*order, "bias"])
    randomize_adapters(model, seed=4)
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything folds: no warning
        plain = model.merge_and_unload()
    assert not any(isinstance(m, TunedLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_first", [False, True])
def test_a_layer_inside_a_wrapped_block_keeps_its_name(block_first, tmp_path):
    """LoRA on mlp.c_fc and a bottleneck around the whole mlp, added in either order: LoRA's file has the keys
    of a LoRA-only model, and unload gives back the original modules."""
    lora = LoraConfig(target_modules=["c_fc"])
    block = BottleneckConfig(target_modules=["mlp"], adapter_size=4)
    model = get_peft_model(tiny_gpt2(), block if block_first else lora)
    model.add_adapter("other", lora if block_first else block)
    lora_name = "other" if block_first else "default"
    model.set_adapter(["default", "other"])
    model.save_pretrained(tmp_path / "both")
    alone = get_peft_model(tiny_gpt2(), lora)
    alone.save_pretrained(tmp_path / "alone")
    folder = tmp_path / "both" / ("other" if block_first else "")
    from safetensors.torch import load_file

    assert sorted(load_file(folder / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "alone" / "adapter_model.safetensors")
    )
    model.delete_adapter(lora_name)
    assert not isinstance(model.get_base_model().transformer.h[0].mlp.c_fc, TunedLayer)
    original = tiny_gpt2()
    plain = model.unload()
    assert type(plain.transformer.h[0].mlp) is type(original.transformer.h[0].mlp)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in original.named_parameters()]


def test_an_operation_two_active_adapters_export_runs_on_each():
    """Two diff-pruning adapters: model.finalize_diff_pruning() projects both, so both merge."""
    model = get_peft_model(tiny_gpt2(), DiffPruningConfig(target_modules=["c_fc"], density=0.2))
    model.add_adapter("attn", DiffPruningConfig(target_modules=["c_attn"], density=0.1))
    model.set_adapter(["default", "attn"])
    randomize_adapters(model, seed=6)
    assert model.finalize_diff_pruning() == [None, None]
    expected = logits(model)
    plain = model.merge_and_unload()
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)
    model = get_peft_model(tiny_gpt2(), DiffPruningConfig(target_modules=["c_fc"], density=0.2))
    model.finalize_diff_pruning()  # one adapter: its own result
    assert model.get_base_model().transformer.h[0].mlp.c_fc.adapters["default"].projected
