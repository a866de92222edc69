"""P-tuning against Hugging Face peft: the same encoder, adapters that load both ways with the same logits and
greedy generations, and the same files (both save the encoder's output P as `prompt_embeddings`)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from test_peft_interop import (
    ATOL,
    DIRECTION_IDS,
    DIRECTIONS,
    MIN_EFFECT,
    RTOL,
    SHARED_FIELDS,
    batch,
    greedy,
    load,
    logits,
    saved_config,
    saved_weights,
)

import peftkit
from peftkit.methods import p_tuning

LIBS = {"peft": peft, "peftkit": peftkit}
CONFIGS = {"peft": peft.PromptEncoderConfig, "peftkit": p_tuning.PromptEncoderConfig}

MODELS = {
    "llama-causal-lm": (tiny_llama, "CAUSAL_LM"),
    "gpt2-causal-lm": (tiny_gpt2, "CAUSAL_LM"),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS"),
}
ENCODERS = {
    "mlp": {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 16},
    "lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16, "encoder_num_layers": 2},
}


def options(task_type: str, encoder: str) -> dict:
    return {"task_type": task_type, "num_virtual_tokens": 5, **ENCODERS[encoder]}


def trained(lib: str, build, config: dict, inputs: dict) -> torch.nn.Module:
    """A P-tuning adapter with random values in every trainable tensor; checks that it changes the logits."""
    base_logits = logits(build(), inputs)
    model = LIBS[lib].get_peft_model(build(), CONFIGS[lib](**config))
    randomize_adapters(model)
    model.eval()
    effect = (logits(model, inputs)[:, -base_logits.shape[1] :] - base_logits).abs().max().item()
    assert effect > MIN_EFFECT, f"the {lib} adapter barely changes the logits ({effect:.1e}): test is void"
    return model


def save(model: torch.nn.Module, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("case", list(MODELS))
def test_round_trip(case, encoder, saver, loader, tmp_path):
    build, task_type = MODELS[case]
    inputs = batch(left_padding=2)
    model = trained(saver, build, options(task_type, encoder), inputs)
    save(model, str(tmp_path))
    loaded = load(loader, build, str(tmp_path))
    expected = logits(model, inputs)
    assert expected.shape[:2] == ((3, 7 + 5) if task_type == "CAUSAL_LM" else (3, 3))
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=RTOL)
    if task_type != "CAUSAL_LM":
        return

    # unpadded: with left padding peft's generate counts the pads in the positions (see prompt tuning)
    inputs = batch()
    models = {saver: model, loader: loaded}
    sequences = {lib: greedy(m, inputs) for lib, m in models.items()}
    assert sequences["peft"].shape == (3, 7 + 5)
    torch.testing.assert_close(sequences["peftkit"], sequences["peft"], atol=0, rtol=0)
    # Greedy tokens of a tiny random model can ignore the prompt; the scores cannot.
    scored = {
        lib: torch.stack(greedy(m, inputs, output_scores=True, return_dict_in_generate=True).scores)
        for lib, m in models.items()
    }
    torch.testing.assert_close(scored["peftkit"], scored["peft"], atol=ATOL, rtol=RTOL)
    base = torch.stack(greedy(build(), inputs, output_scores=True, return_dict_in_generate=True).scores)
    assert (scored["peft"][0] - base[0]).abs().max() > MIN_EFFECT, "the prompt does not change generation"


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_same_encoder_as_peft(encoder):
    """peft's trained encoder weights, copied into peftkit's encoder under the same names, give the same P."""
    config = options("CAUSAL_LM", encoder)
    if encoder == "lstm":
        config["encoder_num_layers"] = 3
    theirs = trained("peft", tiny_llama, config, batch())
    ours = peftkit.get_peft_model(tiny_llama(), CONFIGS["peftkit"](**config))
    ours.model_adapters["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    with torch.no_grad():
        expected = theirs.get_prompt_embedding_to_save("default")
        torch.testing.assert_close(ours.model_adapters["default"].prompts(), expected, atol=1e-6, rtol=1e-6)
    inputs = batch(left_padding=2)
    torch.testing.assert_close(logits(ours.eval(), inputs), logits(theirs, inputs), atol=ATOL, rtol=RTOL)


def test_peft_file_loads_for_training_in_peftkit(tmp_path):
    """peft refuses to load a P-tuning adapter as trainable; peftkit trains its saved prompt directly."""
    build, task_type = MODELS["llama-causal-lm"]
    inputs = batch()
    model = trained("peft", build, options(task_type, "lstm"), inputs)
    save(model, str(tmp_path))
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        peft.PeftModel.from_pretrained(build(), str(tmp_path), is_trainable=True)
    with pytest.warns(UserWarning, match="Training continues on that prompt directly"):
        resumed = peftkit.PeftModel.from_pretrained(build(), str(tmp_path), is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == 5 * 32
    torch.testing.assert_close(logits(resumed.eval(), inputs), logits(model, inputs), atol=ATOL, rtol=RTOL)


MEANINGFUL_FIELDS = SHARED_FIELDS + [
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_reparameterization_type",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_dropout",
]


@pytest.mark.parametrize("encoder", [*ENCODERS, "defaults"])
@pytest.mark.parametrize("case", ["llama-causal-lm", "bert-seq-cls"])
def test_same_files(case, encoder, tmp_path):
    build, task_type = MODELS[case]
    config = {"task_type": task_type, "num_virtual_tokens": 5}
    if encoder != "defaults":
        config.update(ENCODERS[encoder], encoder_dropout=0.1)
    for lib in LIBS:
        save(trained(lib, build, config, batch()), str(tmp_path / lib))
    hf, kit = saved_config(str(tmp_path / "peft")), saved_config(str(tmp_path / "peftkit"))
    assert set(hf) - set(kit) == {"peft_version"}
    assert set(kit) - set(hf) == set()
    for field in MEANINGFUL_FIELDS:
        hf_value, kit_value = hf[field], kit[field]
        if field == "modules_to_save" and isinstance(hf_value, list):
            hf_value, kit_value = sorted(set(hf_value)), sorted(set(kit_value))  # peft writes heads twice
        assert kit_value == hf_value, f"{field}: peftkit wrote {kit_value!r}, peft {hf_value!r}"
    assert kit["encoder_hidden_size"] == (32 if encoder == "defaults" else 16)

    hf_weights, kit_weights = saved_weights(str(tmp_path / "peft")), saved_weights(str(tmp_path / "peftkit"))
    assert {k: (v.shape, v.dtype) for k, v in kit_weights.items()} == {
        k: (v.shape, v.dtype) for k, v in hf_weights.items()
    }
    assert kit_weights["prompt_embeddings"].shape == (5, 32)
