"""Prefix tuning: the model run with the prefix as its cache, checked against the base model given a cache
built by hand from the prefix's columns, and against hand-rolled decoding."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from conftest import VOCAB, snapshot, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, train_and_check_frozen
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DynamicCache,
    EncoderDecoderCache,
    LlamaForCausalLM,
)

from peftkit import NotMergeableError, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.serialization import load_config

N = 3  # virtual tokens
# (key/value heads, head_dim) of the tiny models: Llama has 4 query heads but 2 key/value heads
DIMS = {"llama": (2, 8), "gpt2": (4, 8), "bert": (4, 8)}


def padded_batch():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding on the first row
    mask[2, 5:] = 0  # right padding on the last one
    return input_ids, mask


def wrap(builder, task: str, **options) -> PeftModel:
    model = get_peft_model(builder(), PrefixTuningConfig(task_type=task, num_virtual_tokens=N, **options))
    with torch.no_grad():  # a prefix far from the initial one, so that it visibly changes the outputs
        for p in model.model_adapters["default"].parameters():
            p.mul_(3)
    return model.eval()


def prefix(model: PeftModel) -> torch.Tensor:
    return model.model_adapters["default"].saved_state()["prompt_embeddings"].detach()


def layer_kv(p: torch.Tensor, block: int, heads: int, head_dim: int, batch: int) -> torch.Tensor:
    """Columns [block·d, (block+1)·d) of P as (batch, heads, n, head_dim): one layer's keys or values."""
    d = heads * head_dim
    columns = p[:, block * d : (block + 1) * d]
    return columns.reshape(p.shape[0], heads, head_dim).transpose(0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)


def reference_cache(p, layers, heads, head_dim, batch, blocks=None):
    """The cache a model would have after reading the virtual tokens: layer ℓ's keys and values are P's blocks
    2ℓ and 2ℓ+1 (or the given block pairs)."""
    blocks = blocks or [(2 * i, 2 * i + 1) for i in range(layers)]
    return DynamicCache(
        [(layer_kv(p, k, heads, head_dim, batch), layer_kv(p, v, heads, head_dim, batch)) for k, v in blocks]
    )


def with_ones(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], N, dtype=mask.dtype), mask], dim=1)


def t5_blocks(layers: int) -> list[tuple[int, int]]:
    """Hugging Face peft's blocks for encoder-decoder models: decoder layer ℓ reads 4ℓ, 4ℓ+1 (mod 2L)."""
    return [((4 * i) % (2 * layers), (4 * i + 1) % (2 * layers)) for i in range(layers)]


@pytest.mark.parametrize(("name", "builder"), [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_causal_lm_output_is_the_base_model_with_the_prefix_as_its_cache(name, builder):
    base, model = builder(), wrap(builder, "CAUSAL_LM")
    heads, head_dim = DIMS[name]
    config = model.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, heads, heads * head_dim)
    assert prefix(model).shape == (N, 2 * 2 * heads * head_dim)
    input_ids, mask = padded_batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask).logits
        cache = reference_cache(prefix(model), 2, heads, head_dim, batch=3)
        expected = base(input_ids=input_ids, attention_mask=with_ones(mask), past_key_values=cache).logits
        assert out.shape == (3, 6, VOCAB)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out, base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-2)
        # position_ids count from the first real token: the prefix occupies positions 0..N-1
        positions = torch.arange(6).expand(3, -1)
        torch.testing.assert_close(
            model(input_ids=input_ids, position_ids=positions).logits, model(input_ids).logits
        )


