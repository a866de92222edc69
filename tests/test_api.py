"""Drop-in details of the public API: keyword names Hugging Face peft users pass, dtype placement,
and transformers' Trainer (which reads the forward signature to decide which dataset columns to keep)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from transformers import Trainer, TrainingArguments

from peftkit import LoraConfig, PeftModel, get_peft_model


def test_unknown_keyword_is_an_error_not_ignored():
    with pytest.raises(TypeError, match="adaptr_name"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adaptr_name="x")


@pytest.mark.parametrize(("autocast", "expected"), [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_over_a_bfloat16_base(autocast, expected):
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=autocast)
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"].lora_A.weight
    assert lora_a.dtype == expected
    out = model(torch.tensor([[5, 6, 7]])).logits
    assert out.dtype == torch.bfloat16  # the base's dtype flows through, whatever the adapter's


def test_subfolder_and_is_main_process(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert not os.path.exists(tmp_path / "rank1")
    model.save_pretrained(str(tmp_path / "run" / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "run"), subfolder="adapter")
    assert loaded.peft_config["default"].target_modules == ["q_proj"]


def test_revision_is_recorded():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), revision="v2")
    assert model.peft_config["default"].revision == "v2"


def test_trainer_keeps_the_model_columns_and_trains_only_the_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], lora_alpha=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": [3 + i, 9, 27, 40 + i], "labels": [3 + i, 9, 27, 40 + i]} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )  # remove_unused_columns stays True: columns the forward does not name are dropped
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".adapters.default.lora_" in n for n in changed)
    assert len(changed) == 8  # lora_A and lora_B of q_proj and v_proj in both layers


@pytest.mark.parametrize("training", [False, True])
def test_wrapping_keeps_the_models_train_or_eval_mode(training):
    base = tiny_llama().train(training)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], lora_dropout=0.5))
    modes = {m.training for m in model.modules()}
    assert modes == {training}
    x = torch.tensor([[5, 6, 7]])
    if not training:  # dropout is off, so the output is deterministic
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)
