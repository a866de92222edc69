"""P-tuning: the prompt encoder checked against its equations written out here, the model against the base
model fed [P; E[x]] directly, and the saved form (the encoder's output P) through save, load and training."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import snapshot, tiny_bert, tiny_llama, train_and_check_frozen
from safetensors.torch import load_file
from torch.nn.functional import relu

from peftkit import NotMergeableError, PeftModel, get_peft_model
from peftkit.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType

N, D, H = 4, 32, 16  # virtual tokens, the tiny models' hidden size, the encoder's hidden size


def p_tuning(task_type: str = "CAUSAL_LM", encoder: str = "MLP", **options) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        task_type=task_type,
        num_virtual_tokens=N,
        encoder_reparameterization_type=encoder,
        encoder_hidden_size=H,
        **options,
    )


def padded_batch():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 100, (3, 6), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding on the first row
    mask[2, 5:] = 0  # right padding on the last one
    return input_ids, mask


def encoder(model):
    return model.model_adapters["default"]


def prompt(model) -> torch.Tensor:
    with torch.no_grad():
        return encoder(model).prompts()


def with_prompt(base, p, input_ids, mask):
    """inputs_embeds = [P; E[x]] and the attention mask grown by N ones: the reference computation."""
    embeds = torch.cat([p.expand(input_ids.shape[0], -1, -1), base.get_input_embeddings()(input_ids)], dim=1)
    return embeds, torch.cat([torch.ones(input_ids.shape[0], p.shape[0], dtype=mask.dtype), mask], dim=1)


def reference_lstm(lstm: torch.nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """A bidirectional LSTM written out: gates (i, f, g, o) = W_ih x_t + W_hh h + b_ih + b_hh,
    c ← σ(f) c + σ(i) tanh(g), h ← σ(o) tanh(c); each layer returns [h→_t; h←_t]."""
    out, n = x, x.shape[0]
    for layer in range(lstm.num_layers):
        directions = []
        for suffix, steps in (("", range(n)), ("_reverse", range(n - 1, -1, -1))):
            w_ih, w_hh, b_ih, b_hh = (
                getattr(lstm, f"{kind}_l{layer}{suffix}")
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            b = b_ih + b_hh
            h = c = torch.zeros(lstm.hidden_size)
            states = [None] * n
            for t in steps:
                i, f, g, o = (w_ih @ out[t] + w_hh @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states[t] = h
            directions.append(torch.stack(states))
        out = torch.cat(directions, dim=-1)
    return out


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def test_mlp_encoder_is_three_linear_layers_with_relu():
    model = get_peft_model(tiny_llama(), p_tuning())
    enc = encoder(model)
    w1, w2, w3 = enc.mlp_head[0], enc.mlp_head[2], enc.mlp_head[4]
    assert (w1.in_features, w1.out_features, w2.out_features, w3.out_features) == (D, H, H, D)
    with torch.no_grad():
        e = enc.embedding.weight
        expected = linear(w3, relu(linear(w2, relu(linear(w1, e)))))
    torch.testing.assert_close(prompt(model), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(prompt(model), e)


def test_lstm_encoder_is_a_bidirectional_lstm_and_an_mlp_head():
    model = get_peft_model(tiny_llama(), p_tuning(encoder="LSTM", encoder_num_layers=3))
    enc = encoder(model)
    assert enc.lstm_head.num_layers == 3 and enc.lstm_head.hidden_size == H
    w1, w2 = enc.mlp_head[0], enc.mlp_head[2]
    assert (w1.in_features, w1.out_features, w2.out_features) == (2 * H, 2 * H, D)
    with torch.no_grad():
        expected = linear(w2, relu(linear(w1, reference_lstm(enc.lstm_head, enc.embedding.weight))))
    torch.testing.assert_close(prompt(model), expected, atol=1e-5, rtol=1e-5)


def mlp_count(n: int, d: int, h: int) -> int:
    return n * d + (d * h + h) + (h * h + h) + (h * d + d)


def lstm_count(n: int, d: int, h: int, layers: int) -> int:
    per_direction = [4 * h * (d if layer == 0 else 2 * h) + 4 * h * h + 8 * h for layer in range(layers)]
    return n * d + 2 * sum(per_direction) + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@pytest.mark.parametrize(
    ("encoder_type", "layers", "expected"),
    [
        ("MLP", 2, mlp_count(N, D, H)),
        ("LSTM", 2, lstm_count(N, D, H, 2)),
        ("LSTM", 1, lstm_count(N, D, H, 1)),
    ],
)
def test_trainable_count(encoder_type, layers, expected):
    assert expected == {(2, "MLP"): 1472, (2, "LSTM"): 15040, (1, "LSTM"): 8640}[layers, encoder_type]
    model = get_peft_model(tiny_llama(), p_tuning(encoder=encoder_type, encoder_num_layers=layers))
    assert model.get_nb_trainable_parameters()[0] == expected
    # SEQ_CLS trains the classifier (32 x 3 + 3) too
    model = get_peft_model(tiny_bert(), p_tuning("SEQ_CLS", encoder_type, encoder_num_layers=layers))
    assert model.get_nb_trainable_parameters()[0] == expected + 32 * 3 + 3


def test_encoder_hidden_size_defaults_to_token_dim():
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    assert config.encoder_reparameterization_type is PromptEncoderReparameterizationType.MLP
    assert (config.encoder_hidden_size, config.encoder_num_layers, config.encoder_dropout) == (None, 2, 0.0)
    model = get_peft_model(tiny_llama(), config)
    filled = model.peft_config["default"]
    assert (filled.encoder_hidden_size, filled.token_dim, filled.num_layers, filled.num_attention_heads) == (
        D,
        D,
        2,
        4,
    )
    assert filled.num_transformer_submodules == 1
    assert model.get_nb_trainable_parameters()[0] == mlp_count(N, D, D)


def test_causal_lm_output_is_the_base_model_on_prompted_embeddings():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), p_tuning(encoder="LSTM"))
    input_ids, mask = padded_batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        embeds, full_mask = with_prompt(base, prompt(model), input_ids, mask)
        labels = torch.cat([torch.full((3, N), -100), input_ids], dim=1)
        expected = base(inputs_embeds=embeds, attention_mask=full_mask, labels=labels)
        assert out.logits.shape == (3, N + 6, 100)
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, expected.loss)
        assert not torch.allclose(
            out.logits[:, N:], base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-3
        )


def test_seq_cls_output_is_the_base_model_on_prompted_embeddings():
    base = tiny_bert()
    model = get_peft_model(tiny_bert(), p_tuning("SEQ_CLS"))
    input_ids, mask = padded_batch()
    token_types = torch.zeros_like(input_ids)
    token_types[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
        embeds, full_mask = with_prompt(base, prompt(model), input_ids, mask)
        full_types = torch.cat([torch.zeros(3, N, dtype=token_types.dtype), token_types], dim=1)
        expected = base(
            inputs_embeds=embeds, attention_mask=full_mask, token_type_ids=full_types, labels=labels
        )
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, expected.loss)
        assert not torch.allclose(
            out.logits, base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-4
        )


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_training_lowers_loss_with_the_base_frozen(encoder_type):
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, p_tuning(encoder=encoder_type, encoder_dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    input_ids, mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids}
    train_and_check_frozen(model, frozen, inputs, lr=0.02)
    # every encoder weight learned (the gradient reaches through the encoder), not only the embeddings
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], b) for n, b in before.items())


def test_generate_returns_prompt_ids_and_the_greedy_continuation():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), p_tuning(encoder="LSTM"))
    input_ids = padded_batch()[0]
    mask = torch.ones_like(input_ids)
    new = 5
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert out.shape == (3, 6 + new)
        # reference: greedy decoding of the base model fed [P; E[x]; E[generated]] by hand
        embeds, full_mask = with_prompt(base, prompt(model), input_ids, mask)
        tokens = input_ids
        for _ in range(new):
            logits = base(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -1]
            next_token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            embeds = torch.cat([embeds, base.get_input_embeddings()(next_token)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(next_token)], dim=1)
        assert torch.equal(out, tokens)


@pytest.mark.parametrize(("builder", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS")])
@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_save_writes_the_encoder_output_and_loads_for_inference(tmp_path, builder, task, encoder_type):
    model = get_peft_model(builder(), p_tuning(task, encoder_type, encoder_dropout=0.5))
    model.train()  # the saved prompt is computed without dropout all the same
    with torch.no_grad():  # move the head too, so that it must be saved and loaded
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(tmp_path)
    model.eval()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    head = {"base_model.classifier.weight", "base_model.classifier.bias"} if task == "SEQ_CLS" else set()
    assert set(saved) == {"prompt_embeddings"} | head
    assert torch.equal(saved["prompt_embeddings"], prompt(model))

    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    enc = encoder(loaded)
    assert enc.mlp_head is None and enc.lstm_head is None  # P is used as saved
    assert torch.equal(prompt(loaded), prompt(model))
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert loaded.peft_config["default"].encoder_hidden_size == H
    input_ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids, attention_mask=mask).logits,
            model(input_ids=input_ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=1e-6,
        )


def test_loading_for_training_trains_the_saved_prompt_directly(tmp_path):
    model = get_peft_model(tiny_llama(), p_tuning(encoder="LSTM"))
    model.save_pretrained(tmp_path)
    input_ids, mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids}
    with pytest.warns(UserWarning, match=r"Adapter 'default': a P-tuning file holds the prompt its encoder"):
        resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(resumed(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)
    assert encoder(resumed).mlp_head is None
    assert resumed.get_nb_trainable_parameters()[0] == N * D
    train_and_check_frozen(resumed, snapshot(resumed.get_base_model()), inputs, lr=0.3)
    resumed.save_pretrained(tmp_path / "resumed")
    again = load_file(tmp_path / "resumed" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(again, prompt(resumed)) and not torch.allclose(again, prompt(model))


def test_merging_is_refused_with_a_reason():
    model = get_peft_model(tiny_llama(), p_tuning())
    with pytest.raises(NotMergeableError, match=r"\['default'\] change the model's inputs rather than"):
        model.merge_adapter()


def test_disabled_prompt_gives_the_base_model():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), p_tuning(encoder="LSTM"))
    input_ids, mask = padded_batch()
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, base(input_ids=input_ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_mlp_ignores_encoder_num_layers_with_a_warning():
    with pytest.warns(UserWarning, match=r"encoder_num_layers=4 is ignored by the MLP encoder, which always"):
        model = get_peft_model(tiny_llama(), p_tuning(encoder_num_layers=4))
    assert model.get_nb_trainable_parameters()[0] == mlp_count(N, D, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the LSTM uses it: no warning
        get_peft_model(tiny_llama(), p_tuning(encoder="LSTM", encoder_num_layers=4))


def test_config_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got None"):
        PromptEncoderConfig(task_type="CAUSAL_LM")
    with pytest.raises(
        ValueError, match=r"encoder_reparameterization_type='GRU' is not accepted; use one of"
    ):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_hidden_size must be a positive integer, got 0"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="encoder_num_layers must be a positive integer, got 0"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=0)
    with pytest.raises(ValueError, match=r"encoder_dropout must be in \[0, 1\), got 1.0"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.0)
    with pytest.raises(
        TypeError, match="has no option 'num_virtual_token' \\(did you mean 'num_virtual_tokens'"
    ):
        PromptEncoderConfig(num_virtual_token=2)
    with pytest.raises(
        ValueError,
        match=r"P-tuning in peftkit supports task_type \['CAUSAL_LM', 'SEQ_CLS', 'FEATURE_EXTRACTION'\]; "
        "got TOKEN_CLS",
    ):
        get_peft_model(tiny_bert(), PromptEncoderConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))
