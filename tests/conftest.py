"""Tiny models built from transformers configs (no downloads), shared by every test."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

VOCAB = 100


def tiny_llama(seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(
    seed: int = 0, num_labels: int = 3, head: type = BertForSequenceClassification
) -> torch.nn.Module:
    """A BERT with a task head: sequence classification by default, or BertForTokenClassification,
    BertForQuestionAnswering (num_labels=2) and the like."""
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return head(config).eval()


def tiny_t5(seed: int = 0, num_layers: int = 2) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=num_layers,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (3, 7), generator=generator)


def randomize_adapters(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every trainable tensor random values so an adapter visibly changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def snapshot(model: torch.nn.Module) -> list:
    """(name, parameter, copy) for every parameter of a model, taken before wrapping it."""
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def train_and_check_frozen(peft_model: torch.nn.Module, frozen: list, inputs: dict, lr: float) -> list:
    """Ten AdamW steps over every parameter; asserts the loss fell and the snapshot is untouched."""
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=lr, weight_decay=0.1)
    peft_model.train()
    losses = []
    for _ in range(10):
        loss = peft_model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param, before in frozen:
        assert param.grad is None, name
        assert torch.equal(param, before), name
    return losses
