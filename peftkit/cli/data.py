"""Data for the command line: the built-in movie reviews or a user's .csv / .tsv / .jsonl file, a held-out
split that never shares a text between train and test, and the tokenised features each task trains on."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

BUILTIN_DATA = ("movie-reviews",)
IGNORE_INDEX = -100  # label positions the loss skips: prompt tokens and padding


@dataclass(frozen=True)
class Example:
    """One row: `text` is the input (the prompt for instruction data); `label` a class name, or `response`
    the text a causal LM should produce after the prompt."""

    text: str
    label: str | None = None
    response: str | None = None


@dataclass
class Dataset:
    examples: list[Example]
    # How a labelled text becomes a prompt for a causal LM, answered by " <label>".
    prompt_template: str = "{text}\nAnswer:"

    @property
    def labels(self) -> list[str]:
        """The class names, sorted (numerically when every label is a number)."""
        names = {e.label for e in self.examples if e.label is not None}
        numeric = all(_is_number(n) for n in names)
        return sorted(names, key=lambda n: (float(n), n) if numeric else n)

    @property
    def has_labels(self) -> bool:
        return any(e.label is not None for e in self.examples)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def movie_reviews() -> Dataset:
    """Rotten Tomatoes snippets rated by 20 people each, from -4 to 4 (Hutto & Gilbert, 2014, MIT licence,
    shipped in peftkit/data/movie_reviews): "positive" if the mean rating is above 0, "negative" below,
    and the 0.0 ties left out."""
    path = resources.files("peftkit").joinpath("data/movie_reviews/movieReviewSnippets_GroundTruth.txt")
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, rating, sentence = line.split("\t", 2)
        if float(rating) != 0:
            examples.append(Example(sentence.strip(), "positive" if float(rating) > 0 else "negative"))
    return Dataset(examples, prompt_template="Review: {text}\nSentiment:")


def _read_rows(path: str) -> list[dict[str, Any]]:
    extension = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if extension in (".csv", ".tsv"):
            return list(csv.DictReader(handle, delimiter="\t" if extension == ".tsv" else ","))
        if extension == ".jsonl":
            rows = []
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}).") from None
            return rows
    raise ValueError(f"--data {path!r}: use a .csv, .tsv or .jsonl file, or one of {list(BUILTIN_DATA)}.")


def _cell(row: dict[str, Any], column: str | None) -> str | None:
    value = row.get(column) if column else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():  # 1.0 in JSON is the class "1"
        value = int(value)
    return str(value)


def load_dataset(
    data: str,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> Dataset:
    """The built-in dataset named `data`, or the rows of the file at `data`.

    Instruction data is read from `prompt_column` and `response_column`; a file with "prompt" and
    "response" columns and no `text_column` is read that way without being told."""
    if data in BUILTIN_DATA:
        return movie_reviews()
    if not os.path.isfile(data):
        builtin = ", ".join(BUILTIN_DATA)
        raise ValueError(f"--data {data!r} is neither a file nor a built-in dataset ({builtin}).")
    rows = _read_rows(data)
    if not rows:
        raise ValueError(f"--data {data!r} has no rows.")
    present = list(rows[0])
    no_text = prompt_column is None and response_column is None and text_column not in present
    if no_text and {"prompt", "response"} <= set(present):
        prompt_column, response_column = "prompt", "response"
    wanted = {"--prompt-column": prompt_column, "--response-column": response_column}
    if prompt_column is None and response_column is None:
        wanted = {"--text-column": text_column}
    for option, column in wanted.items():
        if column is not None and column not in present:
            raise ValueError(f"{option} {column!r} is not a column of {data}; its columns are: {present}.")
    text_from = prompt_column or text_column
    if response_column and not prompt_column:
        raise ValueError("--response-column needs --prompt-column: the text the response answers.")
    examples = []
    for row in rows:
        text = _cell(row, text_from)
        if text is None:
            continue
        label = None if response_column else _cell(row, label_column)
        examples.append(Example(text, label, _cell(row, response_column)))
    return Dataset(examples)


def split(examples: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): exact duplicates dropped, and every row with the same text (or prompt) on one side,
    so that a question asked twice is never trained on and tested with. Deterministic in `seed`."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}.")
    groups: dict[str, list[Example]] = {}
    for example in dict.fromkeys(examples):  # in order, duplicates dropped
        groups.setdefault(example.text, []).append(example)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held_out = max(1, math.ceil(len(keys) * test_fraction)) if len(keys) > 1 else 0
    test = [e for k in keys[:held_out] for e in groups[k]]
    train = [e for k in keys[held_out:] for e in groups[k]]
    if not train or not test:
        raise ValueError(f"{len(keys)} distinct texts are too few to hold out a test split; add rows.")
    return train, test


# ---- features ------------------------------------------------------------------------------------


def classification_features(
    examples: list[Example], tokenizer: Any, labels: list[str], max_length: int
) -> list[dict[str, Any]]:
    index = {name: i for i, name in enumerate(labels)}
    encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": ids, "labels": index[e.label]} for ids, e in zip(encoded, examples, strict=True)]


def prompt_and_answer(example: Example, template: str) -> tuple[str, str | None]:
    """What a causal LM reads and what it should write: the response, or " <label>" after the template."""
    if example.response is not None:
        return example.text, example.response
    if example.label is not None:
        return template.format(text=example.text), " " + example.label
    return example.text, None


def causal_lm_features(
    examples: list[Example], tokenizer: Any, template: str, max_length: int
) -> list[dict[str, Any]]:
    """Token ids with labels on the answer only (prompt tokens are IGNORE_INDEX), the answer ending with
    the end-of-sequence token. Plain text (no answer) is trained on every token. Long prompts lose their
    start, so that the answer always fits."""
    features = []
    for example in examples:
        prompt, answer = prompt_and_answer(example, template)
        prompt_ids = tokenizer(prompt)["input_ids"]
        if answer is None:
            ids = prompt_ids[:max_length]
            features.append({"input_ids": ids, "labels": list(ids)})
            continue
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        answer_ids = answer_ids[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
        features.append(
            {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}
        )
    return features


def _pad(row: list, value: int, gap: int, left: bool) -> list:
    return [value] * gap + row if left else row + [value] * gap


@dataclass
class Collator:
    """Pads a list of features into a batch: ids with `pad_id`, labels of padding with IGNORE_INDEX (never
    by comparing with the pad id: some models, SmolLM2 among them, pad with their end-of-turn token)."""

    pad_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        left = self.padding_side == "left"
        batch: dict[str, list] = {"input_ids": [], "attention_mask": []}
        for f in features:
            ids, gap = list(f["input_ids"]), width - len(f["input_ids"])
            batch["input_ids"].append(_pad(ids, self.pad_id, gap, left))
            batch["attention_mask"].append(_pad([1] * len(ids), 0, gap, left))
            if isinstance(f.get("labels"), list):  # a label per token
                batch.setdefault("labels", []).append(_pad(list(f["labels"]), IGNORE_INDEX, gap, left))
            elif "labels" in f:  # a class per sequence
                batch.setdefault("labels", []).append(f["labels"])
        return {k: torch.tensor(v) for k, v in batch.items()}
