"""Error messages users see, pinned: each says what was wrong and what to do."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file

from peftkit import BitFitConfig, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model


def saved_lora(path, **config) -> PeftModel:
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), LoraConfig(**config))
    randomize_adapters(model)
    model.save_pretrained(str(path))
    return model


def edit_config(path, **changes) -> None:
    file = os.path.join(path, "adapter_config.json")
    with open(file) as fh:
        data = json.load(fh)
    data.update(changes)
    with open(file, "w") as fh:
        json.dump(data, fh)


# ---- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -2, 1.5, True])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(
        ValueError, match=rf"LoraConfig: r must be a positive integer \(the adapter's rank\), got {r!r}"
    ):
        LoraConfig(r=r)


def test_rank_pattern_values_are_checked():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be a positive integer.*got 0"):
        LoraConfig(rank_pattern={"q_proj": 0})


def test_unknown_option_suggests_the_real_one():
    with pytest.raises(
        TypeError, match=r"LoraConfig has no option 'rank' \(did you mean 'r'\?\)\. Its options are: "
    ):
        LoraConfig(rank=8)
    with pytest.raises(TypeError, match=r"no option 'lora_alhpa' \(did you mean 'lora_alpha'\?\)"):
        LoraConfig(lora_alhpa=8)
    with pytest.raises(
        TypeError, match=r"BitFitConfig has no option 'r'\. Its options are: .*target_modules"
    ):
        BitFitConfig(r=8)


def test_bad_choices():
    with pytest.raises(
        ValueError, match=r"bias='some' is not accepted; use one of \['none', 'all', 'lora_only'\]"
    ):
        LoraConfig(bias="some")
    with pytest.raises(
        ValueError,
        match=r"init_lora_weights='loftq' is not available in peftkit; use one of "
        r"\[True, False, 'gaussian', 'pissa', 'olora'\] or 'pissa_niter_<n>'",
    ):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.0"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(
        ValueError, match=r"task_type='CLS' is not accepted; use one of \['CAUSAL_LM', 'SEQ_CLS'"
    ):
        LoraConfig(task_type="CLS")


def test_init_variant_not_available_for_a_layer_kind():
    with pytest.raises(
        ValueError, match=r"init_lora_weights='pissa' works on linear layers only, not on Embedding"
    ):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))


def test_targets_that_match_nothing_list_the_layers():
    with pytest.raises(
        ValueError,
        match=r"target_modules=\['query'\] matched nothing in LlamaForCausalLM\. Layers here that LoraConfig "
        r"can adapt: embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head\.",
    ):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["query"]))
    with pytest.raises(
        ValueError, match=r"matched nothing in BertForSequenceClassification.*query, key, value"
    ):
        get_peft_model(tiny_bert(), LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))


def test_prompt_tuning_task_not_supported():
    with pytest.raises(
        ValueError,
        match=r"Prompt tuning in peftkit supports task_type \['CAUSAL_LM', 'SEQ_CLS', "
        r"'FEATURE_EXTRACTION'\]; got TOKEN_CLS",
    ):
        get_peft_model(tiny_bert(), PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))


# ---- loading -------------------------------------------------------------------------------------


def test_shape_mismatch_on_load(tmp_path):
    saved_lora(tmp_path, r=4)
    edit_config(tmp_path, r=8)
    with pytest.raises(
        ValueError,
        match=r"Adapter 'default': base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
        r"\.lora_A\.weight has shape \(4, 32\) in the file but \(8, 32\) in the model\. "
        r"The config \(rank, number of virtual tokens",
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_failed_load_adapter_leaves_the_model_as_it_was(tmp_path, input_ids):
    saved_lora(tmp_path, r=4)
    edit_config(tmp_path, r=8)
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        before = model(input_ids).logits
    with pytest.raises(ValueError, match="has shape"):
        model.load_adapter(str(tmp_path), adapter_name="broken")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, before, atol=0, rtol=0)
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)


def test_missing_and_unknown_weights(tmp_path):
    saved_lora(tmp_path)
    weights_file = os.path.join(tmp_path, "adapter_model.safetensors")
    weights = load_file(weights_file)
    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != missing_key}, weights_file)
    with pytest.raises(
        ValueError,
        match=r"Adapter 'default' does not fit this model: the file lacks 1 weights it needs "
        r"\(e\.g\. \['base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight'\]\)",
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    save_file({**weights, "base_model.model.nowhere.lora_A.weight": torch.zeros(2)}, weights_file)
    with pytest.raises(
        ValueError, match=r"1 of its weights match no module here \(e\.g\. \['base_model\.model\.nowhere"
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_no_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json in .*it never downloads"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    saved_lora(tmp_path)
    os.remove(os.path.join(tmp_path, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors in"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_pickled_weights_need_allow_pickle(tmp_path, input_ids):
    model = saved_lora(tmp_path)
    weights_file = os.path.join(tmp_path, "adapter_model.safetensors")
    torch.save(load_file(weights_file), os.path.join(tmp_path, "adapter_model.bin"))
    os.remove(weights_file)
    with pytest.raises(
        ValueError,
        match=r"holds only adapter_model\.bin, a pickle file that can run code when loaded\. "
        r"If you trust its source pass allow_pickle=True",
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_safe_serialization_false_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="peftkit writes safetensors only; drop safe_serialization=False"):
        model.save_pretrained(str(tmp_path), safe_serialization=False)


def test_unknown_config_key_loads_with_a_warning(tmp_path, input_ids):
    model = saved_lora(tmp_path)
    edit_config(tmp_path, future_option=3, peft_version="9.9.9")
    with pytest.warns(
        UserWarning,
        match=r"adapter_config\.json has keys this version of peftkit does not know: "
        r"\['future_option'\]\. They are ignored",
    ):
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("key", "value"), [("use_qalora", True), ("lora_bias", True), ("layer_replication", [[0, 1]])]
)
def test_reference_only_feature_turned_on_is_refused(tmp_path, key, value):
    saved_lora(tmp_path)
    edit_config(tmp_path, **{key: value})
    with pytest.raises(
        ValueError,
        match=rf"This LORA adapter sets {key}=.*, a Hugging Face peft feature that peftkit "
        rf"does not implement.*retrain without {key}",
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_reference_feature_off_loads_silently(tmp_path, recwarn):
    saved_lora(tmp_path)
    edit_config(tmp_path, use_qalora=False, lora_bias=False, layer_replication=None, qalora_group_size=32)
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not [w for w in recwarn if "does not know" in str(w.message)]


def test_wrong_peft_type(tmp_path):
    saved_lora(tmp_path)
    edit_config(tmp_path, peft_type="NOT_A_METHOD")
    with pytest.raises(
        ValueError, match=r"peft_type 'NOT_A_METHOD' is not a method peftkit knows; known: \[.*'LORA'.*\]"
    ):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_safe_merge_refuses_non_finite_weights_and_keeps_the_old_ones(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    q = model.get_base_model().model.layers[1].self_attn.q_proj
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    key = "base_model.model.model.layers.1.self_attn.q_proj.adapters.default.lora_B.weight"
    with torch.no_grad():
        expected = model(input_ids).logits
        good_value = q.adapters["default"].lora_B.weight[0, 0].item()
        q.adapters["default"].lora_B.weight[0, 0] = float("inf")
        before[key][0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"Merging \['default'\] produced non-finite weights; the adapters were "
    ):
        model.merge_adapter(safe_merge=True)
    assert q.merged_adapters == []
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    with torch.no_grad():
        q.adapters["default"].lora_B.weight[0, 0] = good_value
        torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)
        model.merge_adapter(safe_merge=True)
        assert q.merged_adapters == ["default"]
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


# ---- adapter names -------------------------------------------------------------------------------


def test_duplicate_and_reserved_adapter_names():
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(
        ValueError, match=r"An adapter named 'default' exists already; delete_adapter it or pick another"
    ):
        model.add_adapter("default", LoraConfig())
    for bad in ("__base__", "a.b"):
        with pytest.raises(ValueError, match=r"cannot name an adapter: it (is reserved|contains '\.')\. "):
            model.add_adapter(bad, LoraConfig())
    assert list(model.peft_config) == ["default"]


def test_unknown_adapter_names(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match=r"No adapter named \['nope'\]; this model has \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"No adapter named \['nope'\]; this model has \['default'\]"):
        model(input_ids=input_ids, adapter_names=["default", "nope", "__base__"])
    with pytest.raises(ValueError, match=r"No adapter named \['x'\]"):
        model.save_pretrained("unused", selected_adapters=["x"])
    with pytest.raises(
        ValueError, match=r"adapter_names has 2 entries but the batch has 3 rows; give one adapter name"
    ):
        model(input_ids=input_ids, adapter_names=["default", "__base__"])
    assert model.active_adapters == ["default"]


def test_adapter_names_with_an_input_adapter_is_refused(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig())
    model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(
        ValueError, match=r"\['prompt'\] change the inputs instead\. Run those adapters on their own"
    ):
        model(input_ids=input_ids, adapter_names=["prompt", "default", "__base__"])


def test_inject_refuses_input_adapters():
    with pytest.raises(
        ValueError, match="PROMPT_TUNING has a model-level part .* use get_peft_model instead"
    ):
        from peftkit import inject_adapter_in_model

        inject_adapter_in_model(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tiny_llama())


# ---- atomic saving -------------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path):
    model = saved_lora(tmp_path)
    model.add_adapter("other", LoraConfig(target_modules=["k_proj"]))
    model.save_pretrained(str(tmp_path))
    files = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert sorted(files) == [
        "adapter_composition.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        os.path.join("other", "adapter_config.json"),
        os.path.join("other", "adapter_model.safetensors"),
    ]


def test_failed_save_keeps_the_old_files_intact(tmp_path, monkeypatch, input_ids):
    model = saved_lora(tmp_path)
    old = {
        name: (tmp_path / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")
    }
    randomize_adapters(model, seed=99)  # new values that must not reach the disk

    def fail_midway(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail_midway)  # bytes are written to the temp file, then this fails
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, data in old.items():
        assert (tmp_path / name).read_bytes() == data
    assert PeftModel.from_pretrained(tiny_llama(), str(tmp_path)) is not None


def test_save_into_a_file_path_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig())
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file; save_pretrained needs a directory"):
        model.save_pretrained(str(file))
