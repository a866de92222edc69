"""Cross-checks against Hugging Face peft: an adapter saved by either library loads in the other with the
same outputs, and both libraries write the same files.

Every round trip trains-ish an adapter in one library (random values in every trainable tensor, so the
adapter clearly changes the logits), saves it, loads it onto a fresh base model with the other library,
and compares logits. peftkit itself never imports peft; only these tests do.
"""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file
from transformers import BertForQuestionAnswering, BertForTokenClassification

import peftkit

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft-to-peftkit", "peftkit-to-peft"]
ATOL = RTOL = 1e-5
MIN_EFFECT = 1e-2  # the adapter must move some logit by at least this much, or the comparison proves nothing

QV = ["q_proj", "v_proj"]
BERT_QV = ["query", "value"]
C_ATTN = {"target_modules": ["c_attn"], "fan_in_fan_out": True}  # GPT-2's fused qkv, a transformers Conv1D


def config(lib: str, kind: str, **options):
    """The same config built with either library."""
    return getattr(LIBS[lib], kind)(**options)


def batch(seq_len: int = 7, left_padding: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of random token ids; the first row left-padded by `left_padding` pad tokens (id 0)."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (3, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :left_padding] = 0
    attention_mask[0, :left_padding] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def train_and_save(lib: str, build, kind: str, options: dict, path: str, inputs: dict) -> torch.nn.Module:
    """An adapter with random weights in `lib`, saved to `path`; checks that it changes the logits."""
    base_logits = logits(build(), inputs)
    model = LIBS[lib].get_peft_model(build(), config(lib, kind, **options))
    randomize_adapters(model)
    model.eval()
    adapted = logits(model, inputs)
    if adapted.dim() == 3:
        adapted = adapted[:, -base_logits.shape[1] :]  # causal LM with virtual tokens: the real positions
    effect = (adapted - base_logits).abs().max().item()
    assert effect > MIN_EFFECT, f"the {lib} adapter barely changes the logits ({effect:.1e}): test is void"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when it saves embedding layers
        model.save_pretrained(path)
    return model


def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **options):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Position ids are not supported ..."
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, **options)


def load(lib: str, build, path: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].PeftModel.from_pretrained(build(), path).eval()


def saved_weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def saved_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


# ---- LoRA family -------------------------------------------------------------------------------------

# (builder, LoraConfig options): every option means the same in both libraries.
LORA_CASES = {
    "linear": (tiny_llama, {"target_modules": QV}),
    "embedding": (tiny_llama, {"target_modules": ["embed_tokens"], "task_type": "CAUSAL_LM"}),
    "conv1d": (tiny_gpt2, {**C_ATTN, "task_type": "CAUSAL_LM"}),
    "rslora": (tiny_llama, {"target_modules": QV, "r": 4, "lora_alpha": 16, "use_rslora": True}),
    "dora-linear": (tiny_llama, {"target_modules": QV, "use_dora": True, "task_type": "CAUSAL_LM"}),
    "dora-embedding": (tiny_llama, {"target_modules": ["embed_tokens"], "use_dora": True}),
    "dora-conv1d": (tiny_gpt2, {**C_ATTN, "use_dora": True}),
    "rank-alpha-pattern": (
        tiny_llama,
        {
            "target_modules": QV,
            "r": 8,
            "lora_alpha": 8,
            "task_type": "CAUSAL_LM",
            "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.v_proj": 4},
            "alpha_pattern": {"v_proj": 32},
        },
    ),
    "all-linear": (tiny_llama, {"target_modules": "all-linear", "r": 4, "task_type": "CAUSAL_LM"}),
    "seq-cls": (tiny_bert, {"target_modules": BERT_QV, "task_type": "SEQ_CLS"}),
    "seq-cls-bias-all": (tiny_bert, {"target_modules": BERT_QV, "task_type": "SEQ_CLS", "bias": "all"}),
    "bias-all": (tiny_gpt2, {**C_ATTN, "bias": "all"}),
    "bias-lora-only": (tiny_gpt2, {**C_ATTN, "bias": "lora_only"}),
}


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_round_trip(case, saver, loader, tmp_path):
    build, options = LORA_CASES[case]
    inputs = batch()
    trained = train_and_save(saver, build, "LoraConfig", options, str(tmp_path), inputs)
    loaded = load(loader, build, str(tmp_path))
    torch.testing.assert_close(logits(loaded, inputs), logits(trained, inputs), atol=ATOL, rtol=RTOL)


