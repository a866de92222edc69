"""Tiny models built from transformers configs (no downloads), shared by every test; and, for the command
line, the same saved as transformers folders with a word-level tokenizer, and tiny data files."""

from __future__ import annotations

import contextlib
import json
import random
import sys
import warnings
from pathlib import Path

import hypothesis
import pytest
import torch
import torch._dynamo
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

VOCAB = 100


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--long", action="store_true", help="run the long cases: many more generated inputs and kill points"
    )


# Generated inputs (tests/robustness): a fixed, derandomized set in CI, many more with `pytest --long`.
for _profile, _examples in {"ci": 40, "long": 500}.items():
    hypothesis.settings.register_profile(
        _profile,
        max_examples=_examples,
        derandomize=True,
        database=None,  # derandomized: nothing to remember between runs, and no folder written
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )


def pytest_configure(config) -> None:
    hypothesis.settings.load_profile("long" if config.getoption("--long") else "ci")
    config.addinivalue_line("markers", "long: a long case, run only with --long")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="a long case: run it with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter) -> None:
    """The figures the robustness suite's probes counted (tests/robustness/probes.py), when it ran."""
    probes = sys.modules.get("probes")
    if probes is not None and (probes.FIGURES.inputs_tried or probes.FIGURES.kill_points_survived):
        terminalreporter.section("peftkit robustness figures")
        for line in probes.FIGURES.lines():
            terminalreporter.write_line(line)


@pytest.fixture
def fresh_dynamo():
    """The test compiles from nothing: dynamo's caches, and their recompile limit, are per code object, so
    graphs of earlier tests' models (the same `forward` functions) would count against this test's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def one_torch_thread():
    """bitsandbytes' CPU kernels use the system's OpenMP runtime and torch its own: on a small machine the
    two thread pools spin against each other and every bitsandbytes call slows down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


# ---- the command line: tiny models as folders, tiny data files -----------------------------------

POSITIVE = ["good", "great", "lovely", "superb", "fun", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "messy"]
FILLER = ["the", "film", "was", "plot", "acting", "a", "and", "really", "quite", "story"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
WORDS = SPECIALS + POSITIVE + NEGATIVE + FILLER + ["review:", "sentiment:", "answer:", "positive", "negative"]
WORDS += ["question:", "what", "is", "it", "yes", "no", "pos", "neg"]


def save_tokenizer(folder: Path, encoder: bool) -> PreTrainedTokenizerFast:
    """Whitespace words from WORDS; BERT-style [CLS] x [SEP] for the encoder, nothing added for the LM."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encoder:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]" if encoder else "<eos>",  # the LM pads with its end token, as SmolLM2 does
        eos_token="<eos>",
        cls_token="[CLS]" if encoder else None,
        sep_token="[SEP]" if encoder else None,
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def encoder_folder(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder (no head), like MiniLM: the CLI adds a classification head."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(folder)
    save_tokenizer(folder, encoder=True)
    return folder


@pytest.fixture(scope="session")
def causal_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    eos = WORDS.index("<eos>")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        pad_token_id=eos,
        eos_token_id=eos,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, encoder=False)
    return folder


def review(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 2) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """160 short reviews labelled "pos" / "neg" by which word list they draw from; some texts repeat."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    lines = ["text,label"]
    for i in range(160):
        positive = i % 2 == 0
        lines.append(f"{review(rng, positive)},{'pos' if positive else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def instructions_jsonl(tmp_path_factory) -> Path:
    """Prompt/response pairs: "question: is the <filler> <word>" answered "yes" for a positive word."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = []
    for i in range(120):
        word, filler = rng.choice(POSITIVE if i % 2 else NEGATIVE), rng.choice(FILLER)
        rows.append(
            {"prompt": f"question: is the {filler} {word} answer:", "response": "yes" if i % 2 else "no"}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Crash(TrainerCallback):
    """Raises once `at_step` optimizer steps are done: the process dies before that step's checkpoint."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError("killed")