def test_prefix_projection_is_the_papers_mlp_of_the_embedding():
    base, model = tiny_llama(), wrap(tiny_llama, "CAUSAL_LM", prefix_projection=True, encoder_hidden_size=24)
    encoder = model.model_adapters["default"]
    e = encoder.embedding.detach()
    w1, b1 = encoder.transform[0].weight.detach(), encoder.transform[0].bias.detach()
    w2, b2 = encoder.transform[2].weight.detach(), encoder.transform[2].bias.detach()
    p = torch.tanh(e @ w1.T + b1) @ w2.T + b2  # P = W₂ tanh(W₁ E + b₁) + b₂
    assert e.shape == (N, 16) and w1.shape == (24, 16) and w2.shape == (2 * 2 * 16, 24)
    torch.testing.assert_close(prefix(model), p)
    input_ids, mask = padded_batch()
    with torch.no_grad():
        expected = base(
            input_ids=input_ids,
            attention_mask=with_ones(mask),
            past_key_values=reference_cache(p, 2, 2, 8, 3),
        ).logits
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize(
    ("projection", "trainable"),
    # flat: P is n × 2·L·d; projected: E (n × d) + Linear(d, h) + Linear(h, 2·L·d), h = d = 16 by default
    [(False, N * 2 * 2 * 16), (True, N * 16 + (16 * 16 + 16) + (16 * 64 + 64))],
    ids=["flat", "projection"],
)
def test_training_lowers_loss_with_the_base_frozen(projection, trainable):
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection)
    )
    assert model.get_nb_trainable_parameters()[0] == trainable
    input_ids, mask = padded_batch()
    before = prefix(model).clone()
    train_and_check_frozen(
        model, frozen, {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids}, 0.1
    )
    assert not torch.allclose(prefix(model), before)


def test_each_forward_gets_a_fresh_cache_and_gradients_reach_the_prefix():
    model = wrap(tiny_llama, "CAUSAL_LM")
    encoder = model.model_adapters["default"]
    before = encoder.embedding.detach().clone()
    input_ids, mask = padded_batch()
    first = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    second = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    assert first.past_key_values is not second.past_key_values
    assert first.past_key_values.get_seq_length() == N + 6  # the prefix, then the tokens the model appended
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    assert torch.equal(encoder.embedding, before)  # the model wrote into its cache, never into P
    keys = first.past_key_values.layers[1].keys
    torch.testing.assert_close(keys[:, :, :N], layer_kv(before, 2, 2, 8, batch=3))
    first.logits.sum().backward()
    grad = encoder.embedding.grad
    assert (
        grad is not None and (grad.abs().sum(0) > 0).all()
    )  # every column of P, keys and values of each layer


def test_seq_cls_output_is_the_base_model_with_the_prefix_as_its_cache():
    base, model = tiny_bert(), wrap(tiny_bert, "SEQ_CLS")
    base.classifier.load_state_dict(model.get_base_model().classifier.modules_to_save["default"].state_dict())
    input_ids, mask = padded_batch()
    token_types = torch.zeros_like(input_ids)
    token_types[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
        expected = base(
            input_ids=input_ids,
            attention_mask=with_ones(mask),
            token_type_ids=token_types,
            labels=labels,
            past_key_values=reference_cache(prefix(model), 2, 4, 8, batch=3),
        )
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, expected.loss)
        plain = base(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types).logits
        assert not torch.allclose(out.logits, plain, atol=1e-3)
    # the prefix and the classifier head (trained in full for SEQ_CLS)
    assert model.get_nb_trainable_parameters()[0] == N * 2 * 2 * 32 + (32 * 3 + 3)