class ConvNet(torch.nn.Module):
    """A small image classifier: LoRA and DoRA on nn.Conv2d need no transformers model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(pixels).relu().mean(dim=(2, 3)))


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv2d_round_trip(use_dora, saver, loader, tmp_path):
    pixels = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    model = LIBS[saver].get_peft_model(
        ConvNet(), config(saver, "LoraConfig", r=4, target_modules=["conv"], use_dora=use_dora)
    )
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(pixels)
        assert (expected - ConvNet()(pixels)).abs().max() > MIN_EFFECT
    model.save_pretrained(str(tmp_path))
    loaded = load(loader, ConvNet, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), expected, atol=ATOL, rtol=RTOL)


def test_rank_pattern_gives_per_layer_shapes(tmp_path):
    """rank_pattern really changes ranks on disk, identically in both libraries."""
    build, options = LORA_CASES["rank-alpha-pattern"]
    shapes = {}
    for lib in LIBS:
        train_and_save(lib, build, "LoraConfig", options, str(tmp_path / lib), batch())
        shapes[lib] = {k: tuple(v.shape) for k, v in saved_weights(str(tmp_path / lib)).items()}
    layer = "base_model.model.model.layers.{}.self_attn.{}.lora_A.weight"
    expected = {(0, "q_proj"): 2, (1, "q_proj"): 2, (0, "v_proj"): 8, (1, "v_proj"): 4}
    for lib, lib_shapes in shapes.items():
        ranks = {(i, proj): lib_shapes[layer.format(i, proj)][0] for i, proj in expected}
        assert ranks == expected, f"{lib} saved ranks {ranks}"
    assert shapes["peft"] == shapes["peftkit"]


@pytest.mark.parametrize("saver", list(LIBS))
def test_seq_cls_saves_the_trained_head(saver, tmp_path):
    """SEQ_CLS trains the classifier in full; its weights are in the file under the head's plain name."""
    build, options = LORA_CASES["seq-cls"]
    train_and_save(saver, build, "LoraConfig", options, str(tmp_path), batch())
    weights = saved_weights(str(tmp_path))
    head = build().classifier
    for name in ("weight", "bias"):
        saved = weights[f"base_model.model.classifier.{name}"]
        assert not torch.allclose(saved, getattr(head, name)), f"classifier.{name} was saved untrained"


def test_peft_embedding_file_carries_the_base_table(tmp_path):
    """peft saves a LoRA-targeted embedding's base table as well (vocabularies get resized); peftkit loads
    it into the base layer, as peft does."""
    build, options = LORA_CASES["embedding"]
    trained = peft.get_peft_model(build(), peft.LoraConfig(**options))
    randomize_adapters(trained)
    table = trained.get_base_model().model.embed_tokens.base_layer.weight
    with torch.no_grad():
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.save_pretrained(str(tmp_path))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved_weights(str(tmp_path))

    inputs = batch()
    expected = logits(trained.eval(), inputs)
    for lib in LIBS:
        loaded = load(lib, build, str(tmp_path))
        torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=RTOL)


# ---- prompt tuning ---------------------------------------------------------------------------------

PROMPT_CASES = {
    "llama-causal-lm": (tiny_llama, "CAUSAL_LM"),
    "gpt2-causal-lm": (tiny_gpt2, "CAUSAL_LM"),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS"),
}


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_tuning_round_trip(case, saver, loader, tmp_path):
    build, task_type = PROMPT_CASES[case]
    inputs = batch(left_padding=2)
    options = {"num_virtual_tokens": 5, "task_type": task_type}
    trained = train_and_save(saver, build, "PromptTuningConfig", options, str(tmp_path), inputs)
    loaded = load(loader, build, str(tmp_path))
    expected = logits(trained, inputs)
    assert expected.shape[:2] == ((3, 7 + 5) if task_type == "CAUSAL_LM" else (3, 3))
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL, rtol=RTOL)
    if task_type != "CAUSAL_LM":
        return

    inputs = batch()  # no padding: see test_prompt_tuning_generate_left_padded
    models = {saver: trained, loader: loaded}
    sequences = {lib: greedy(model, inputs) for lib, model in models.items()}
    assert sequences["peft"].shape == (3, 7 + 5), "peft returns the prompt ids followed by the new tokens"
    torch.testing.assert_close(sequences["peftkit"], sequences["peft"], atol=0, rtol=0)
    torch.testing.assert_close(sequences["peft"][:, :7], inputs["input_ids"], atol=0, rtol=0)

    # Greedy tokens of a tiny random model can ignore the prompt; the scores cannot.
    scored = {
        lib: torch.stack(greedy(model, inputs, output_scores=True, return_dict_in_generate=True).scores)
        for lib, model in models.items()
    }
    torch.testing.assert_close(scored["peftkit"], scored["peft"], atol=ATOL, rtol=RTOL)
    base = torch.stack(greedy(build(), inputs, output_scores=True, return_dict_in_generate=True).scores)
    assert (scored["peft"][0] - base[0]).abs().max() > MIN_EFFECT, "the prompt does not change generation"


