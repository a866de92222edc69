"""The held-out metrics against hand-computed values and direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.cli.data import Collator, Example, causal_lm_features
from peftkit.cli.metrics import (
    _batches,
    answer_log_likelihoods,
    label_choice_metrics,
    macro_f1,
    perplexity,
    rouge_l,
)


def test_macro_f1_by_hand():
    predicted, actual = [0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2]
    # class 0: tp 1, fp 2, fn 0 -> 2/4; class 1: tp 2, fp 0, fn 1 -> 4/5; class 2: tp 1, fp 0, fn 1 -> 2/3
    assert macro_f1(predicted, actual, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1([1, 1], [1, 1], 2) == pytest.approx(0.5)  # class 0 never appears: scores 0


def test_rouge_l_by_hand():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(2 * 5 / 12)
    assert rouge_l("Yes", "yes") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_batches_group_rows_by_length_and_name_their_positions():
    features = [{"input_ids": list(range(1, n + 1))} for n in (5, 1, 3, 2, 4)]
    batches = list(_batches(features, Collator(0), 2, "test"))
    assert [rows for rows, _ in batches] == [[1, 3], [2, 4], [0]]
    assert batches[0][1]["input_ids"].tolist() == [[1, 0], [1, 2]]  # padded to 2 tokens, not 5
    assert batches[2][1]["input_ids"].tolist() == [[1, 2, 3, 4, 5]]


def test_answer_log_likelihoods_match_a_direct_computation(causal_folder):
    tokenizer = AutoTokenizer.from_pretrained(causal_folder)
    model = AutoModelForCausalLM.from_pretrained(causal_folder).eval()
    texts = ["the film was good", "dull", "a fun and good film to see", "bad film", "good"]
    examples = [Example(t, "positive" if i % 2 else "negative") for i, t in enumerate(texts)]
    features = causal_lm_features(examples, tokenizer, "review: {text} sentiment:", 32)
    sums, counts = answer_log_likelihoods(model, tokenizer, features, batch=2)  # batches by length
    for feature, total, count in zip(features, sums, counts, strict=True):
        ids = torch.tensor([feature["input_ids"]])
        with torch.no_grad():
            log_probs = F.log_softmax(model(ids).logits[0, :-1], -1)
        answer_from = feature["labels"].index(next(t for t in feature["labels"] if t != -100))
        expected = sum(log_probs[i - 1, ids[0, i]].item() for i in range(answer_from, ids.shape[1]))
        assert total == pytest.approx(expected, abs=1e-4)
        assert count == ids.shape[1] - answer_from
    assert perplexity(sums, counts) == pytest.approx(math.exp(-sum(sums) / sum(counts)))


def test_label_choice_picks_the_likelier_answer(causal_folder):
    tokenizer = AutoTokenizer.from_pretrained(causal_folder)
    model = AutoModelForCausalLM.from_pretrained(causal_folder).eval()
    examples = [
        Example(f"the film was {w}", lab) for w, lab in [("good", "yes"), ("bad", "no"), ("fun", "no")]
    ]
    metrics = label_choice_metrics(model, tokenizer, examples, ["no", "yes"], "{text} answer:", 32, batch=2)
    scores = {}
    for label in ["no", "yes"]:
        features = causal_lm_features(
            [Example(e.text, label) for e in examples], tokenizer, "{text} answer:", 32
        )
        scores[label] = answer_log_likelihoods(model, tokenizer, features, batch=8)[0]
    chosen = ["yes" if scores["yes"][i] > scores["no"][i] else "no" for i in range(3)]
    assert metrics["accuracy"] == pytest.approx(
        sum(c == e.label for c, e in zip(chosen, examples, strict=True)) / 3
    )


@pytest.mark.parametrize("config", ["prompt-tuning", "p-tuning"])
def test_answer_log_likelihoods_of_a_soft_prompt_model_skip_its_virtual_positions(causal_folder, config):
    """A soft prompt prepends positions to the logits; the answer's log-probabilities are those of the real
    tokens, as the model computes them with the prompt in front."""
    from peftkit import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(causal_folder)
    torch.manual_seed(0)
    made = PromptTuningConfig if config == "prompt-tuning" else PromptEncoderConfig
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(causal_folder), made(num_virtual_tokens=4))
    model.eval()
    examples = [Example(t, "positive") for t in ["the film was good", "dull", "a fun and good film"]]
    features = causal_lm_features(examples, tokenizer, "review: {text} sentiment:", 32)
    sums, _ = answer_log_likelihoods(model, tokenizer, features, batch=2)
    for feature, total in zip(features, sums, strict=True):
        ids = torch.tensor([feature["input_ids"]])
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=ids).logits[0, 4:-1], -1)  # the 4 virtual positions off
        answer_from = feature["labels"].index(next(t for t in feature["labels"] if t != -100))
        expected = sum(log_probs[i - 1, ids[0, i]].item() for i in range(answer_from, ids.shape[1]))
        assert total == pytest.approx(expected, abs=1e-4)
