"""Save and reload are faithful: for every method, in every state an adapter can be saved in, the adapter
loaded from the files computes what the saved one computed (logits within 1e-6).

States: fresh; trained a step (then randomized, so every tensor matters); saved while merged (the file holds
the unmerged adapter, byte for byte what it holds unmerged); saved while disabled; one of several adapters
(restored with `from_composition`). Variants: AdaLoRA before and after `update_and_allocate` masks ranks;
diff pruning before `finalize_diff_pruning()` (gated, saved dense) and after (sparse)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2
from probes import reads
from safetensors.torch import load_file

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

IDS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def allocate(model: PeftModel) -> None:
    """Train AdaLoRA through its final allocation (total_step=5), so some ranks are masked."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, 6):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    kept = [sum(v) for v in model.peft_config["default"].rank_pattern.values()]
    assert sum(kept) < 4 * len(kept), kept  # some triplets were masked


METHODS: dict[str, tuple[Callable[[], object], Callable[[PeftModel], None] | None]] = {
    "lora": (lambda: LoraConfig(target_modules=["c_attn"], r=4), None),
    "rslora": (lambda: LoraConfig(target_modules=["c_attn"], r=4, use_rslora=True), None),
    "dora": (lambda: LoraConfig(target_modules=["c_attn", "c_proj"], r=4, use_dora=True), None),
    "adalora": (lambda: AdaLoraConfig(target_modules=["c_attn"], total_step=10, init_r=4, target_r=2), None),
    "adalora-allocated": (
        lambda: AdaLoraConfig(
            target_modules=["c_attn"], init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5
        ),
        allocate,
    ),
    "ia3": (lambda: IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]), None),
    "bottleneck-serial": (lambda: BottleneckConfig(target_modules=["mlp"], adapter_size=4), None),
    "bottleneck-parallel": (
        lambda: BottleneckConfig(target_modules=["c_fc"], adapter_size=4, parallel=True),
        None,
    ),
    "diff-pruning": (lambda: DiffPruningConfig(target_modules=["c_fc"], density=0.2), None),
    "diff-pruning-finalized": (
        lambda: DiffPruningConfig(target_modules=["c_fc"], density=0.2),
        lambda model: model.finalize_diff_pruning(),
    ),
    "bitfit": (lambda: BitFitConfig(), None),
    "prompt-tuning": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), None),
    "p-tuning": (
        lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=16),
        None,
    ),
    "prefix-tuning": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), None),
}
STATES = ["fresh", "trained", "merged", "disabled", "several"]


def logits(model: PeftModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_a_step(model: PeftModel) -> None:
    """One real optimizer step, then random values on every trainable tensor (so each one shows)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    randomize_adapters(model, seed=3)
    model.eval()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("method", list(METHODS))
def test_the_loaded_adapter_computes_what_the_saved_one_did(method, state, tmp_path):
    make_config, finish = METHODS[method]
    model = get_peft_model(tiny_gpt2(), make_config())
    if state != "fresh":
        train_a_step(model)
    if finish is not None:
        finish(model)
    if state == "several":
        model.add_adapter("second", LoraConfig(target_modules=["c_fc"], r=2))
        model.set_adapter("second")
        randomize_adapters(model, seed=5)  # the second alone: AdaLoRA's masked triplets stay masked
        model.set_adapter(["default", "second"])
    expected = logits(model)
    out = tmp_path / "saved"

    if state == "merged":
        model.save_pretrained(tmp_path / "unmerged")
        try:
            model.merge_adapter()
        except NotMergeableError:  # a method that does not merge (in this state) is saved as it is
            assert not any(getattr(m, "merged_adapters", None) for m in model.modules())
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
        model.save_pretrained(out)
        unmerged, merged = tensors(tmp_path / "unmerged"), tensors(out)
        assert unmerged.keys() == merged.keys()
        assert all(torch.equal(unmerged[k], merged[k]) for k in merged)  # the unmerged adapter, exactly
    elif state == "disabled":
        with model.disable_adapter():
            model.save_pretrained(out)
    else:
        model.save_pretrained(out)

    loaded = reads(lambda: PeftModel.from_composition(tiny_gpt2(), str(out)))
    assert list(loaded.peft_config) == list(model.peft_config)
    assert loaded.active_adapters == model.active_adapters
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)
    if state == "trained":  # loaded to train on, it starts where the saved one was too
        trainable = PeftModel.from_pretrained(tiny_gpt2(), str(out), is_trainable=True)
        torch.testing.assert_close(logits(trainable), expected, atol=1e-6, rtol=0)


def test_a_gated_diff_pruning_checkpoint_trains_on_and_finalizes_as_the_original(tmp_path):
    """Saved before finalize_diff_pruning(), the file holds δ and log α: loaded to train, the adapter is
    gated again (the L0 penalty applies), and finalizing it gives the original's sparse diff exactly."""
    model = get_peft_model(tiny_gpt2(), DiffPruningConfig(target_modules=["c_fc"], density=0.2))
    train_a_step(model)
    model.save_pretrained(tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in tensors(tmp_path)} == {"diff_weight", "gate_log_alpha"}
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path), is_trainable=True)
    torch.testing.assert_close(loaded.diff_pruning_penalty(), model.diff_pruning_penalty(), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    model.finalize_diff_pruning()
    loaded.finalize_diff_pruning()
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    model.save_pretrained(tmp_path / "final")
    loaded.save_pretrained(tmp_path / "again")
    final, again = tensors(tmp_path / "final"), tensors(tmp_path / "again")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