@pytest.mark.xfail(
    strict=True,
    reason="Known difference: with virtual tokens peft's generate drops position_ids (it warns 'Position ids "
    "are not supported'), so a left-padded row gets positions that count its pads; peftkit lets transformers "
    "derive them from the attention mask, as for the base model. Unpadded rows agree exactly.",
)
@pytest.mark.parametrize("case", ["llama-causal-lm", "gpt2-causal-lm"])
def test_prompt_tuning_generate_left_padded(case, tmp_path):
    build, task_type = PROMPT_CASES[case]
    inputs = batch(left_padding=2)
    options = {"num_virtual_tokens": 5, "task_type": task_type}
    trained = train_and_save("peft", build, "PromptTuningConfig", options, str(tmp_path), inputs)
    loaded = load("peftkit", build, str(tmp_path))
    scores = [
        torch.stack(greedy(model, inputs, output_scores=True, return_dict_in_generate=True).scores)
        for model in (trained, loaded)
    ]
    torch.testing.assert_close(scores[1], scores[0], atol=ATOL, rtol=RTOL)


# ---- file format --------------------------------------------------------------------------------

FORMAT_CASES = {
    "lora": (
        tiny_llama,
        "LoraConfig",
        {
            "target_modules": QV,
            "r": 4,
            "lora_alpha": 16,
            "task_type": "CAUSAL_LM",
            "lora_dropout": 0.1,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 32},
            "use_rslora": True,
        },
    ),
    "lora-seq-cls": (tiny_bert, "LoraConfig", {"target_modules": BERT_QV, "task_type": "SEQ_CLS"}),
    "prompt-tuning": (tiny_llama, "PromptTuningConfig", {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}),
    "prompt-tuning-seq-cls": (
        tiny_bert,
        "PromptTuningConfig",
        {"num_virtual_tokens": 5, "task_type": "SEQ_CLS"},
    ),
}

