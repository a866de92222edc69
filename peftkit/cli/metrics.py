"""Held-out metrics: accuracy and macro-F1 for classes (from a classifier head, or for a causal LM by
which label it finds most likely), perplexity of the answers, exact match and ROUGE-L of generated ones."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Collator, Example, causal_lm_features, classification_features


def macro_f1(predicted: list[int], actual: list[int], classes: int) -> float:
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from both counts as 0."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and a == c for p, a in zip(predicted, actual, strict=True))
        wrong = sum((p == c) != (a == c) for p, a in zip(predicted, actual, strict=True))
        scores.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return sum(scores) / classes


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of lower-cased words, as a share of each side."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _batches(features: list[dict[str, Any]], collate: Collator, size: int, desc: str):
    """Batches of `features` taken in order of length, so that each pads to little more than its own rows;
    each comes with the positions of its rows in `features`."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in tqdm(range(0, len(order), size), desc=desc, leave=False, disable=len(order) <= size):
        rows = order[start : start + size]
        yield rows, collate([features[i] for i in rows])


def _in_place(rows: list[int], values: list[Any], into: list[Any]) -> None:
    for row, value in zip(rows, values, strict=True):
        into[row] = value


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def classifier_metrics(
    model: nn.Module, tokenizer: Any, examples: list[Example], labels: list[str], max_length: int, batch: int
) -> dict[str, float]:
    features = classification_features(examples, tokenizer, labels, max_length)
    collate, predicted, device = Collator(tokenizer.pad_token_id), [0] * len(features), _device(model)
    for rows, inputs in _batches(features, collate, batch, "evaluating"):
        inputs.pop("labels")
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        _in_place(rows, logits.argmax(-1).tolist(), predicted)
    actual = [f["labels"] for f in features]
    return {
        "accuracy": sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual),
        "f1": macro_f1(predicted, actual, len(labels)),
    }


@torch.no_grad()
def answer_log_likelihoods(
    model: nn.Module, tokenizer: Any, features: list[dict[str, Any]], batch: int, desc: str = "evaluating"
) -> tuple[list[float], list[int]]:
    """For each feature, the summed log-probability of its labelled tokens and how many there are."""
    collate, device = Collator(tokenizer.pad_token_id), _device(model)
    sums, counts = [0.0] * len(features), [0] * len(features)
    for rows, inputs in _batches(features, collate, batch, desc):
        labels = inputs.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float()
        logits = logits[:, -labels.shape[1] :]  # soft-prompt methods prepend positions for their tokens
        targets = labels[:, 1:]
        log_probs = -F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
        ).masked_fill(targets == IGNORE_INDEX, 0.0)
        _in_place(rows, log_probs.sum(1).tolist(), sums)
        _in_place(rows, (targets != IGNORE_INDEX).sum(1).tolist(), counts)
    return sums, counts


@torch.no_grad()
def mean_loss(model: nn.Module, features: list[dict[str, Any]], pad_token_id: int, batch: int) -> float:
    """The training loss over `features`, as one mean: per row for a classifier, per labelled token for a
    causal LM (what the validation slice measures at each checkpoint)."""
    collate, total, weight, device = Collator(pad_token_id), 0.0, 0, _device(model)
    was_training = model.training
    model.eval()
    try:
        for _, inputs in _batches(features, collate, batch, "validating"):
            labels = inputs["labels"]
            count = int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() > 1 else len(labels)
            total += model(**{k: v.to(device) for k, v in inputs.items()}).loss.item() * count
            weight += count
    finally:
        model.train(was_training)
    return total / max(weight, 1)


def perplexity(log_likelihoods: list[float], counts: list[int]) -> float:
    """exp of the mean negative log-likelihood per answer token."""
    return math.exp(-sum(log_likelihoods) / max(1, sum(counts)))


def label_choice_metrics(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    labels: list[str],
    template: str,
    max_length: int,
    batch: int,
) -> dict[str, float]:
    """A causal LM as a classifier: the label whose answer " <label>" it finds most likely is its choice.
    Perplexity is that of the true answers."""
    scores = []
    for label in labels:
        candidates = [Example(e.text, label) for e in examples]
        features = causal_lm_features(candidates, tokenizer, template, max_length)
        scores.append(answer_log_likelihoods(model, tokenizer, features, batch, f"scoring {label!r}"))
    predicted = [max(range(len(labels)), key=lambda c, i=i: scores[c][0][i]) for i in range(len(examples))]
    actual = [labels.index(e.label) for e in examples]
    true_ll = [scores[a][0][i] for i, a in enumerate(actual)]
    true_counts = [scores[a][1][i] for i, a in enumerate(actual)]
    return {
        "accuracy": sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual),
        "f1": macro_f1(predicted, actual, len(labels)),
        "perplexity": perplexity(true_ll, true_counts),
    }


@torch.no_grad()
def generation_metrics(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_length: int, batch: int
) -> dict[str, float]:
    """Greedy answers to each prompt, scored against the response: exact match (case and spacing aside)
    and ROUGE-L F1."""
    collate, device = Collator(tokenizer.pad_token_id, padding_side="left"), _device(model)
    longest = max(len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples)
    prompts = [{"input_ids": tokenizer(e.text)["input_ids"][-max_length:]} for e in examples]
    answers = [""] * len(prompts)
    for rows, inputs in _batches(prompts, collate, batch, "generating"):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        output = model.generate(
            **inputs, max_new_tokens=longest + 8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        _in_place(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), answers)
    pairs = [(a.strip(), e.response.strip()) for a, e in zip(answers, examples, strict=True)]
    return {
        "exact_match": sum(_normalise(a) == _normalise(r) for a, r in pairs) / len(pairs),
        "rouge_l": sum(rouge_l(a, r) for a, r in pairs) / len(pairs),
    }


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    examples: list[Example],
    labels: list[str],
    template: str,
    max_length: int,
    batch: int = 32,
) -> dict[str, float]:
    """The metrics that fit the task and the data, on `examples`."""
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            return classifier_metrics(model, tokenizer, examples, labels, max_length, batch)
        if labels:
            return label_choice_metrics(model, tokenizer, examples, labels, template, max_length, batch)
        features = causal_lm_features(examples, tokenizer, template, max_length)
        metrics = {"perplexity": perplexity(*answer_log_likelihoods(model, tokenizer, features, batch))}
        if any(e.response is not None for e in examples):
            metrics |= generation_metrics(model, tokenizer, examples, max_length, batch)
        return metrics
    finally:
        model.train(was_training)