@pytest.mark.parametrize("num_layers", [2, 3])
def test_seq2seq_prefix_reaches_the_decoder_self_attention_in_peft_layout(num_layers):
    base, model = tiny_t5(num_layers=num_layers), wrap(lambda: tiny_t5(num_layers=num_layers), "SEQ_2_SEQ_LM")
    assert model.peft_config["default"].num_transformer_submodules == 2
    input_ids, mask = padded_batch()
    decoder_ids = input_ids[:, :4]
    p = prefix(model)
    assert p.shape == (N, 2 * num_layers * 32)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        cache = EncoderDecoderCache(
            reference_cache(p, num_layers, 4, 8, batch=3, blocks=t5_blocks(num_layers)), DynamicCache()
        )
        expected = base(
            input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids, past_key_values=cache
        ).logits
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        plain = base(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        assert not torch.allclose(out, plain, atol=1e-2)
        # a decoder mask grows by N ones; the encoder's mask does not
        with_mask = model(
            input_ids=input_ids,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=torch.ones_like(decoder_ids),
        ).logits
        torch.testing.assert_close(with_mask, out)
    # which blocks of P are read: with 2 layers, blocks 0, 1 by both layers and 2, 3 by none (as in peft)
    model.train()
    model(input_ids=input_ids, decoder_input_ids=decoder_ids).logits.sum().backward()
    used = model.model_adapters["default"].embedding.grad.view(N, 2 * num_layers, 32).abs().sum((0, 2)) > 0
    expected_used = [True, True, False, False] if num_layers == 2 else [True] * 6
    assert used.tolist() == expected_used


def greedy_by_hand(base, p, blocks, heads, head_dim, input_ids, new):
    """Greedy decoding by the base model, re-reading the whole sequence with a new prefix cache each step."""
    tokens = input_ids
    for _ in range(new):
        cache = reference_cache(p, len(blocks), heads, head_dim, tokens.shape[0], blocks)
        mask = with_ones(torch.ones_like(tokens))
        logits = base(input_ids=tokens, attention_mask=mask, past_key_values=cache).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize(("name", "builder"), [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_generate_is_greedy_decoding_with_the_prefix(name, builder):
    base, model = builder(), wrap(builder, "CAUSAL_LM")
    input_ids = padded_batch()[0]
    heads, head_dim = DIMS[name]
    blocks = [(0, 1), (2, 3)]
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
        expected = greedy_by_hand(base, prefix(model), blocks, heads, head_dim, input_ids, 5)
        assert torch.equal(out, expected)
        assert not torch.equal(out, base.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False))
        # from embeddings: only the new tokens, as transformers returns them
        embeds = base.get_input_embeddings()(input_ids)
        assert torch.equal(
            model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False), out[:, 6:]
        )


def test_beam_search_scores_its_best_beam_with_the_prefix():
    base, model = tiny_llama(), wrap(tiny_llama, "CAUSAL_LM")
    input_ids = padded_batch()[0]
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            max_new_tokens=4,
            num_beams=3,
            do_sample=False,
            length_penalty=0.0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        sequences = out.sequences
        assert sequences.shape == (3, 10) and torch.equal(sequences[:, :6], input_ids)
        # with length_penalty=0 a beam's score is the sum of its tokens' log-probabilities under the model
        cache = reference_cache(prefix(model), 2, 2, 8, batch=3)
        logits = base(
            input_ids=sequences, attention_mask=with_ones(torch.ones_like(sequences)), past_key_values=cache
        )
        logprobs = logits.logits[:, 5:-1].log_softmax(-1).gather(-1, sequences[:, 6:, None]).squeeze(-1)
        torch.testing.assert_close(out.sequences_scores, logprobs.sum(-1), atol=1e-5, rtol=1e-5)


def test_seq2seq_generate_is_greedy_decoding_with_the_prefix():
    model = wrap(tiny_t5, "SEQ_2_SEQ_LM")
    input_ids, mask = padded_batch()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        decoder_ids = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
        for step in range(4):
            logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits[
                :, -1
            ]
            torch.testing.assert_close(out.scores[step], logits, atol=1e-5, rtol=1e-5)
            decoder_ids = torch.cat([decoder_ids, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out.sequences, decoder_ids)
        # beam search: a beam's score (length_penalty=0) is the sum of its tokens' log-probabilities
        beams = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=4,
            num_beams=2,
            length_penalty=0.0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        sequences = beams.sequences
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
        logprobs = logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(beams.sequences_scores, logprobs.sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projection"])
@pytest.mark.parametrize(
    ("builder", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS"), (tiny_t5, "SEQ_2_SEQ_LM")]
)
def test_save_load_round_trip(tmp_path, builder, task, projection):
    model = wrap(builder, task, prefix_projection=projection)
    input_ids, mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = input_ids[:, :3]
    with torch.no_grad():  # move the head too, so that it must be saved and loaded
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is projection
    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    # a projected prefix comes back as the projection's output: a plain prefix, for inference
    assert loaded.model_adapters["default"].transform is None
    torch.testing.assert_close(prefix(loaded), prefix(model), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    options = {}
    if projection:
        with pytest.raises(ValueError, match=r"saved with prefix_projection=True.*is_trainable=False"):
            PeftModel.from_pretrained(builder(), tmp_path, is_trainable=True)
        # the error's advice: train the saved prefix itself
        options["config"] = dataclasses.replace(load_config(str(tmp_path)), prefix_projection=False)
    trainable = PeftModel.from_pretrained(builder(), tmp_path, is_trainable=True, **options)
    assert trainable.model_adapters["default"].embedding.requires_grad
    torch.testing.assert_close(prefix(trainable), prefix(model), atol=0, rtol=0)


def test_zero_init_gives_a_zero_prefix():
    for projection in (False, True):
        model = get_peft_model(
            tiny_llama(),
            PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=N, init_weights="zero", prefix_projection=projection
            ),
        )
        assert torch.equal(prefix(model), torch.zeros(N, 64))
    assert prefix(wrap(tiny_llama, "CAUSAL_LM")).abs().min() > 0


def test_disabled_prefix_gives_the_base_model():
    base, model = tiny_gpt2(), wrap(tiny_gpt2, "CAUSAL_LM")
    input_ids, mask = padded_batch()
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, base(input_ids=input_ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_merging_is_refused_with_a_reason():
    model = wrap(tiny_llama, "CAUSAL_LM")
    with pytest.raises(
        NotMergeableError, match=r"\['default'\] change the model's inputs rather than its weights"
    ):
        model.merge_adapter()
    with pytest.raises(NotMergeableError, match="nothing to merge; keep them as adapters"):
        model.merge_and_unload()


def test_a_model_without_a_cache_is_refused_with_a_pointer_to_prompt_tuning():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=2)
    with pytest.raises(
        ValueError,
        match=r"\(`cache`; `past_key_values` before transformers 5.24\), which "
        r"DistilBertForSequenceClassification does not take\. "
        r"Use prompt tuning \(PromptTuningConfig\)",
    ):
        get_peft_model(
            DistilBertForSequenceClassification(config),
            PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N),
        )


# transformers 5.24 renamed the models' forward argument past_key_values to cache
LLAMA_ARGUMENTS = inspect.signature(LlamaForCausalLM.forward).parameters
INSTALLED_KEYWORD = "cache" if "cache" in LLAMA_ARGUMENTS else "past_key_values"


class LlamaTakingCache(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        return super().forward(input_ids, attention_mask, **{INSTALLED_KEYWORD: cache}, **kwargs)


class LlamaTakingPastKeyValues(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        return super().forward(input_ids, attention_mask, **{INSTALLED_KEYWORD: past_key_values}, **kwargs)


@pytest.mark.parametrize("kind", [LlamaTakingCache, LlamaTakingPastKeyValues])
def test_the_prefix_goes_in_under_the_cache_argument_the_model_takes(kind):
    """A model whose forward names its cache `cache` (transformers >= 5.24) or `past_key_values` (before)
    gets the prefix under that name: the same logits as the installed Llama with the same prefix."""
    reference = wrap(tiny_llama, "CAUSAL_LM")
    renamed = kind(reference.get_base_model().config)
    renamed.load_state_dict(reference.get_base_model().state_dict())
    model = get_peft_model(renamed, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    model.model_adapters["default"].load_state_dict(reference.model_adapters["default"].state_dict())
    input_ids, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
        plain = reference.get_base_model()(input_ids=input_ids, attention_mask=mask).logits
        got = model(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the prefix matters
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gradient_checkpointing_is_refused():
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="drops in layers that use gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    model = wrap(tiny_llama, "CAUSAL_LM")
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match=r"Call model.gradient_checkpointing_disable\(\)"):
        model(input_ids=padded_batch()[0])


def test_a_second_cache_is_refused():
    model = wrap(tiny_llama, "CAUSAL_LM")
    with pytest.raises(ValueError, match="past_key_values is already set"):
        model(input_ids=padded_batch()[0], past_key_values=DynamicCache())
    model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    # two prefixes are refused when made active together, not at the first forward
    with pytest.raises(ValueError, match=r"\['default', 'other'\] each fill the attention cache .* alone"):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.set_adapter(["other", "prompt"])  # a prefix and a soft prompt fill different inputs
    assert model(input_ids=padded_batch()[0]).logits.shape[1] == padded_batch()[0].shape[1] + 2


def test_config_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got None"):
        PrefixTuningConfig(task_type="CAUSAL_LM")
    with pytest.raises(
        ValueError, match=r"init_weights='gaussian' is not accepted; use one of \[None, 'zero'\]"
    ):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="gaussian")
    with pytest.raises(ValueError, match="num_transformer_submodules=2 does not fit LlamaForCausalLM"):
        get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2))
    with pytest.raises(TypeError, match=r"'prefix_projections' \(did you mean 'prefix_projection'\?\)"):
        PrefixTuningConfig(num_virtual_tokens=2, prefix_projections=True)