# Fields whose values must agree: they decide what the adapter computes or how it is loaded.
SHARED_FIELDS = ["peft_type", "task_type", "modules_to_save", "inference_mode", "base_model_name_or_path"]
MEANINGFUL_FIELDS = {
    "LoraConfig": SHARED_FIELDS
    + [
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
        "init_lora_weights",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    ],
    "PromptTuningConfig": SHARED_FIELDS
    + [
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
    ],
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_same_files(case, tmp_path):
    build, kind, options = FORMAT_CASES[case]
    for lib in LIBS:
        train_and_save(lib, build, kind, options, str(tmp_path / lib), batch())
    hf, kit = saved_config(str(tmp_path / "peft")), saved_config(str(tmp_path / "peftkit"))

    assert set(hf) - set(kit) == {"peft_version"}
    assert set(kit) - set(hf) == set()
    for field in MEANINGFUL_FIELDS[kind]:
        hf_value, kit_value = hf[field], kit[field]
        if field in ("target_modules", "modules_to_save") and isinstance(hf_value, list):
            # peft keeps these as sets: it writes them in any order, and for prompt tuning with SEQ_CLS it
            # writes modules_to_save with each head twice (["classifier", "classifier", "score", "score"]).
            hf_value, kit_value = sorted(set(hf_value)), sorted(set(kit_value))
        assert kit_value == hf_value, f"{field}: peftkit wrote {kit_value!r}, peft {hf_value!r}"

    hf_weights, kit_weights = saved_weights(str(tmp_path / "peft")), saved_weights(str(tmp_path / "peftkit"))
    assert {k: (v.shape, v.dtype) for k, v in kit_weights.items()} == {
        k: (v.shape, v.dtype) for k, v in hf_weights.items()
    }


# ---- the other task types ---------------------------------------------------------------------------


def outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's scores as one tensor, whatever the head (QA has start and end logits)."""
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([out.start_logits, out.end_logits]) if hasattr(out, "start_logits") else out.logits


TASK_CASES = {
    "token-cls": (
        lambda: tiny_bert(num_labels=2, head=BertForTokenClassification),
        "TOKEN_CLS",
        BERT_QV,
        "base_model.model.classifier.weight",
    ),
    "question-ans": (
        lambda: tiny_bert(num_labels=2, head=BertForQuestionAnswering),
        "QUESTION_ANS",
        BERT_QV,
        "base_model.model.qa_outputs.weight",
    ),
    "seq2seq": (tiny_t5, "SEQ_2_SEQ_LM", ["q", "v"], None),
}


@pytest.mark.parametrize(("saver", "loader"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", list(TASK_CASES))
def test_other_task_types_round_trip(case, saver, loader, tmp_path):
    build, task_type, targets, head_key = TASK_CASES[case]
    inputs = batch()
    if task_type == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    options = {"task_type": task_type, "target_modules": targets}
    model = LIBS[saver].get_peft_model(build(), config(saver, "LoraConfig", **options))
    randomize_adapters(model)
    model.eval()
    expected = outputs(model, inputs)
    assert (expected - outputs(build(), inputs)).abs().max() > MIN_EFFECT
    model.save_pretrained(str(tmp_path))
    if head_key:
        assert head_key in saved_weights(str(tmp_path))  # the task head is trained and saved
    loaded = load(loader, build, str(tmp_path))
    assert type(loaded).__name__ == type(model).__name__
    torch.testing.assert_close(outputs(loaded, inputs), expected, atol=ATOL, rtol=RTOL)
    if task_type == "SEQ_2_SEQ_LM":
        del inputs["decoder_input_ids"]
        assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


def test_mixed_batch_matches_peft(tmp_path):
    """Two adapters saved once, loaded into both libraries: the same rows get the same logits."""
    for name, targets in [("one", QV), ("two", ["o_proj", "up_proj", "v_proj"])]:
        model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(target_modules=targets))
        randomize_adapters(model, seed=len(targets))
        model.save_pretrained(str(tmp_path / name))
    loaded = {}
    for lib in LIBS:
        model = load(lib, tiny_llama, str(tmp_path / "one"))
        model.load_adapter(str(tmp_path / "two"), adapter_name="two")
        loaded[lib] = model
    inputs = batch()
    names = ["two", "__base__", "default"]
    with torch.no_grad():
        ours = loaded["peftkit"](**inputs, adapter_names=names).logits
        theirs = loaded["peft"](**inputs, adapter_names=names).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert (ours[0] - ours[1]).abs().max() > MIN_EFFECT and (ours[2] - ours[1]).abs().max() > MIN_EFFECT


def on_disk(name: str) -> str:
    """peft's parameter name as its files spell it: no adapter name, DoRA's magnitude without `.weight`."""
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


GRADIENT_CASES = {
    "lora": (tiny_llama, {"target_modules": "all-linear"}),
    "dora": (tiny_llama, {"target_modules": "all-linear", "use_dora": True}),
    "bias-all": (tiny_bert, {"target_modules": BERT_QV, "bias": "all"}),  # the base biases train too
    "dora-bias": (tiny_bert, {"target_modules": BERT_QV, "use_dora": True}),  # DoRA over layers with a bias
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_training_gradients_equal_peft_s(case, checkpointing, tmp_path):
    """One training step's loss and every trainable tensor's gradient, peftkit against peft on the same
    adapter (peftkit's fused training path against peft's module-by-module one), with gradient
    checkpointing (non-reentrant) off and on."""
    build, options = GRADIENT_CASES[case]
    inputs = batch()
    inputs["labels"] = inputs["input_ids"] if build is tiny_llama else torch.tensor([0, 2, 1])
    ours = peftkit.get_peft_model(build(), peftkit.LoraConfig(r=4, **options))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    losses = {}
    for lib, model in (("peftkit", ours), ("peft", theirs)):
        model.train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
            model.get_base_model().enable_input_require_grads()
        loss = model(**inputs).loss
        loss.backward()
        losses[lib] = loss.item()
    assert losses["peftkit"] == pytest.approx(losses["peft"], abs=1e-6)
    ours_by_key = {k: t.grad for k, t in peftkit.serialization.adapter_tensors(ours, "default").items()}
    theirs_by_key = {on_disk(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_by_key.keys() == theirs_by_key.keys()
    assert all(grad is not None for grad in ours_by_key.values())
    for key, grad in ours_by_key.items():
        torch.testing.assert_close(grad, theirs_by_key[key], atol=1e-6, rtol=1e-4, msg=key)
