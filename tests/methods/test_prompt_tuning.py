"""Prompt tuning: the model run on [P; E[x]], checked against the base model fed those embeddings directly."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot, tiny_bert, tiny_llama, train_and_check_frozen

from peftkit import NotMergeableError, PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model

N = 4  # virtual tokens


def padded_batch():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 100, (3, 6), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding on the first row
    mask[2, 5:] = 0  # right padding on the last one
    return input_ids, mask


def prompts(model) -> torch.Tensor:
    return model.model_adapters["default"].prompt_embeddings.detach()


def with_prompt(base, prompt, input_ids, mask):
    """inputs_embeds = [P; E[x]] and the attention mask grown by N ones: the reference computation."""
    embeds = torch.cat(
        [prompt.expand(input_ids.shape[0], -1, -1), base.get_input_embeddings()(input_ids)], dim=1
    )
    return embeds, torch.cat([torch.ones(input_ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask], dim=1)


def test_causal_lm_output_is_the_base_model_on_prompted_embeddings():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    input_ids, mask = padded_batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask).logits
        embeds, full_mask = with_prompt(base, prompts(model), input_ids, mask)
        expected = base(inputs_embeds=embeds, attention_mask=full_mask).logits
        assert out.shape == (3, N + 6, 100)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(
            out[:, N:], base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-3
        )
        # positional input_ids work too
        torch.testing.assert_close(
            model(input_ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=1e-6
        )


def test_seq_cls_output_is_the_base_model_on_prompted_embeddings():
    base = tiny_bert()
    model = get_peft_model(tiny_bert(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    input_ids, mask = padded_batch()
    token_types = torch.zeros_like(input_ids)
    token_types[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types, labels=labels)
        embeds, full_mask = with_prompt(base, prompts(model), input_ids, mask)
        full_types = torch.cat([torch.zeros(3, N, dtype=token_types.dtype), token_types], dim=1)
        expected = base(
            inputs_embeds=embeds, attention_mask=full_mask, token_type_ids=full_types, labels=labels
        )
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, expected.loss)
        assert not torch.allclose(
            out.logits, base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-4
        )
    # the classifier head is trained with the prompt (SEQ_CLS), nothing else
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == N * 32 + (32 * 3 + 3)


def test_causal_lm_labels_get_ignored_positions_for_the_prompt():
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    input_ids, mask = padded_batch()
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    handle = model.get_base_model().register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
    handle.remove()
    assert "input_ids" not in seen and seen["inputs_embeds"].shape == (3, N + 6, 32)
    assert torch.equal(seen["labels"][:, :N], torch.full((3, N), -100))
    assert torch.equal(seen["labels"][:, N:], input_ids)
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(3, N, dtype=mask.dtype), mask], dim=1))
    # the loss is next-token cross-entropy over the real tokens (the last virtual token predicts the first)
    logits = out.logits[:, N - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), input_ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_training_lowers_loss_with_the_base_frozen():
    base = tiny_llama()
    frozen = snapshot(base)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    assert model.get_nb_trainable_parameters()[0] == N * 32
    input_ids, mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids}
    train_and_check_frozen(model, frozen, inputs, lr=0.3)


def test_generate_returns_prompt_ids_and_the_greedy_continuation():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    input_ids = padded_batch()[0]
    mask = torch.ones_like(input_ids)
    new = 5
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert out.shape == (3, 6 + new)
        assert torch.equal(out[:, :6], input_ids)
        # reference: greedy decoding of the base model fed [P; E[x]; E[generated]] by hand
        embeds, full_mask = with_prompt(base, prompts(model), input_ids, mask)
        tokens = input_ids
        for _ in range(new):
            next_token = (
                base(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -1].argmax(-1, keepdim=True)
            )
            tokens = torch.cat([tokens, next_token], dim=1)
            embeds = torch.cat([embeds, base.get_input_embeddings()(next_token)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(next_token)], dim=1)
        assert torch.equal(out, tokens)
        # positional input_ids give the same
        assert torch.equal(model.generate(input_ids, max_new_tokens=new, do_sample=False), tokens)


@pytest.mark.parametrize(("builder", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS")])
def test_save_load_round_trip(tmp_path, builder, task):
    model = get_peft_model(builder(), PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    input_ids, mask = padded_batch()
    with torch.no_grad():  # move the head too, so that it must be saved and loaded
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    assert torch.equal(prompts(loaded), prompts(model))
    config = loaded.peft_config["default"]
    assert (config.num_virtual_tokens, config.token_dim, config.num_layers) == (N, 32, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids, attention_mask=mask).logits,
            model(input_ids=input_ids, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )


def test_merging_is_refused_with_a_reason():
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with pytest.raises(
        NotMergeableError, match=r"\['default'\] change the model's inputs rather than its weights"
    ):
        model.merge_adapter()
    with pytest.raises(NotMergeableError, match="nothing to merge; keep them as adapters"):
        model.merge_and_unload()
    assert isinstance(NotMergeableError("x"), TypeError)


def test_sample_vocab_init_rows_come_from_the_vocabulary():
    torch.manual_seed(0)
    base = tiny_llama()
    weight = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(
        base,
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    assert model.peft_config["default"].prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB
    p = prompts(model)
    matches = (p[:, None, :] == weight[None, :, :]).all(-1)  # (virtual token, vocabulary row)
    assert matches.any(-1).all()
    # a RANDOM prompt is not made of vocabulary rows
    random_p = prompts(
        get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    )
    assert not (random_p[:, None, :] == weight[None, :, :]).all(-1).any()


def test_disabled_prompt_gives_the_base_model():
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    input_ids, mask = padded_batch()
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, base(input_ids=input_ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_config_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got None"):
        PromptTuningConfig(task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="prompt_tuning_init=TEXT needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match=r"prompt_tuning_init='WORDS' is not accepted"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")
