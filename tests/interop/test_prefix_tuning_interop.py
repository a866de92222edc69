"""Prefix tuning against Hugging Face peft: a prefix saved by either library loads in the other with the same
logits and the same generated tokens (greedy and beam search), and both write the same files."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from test_peft_interop import ATOL, MIN_EFFECT, RTOL, batch, greedy, saved_config, saved_weights

import peftkit
from peftkit.methods.prefix_tuning import PrefixTuningConfig

LIBS = {"peft": peft, "peftkit": peftkit}
CONFIGS = {"peft": peft.PrefixTuningConfig, "peftkit": PrefixTuningConfig}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft-to-peftkit", "peftkit-to-peft"]
CASES = {
    "llama-causal-lm": (tiny_llama, "CAUSAL_LM"),  # grouped-query attention: 2 key/value heads of 4
    "gpt2-causal-lm": (tiny_gpt2, "CAUSAL_LM"),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS"),
    "t5-seq2seq": (tiny_t5, "SEQ_2_SEQ_LM"),
}
N = 4  # virtual tokens


def inputs_for(task: str) -> dict[str, torch.Tensor]:
    inputs = batch(left_padding=2)
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, 2:6]
    return inputs


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def save_random_prefix(lib: str, build, task: str, projection: bool, path: str) -> torch.nn.Module:
    """A prefix with random weights in `lib`, saved to `path`; checks that it changes the logits."""
    config = CONFIGS[lib](task_type=task, num_virtual_tokens=N, prefix_projection=projection)
    model = LIBS[lib].get_peft_model(build(), config)
    randomize_adapters(model)
    model.eval()
    inputs = inputs_for(task)
    effect = (logits(model, inputs) - logits(build(), inputs)).abs().max().item()
    assert effect > MIN_EFFECT, f"the {lib} prefix barely changes the logits ({effect:.1e}): test is void"
    model.save_pretrained(path)
    return model


def load(lib: str, build, path: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].PeftModel.from_pretrained(build(), path).eval()


def scored(model: torch.nn.Module, inputs: dict, **options):
    return greedy(model, inputs, output_scores=True, return_dict_in_generate=True, **options)


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projection"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefix_tuning_round_trip(case, projection, saver, loader, tmp_path):
    build, task = CASES[case]
    trained = save_random_prefix(saver, build, task, projection, str(tmp_path))
    loaded = load(loader, build, str(tmp_path))
    inputs = inputs_for(task)
    torch.testing.assert_close(logits(loaded, inputs), logits(trained, inputs), atol=ATOL, rtol=RTOL)
    if task == "SEQ_CLS":
        return

    inputs.pop("decoder_input_ids", None)  # seq2seq generates its own; causal LMs keep the left-padded row
    models = {saver: trained, loader: loaded}
    # beam search once per model: the projection changes where the prefix comes from, not how it is used
    for options in ({}, {"num_beams": 3}) if not projection else ({},):
        out = {lib: scored(model, inputs, **options) for lib, model in models.items()}
        assert torch.equal(out["peftkit"].sequences, out["peft"].sequences), options
        if not options:  # greedy: the scores of every step agree, and differ from the base model's
            steps = {lib: torch.stack(o.scores) for lib, o in out.items()}
            torch.testing.assert_close(steps["peftkit"], steps["peft"], atol=ATOL, rtol=RTOL)
            base = torch.stack(scored(build(), inputs).scores)
            assert (steps["peft"] - base).abs().max() > MIN_EFFECT, "the prefix does not change generation"
        else:
            torch.testing.assert_close(
                out["peftkit"].sequences_scores, out["peft"].sequences_scores, atol=ATOL, rtol=RTOL
            )


# Fields whose values must agree: they decide what the prefix computes or how it is loaded.
MEANINGFUL_FIELDS = [
    "peft_type",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "prefix_projection",
    "init_weights",
]


@pytest.mark.parametrize(
    ("case", "projection"),
    [("llama-causal-lm", False), ("llama-causal-lm", True), ("bert-seq-cls", False), ("t5-seq2seq", True)],
)
def test_same_files(case, projection, tmp_path):
    build, task = CASES[case]
    for lib in LIBS:
        save_random_prefix(lib, build, task, projection, str(tmp_path / lib))
    hf, kit = saved_config(str(tmp_path / "peft")), saved_config(str(tmp_path / "peftkit"))
    assert set(hf) - set(kit) == {"peft_version"}
    assert set(kit) - set(hf) == set()
    for field in MEANINGFUL_FIELDS:
        assert kit[field] == hf[field], f"{field}: peftkit wrote {kit[field]!r}, peft {hf[field]!r}"
    # peft writes modules_to_save with each head twice (["classifier", "score", "classifier", "score"])
    assert sorted(set(kit["modules_to_save"] or [])) == sorted(set(hf["modules_to_save"] or []))

    hf_weights, kit_weights = saved_weights(str(tmp_path / "peft")), saved_weights(str(tmp_path / "peftkit"))
    assert {k: (v.shape, v.dtype) for k, v in kit_weights.items()} == {
        k: (v.shape, v.dtype) for k, v in hf_weights.items()
    }
    # one row per virtual token: keys and values of every layer; the projection's MLP is not saved
    layers, token_dim = kit["num_layers"], kit["token_dim"]
    assert kit_weights["prompt_embeddings"].shape == (N, layers * 2 * token_dim)
