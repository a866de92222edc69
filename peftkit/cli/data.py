"""Data for the command line: the built-in movie reviews or a user's .csv / .tsv / .jsonl file, a held-out
split that never shares a text between train and test, and the tokenised features each task trains on."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import random
import re
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
    source: str = ""  # where the rows came from (the file, or the built-in name), for messages

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
        return math.isfinite(float(text))
    except ValueError:
        return False


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
    return Dataset(examples, prompt_template="Review: {text}\nSentiment:", source=BUILTIN_DATA[0])


# ---- reading a file --------------------------------------------------------------------------------
# A line ends at \r\n, \r or \n (as the csv module counts them); line numbers start at 1, and a CSV row
# that spans lines (a quoted line break) is numbered by the line it starts on.

DEFAULT_LABEL_COLUMN = "label"  # under this name the label column may be absent: the data is unlabelled
JSON_LINE = '{"text": "...", "label": "..."}'
_LINE_END = re.compile(r"\r\n|\r|\n")
_JSON_SPACE = " \t\r\n"
_DECIMAL = re.compile(r"([+-]?[0-9]+)\.([0-9]*?)0*")  # 1.50 -> 1.5, 1.0 -> 1
Row = dict[str, Any]


def _text_of(path: str) -> str:
    """The file's text, decoded as UTF-8 without the byte-order mark Excel writes first."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(
            f"--data {path} cannot be read ({reason}); make it readable, or pass another file."
        ) from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = len(_LINE_END.findall(raw[start:offset].decode("utf-8"))) + 1
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[offset]:02x} at byte offset {offset} is not UTF-8"
            + (" (the file starts with a UTF-16 byte-order mark)" if utf16 else "")
            + "; re-save the file as UTF-8 (Excel: 'CSV UTF-8')."
        ) from None


def _csv_rows(path: str, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, Row]]]:
    """The column names (the first line that is not blank, each name stripped) and every row that is not
    blank (all fields empty, as Excel writes ",,"), by line. Python's csv in its strict mode: a field
    holding the delimiter, a quote or a line break is quoted, and a quote inside it doubled."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    separator = "a comma" if delimiter == "," else "a tab"
    header: list[str] | None = None
    header_line, rows, start = 0, [], 1
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long document is one field, not an error
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(field.strip() for field in record):
                continue
            if header is None:
                header, header_line = [name.strip() for name in record], line
                named = [name for name in header if name]
                twice = sorted({name for name in named if named.count(name) > 1})
                if twice:
                    raise ValueError(
                        f"{path}, line {line}: the header names {twice} twice; name each column once."
                    )
                continue
            if len(record) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(record)} field(s), but the header (line {header_line}) has "
                    f'{len(header)}: {header}. Quote a field that holds {separator} ("a, b"), or add the '
                    "missing field."
                )
            rows.append((line, dict(zip(header, record, strict=True))))
    except csv.Error as error:
        raise ValueError(
            f"{path}, line {start}: {error} (the row starting there). A field holding {separator}, a quote "
            'or a line break is written in quotes, with each quote inside doubled: "say ""hi"", then go".'
        ) from None
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise ValueError(
            f"{path} is empty: expected a header line naming the columns (like text{delimiter}label), then "
            "one row per line."
        )
    if not rows:
        raise ValueError(
            f"{path} has a header ({', '.join(header)}) but no rows; add one row per line below it."
        )
    return header, rows


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "number")


def _jsonl_rows(path: str, text: str) -> tuple[list[str], list[tuple[int, Row]]]:
    """The keys seen (in order of first appearance) and every object with a value that is not empty, by
    line. Blank lines are skipped; every other line must be one JSON object."""
    columns: dict[str, None] = {}
    rows = []
    for line, content in enumerate(io.StringIO(text, newline=""), 1):
        if not content.strip(_JSON_SPACE):
            continue
        try:
            row = json.loads(content)
        except RecursionError:
            raise ValueError(
                f"{path}, line {line}: JSON nested too deeply; write one JSON object per line, like "
                f"{JSON_LINE}."
            ) from None
        except ValueError as error:
            reason = (
                f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else error
            )
            raise ValueError(
                f"{path}, line {line}: not valid JSON ({reason}); write one JSON object per line, like "
                f"{JSON_LINE}."
            ) from None
        if not isinstance(row, dict):
            array = (
                " (JSON Lines holds one object per line, not one list of them)"
                if isinstance(row, list)
                else ""
            )
            raise ValueError(
                f"{path}, line {line}: a JSON {_json_kind(row)}, not an object; write one JSON object per "
                f"line, like {JSON_LINE}{array}."
            )
        columns.update(dict.fromkeys(row))
        if not all(_blank(value) for value in row.values()):
            rows.append((line, row))
    if not rows:
        empty = "is empty" if not text.strip() else "has no rows"
        raise ValueError(f"{path} {empty}: expected one JSON object per line, like {JSON_LINE}.")
    return list(columns), rows


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, path: str, line: int, column: str) -> str | None:
    """A cell as text: a string as it is, a JSON number or true/false as written; None when empty."""
    if _blank(value):
        return None
    if isinstance(value, dict | list):
        raise TypeError(
            f"{path}, line {line}: column {column!r} holds a JSON {_json_kind(value)}, not text; give it a "
            "string (or a number)."
        )
    return value if isinstance(value, str) else json.dumps(value)


def _class_name(value: Any, path: str, line: int, column: str) -> str | None:
    """A label as a class name: stripped, and a number without trailing fractional zeros, so that 1, 1.0
    and "1.0" are one class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = _text(value, path, line, column)
    if name is None:
        return None
    name = name.strip()
    decimal = _DECIMAL.fullmatch(name)
    return decimal[1] + (f".{decimal[2]}" if decimal[2] else "") if decimal else name


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, Row]]]:
    """The columns of the file at `path` and its rows that are not blank, each with its line number."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"--data {path!r}: use a .csv, .tsv or .jsonl file, or one of {list(BUILTIN_DATA)}.")
    text = _text_of(path)
    if extension == ".jsonl":
        return _jsonl_rows(path, text)
    return _csv_rows(path, text, "\t" if extension == ".tsv" else ",")


def load_dataset(
    data: str,
    text_column: str = "text",
    label_column: str = DEFAULT_LABEL_COLUMN,
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> Dataset:
    """The built-in dataset named `data`, or the rows of the file at `data`.

    Instruction data is read from `prompt_column` and `response_column`; a file with "prompt" and
    "response" columns and no `text_column` is read that way without being told. Blank rows are skipped;
    every other row needs a text, and the labels (or responses) are given on every row or on none (the
    data is then unlabelled text). A label column may be absent only under its default name."""
    if data in BUILTIN_DATA:
        return movie_reviews()
    if os.path.isdir(data):
        raise ValueError(f"--data {data!r} is a folder; pass one .csv, .tsv or .jsonl file in it.")
    if not os.path.isfile(data):
        builtin = ", ".join(BUILTIN_DATA)
        raise ValueError(f"--data {data!r} is neither a file nor a built-in dataset ({builtin}).")
    present, rows = _read_rows(data)
    no_text = prompt_column is None and response_column is None and text_column not in present
    if no_text and {"prompt", "response"} <= set(present):
        prompt_column, response_column = "prompt", "response"
    wanted = {"--prompt-column": prompt_column, "--response-column": response_column}
    if prompt_column is None and response_column is None:
        wanted = {"--text-column": text_column}
        if label_column != DEFAULT_LABEL_COLUMN:
            wanted["--label-column"] = label_column
    for option, column in wanted.items():
        if column is not None and column not in present:
            raise ValueError(f"{option} {column!r} is not a column of {data}; its columns are: {present}.")
    text_from = prompt_column or text_column
    if response_column and not prompt_column:
        raise ValueError("--response-column needs --prompt-column: the text the response answers.")
    answer_from, answer = (response_column, "response") if response_column else (label_column, "label")
    examples, unanswered = [], []
    for line, row in rows:
        text = _text(row.get(text_from), data, line, text_from)
        if text is None:
            raise ValueError(
                f"{data}, line {line}: column {text_from!r} is empty; every row needs a text. Fill it in, or "
                "remove the row."
            )
        label = None if response_column else _class_name(row.get(label_column), data, line, label_column)
        response = _text(row.get(response_column), data, line, response_column) if response_column else None
        if label is None and response is None:
            unanswered.append(line)
        examples.append(Example(text, label, response))
    if unanswered and len(unanswered) < len(examples):
        more = f" (and {len(unanswered) - 1} more, lines {unanswered[1:6]})" if len(unanswered) > 1 else ""
        raise ValueError(
            f"{data}, line {unanswered[0]}: column {answer_from!r} is empty{more}, though "
            f"{len(examples) - len(unanswered)} other rows have a {answer}. Give every row a {answer}, or "
            "none (unlabelled text)."
        )
    return Dataset(examples, source=data)


def require_classes(dataset: Dataset, task: str) -> None:
    """A classifier learns to tell classes apart: refuse labelled data that holds one class only."""
    if task == "classification" and len(dataset.labels) == 1:
        raise ValueError(
            f"{dataset.source}: every row has the label {dataset.labels[0]!r}; a classifier needs at least "
            "two classes. Add rows of another class, pick another --label-column, or train a causal LM."
        )


def _text_groups(examples: list[Example], seed: int) -> list[list[Example]]:
    """The rows by text (exact duplicates dropped), the groups in an order shuffled by `seed`."""
    groups: dict[str, list[Example]] = {}
    for example in dict.fromkeys(examples):  # in order, duplicates dropped
        groups.setdefault(example.text, []).append(example)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    return [groups[k] for k in keys]


def hold_out(examples: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(rest, held): at most `count` rows held out, whole groups of one text at a time (as `split`)."""
    rest: list[Example] = []
    held: list[Example] = []
    for group in _text_groups(examples, seed):
        (held if len(held) + len(group) <= count and not rest else rest).extend(group)
    return rest, held


def split(examples: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): exact duplicates dropped, and every row with the same text (or prompt) on one side,
    so that a question asked twice is never trained on and tested with. Deterministic in `seed`."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}.")
    groups = _text_groups(examples, seed)
    held_out = max(1, math.ceil(len(groups) * test_fraction)) if len(groups) > 1 else 0
    test = [e for g in groups[:held_out] for e in g]
    train = [e for g in groups[held_out:] for e in g]
    if not train or not test:
        raise ValueError(f"{len(groups)} distinct texts are too few to hold out a test split; add rows.")
    return train, test


# ---- features ------------------------------------------------------------------------------------


def classification_features(
    examples: list[Example], tokenizer: Any, labels: list[str], max_length: int
) -> list[dict[str, Any]]:
    index = {name: i for i, name in enumerate(labels)}
    stray = next((e for e in examples if e.label not in index), None)
    if stray is not None:
        has = "no label" if stray.label is None else f"the label {stray.label!r}"
        raise ValueError(
            f"The row {stray.text[:60]!r} has {has}; a classifier of {labels} needs one of them."
        )
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


class LengthGroupedOrder(torch.utils.data.Sampler):
    """An epoch's row order in which each optimizer step's `batch` rows are of like length, so that a batch
    pads to little more than its own tokens (a random batch of short texts pads to about 1.75 times them).

    Each epoch, from the generator seeded with `seed` + epoch: shuffle the rows, cut them into windows of
    WINDOW_BATCHES batches, sort each window by length and cut it into batches, then shuffle the whole
    batches (a short last one stays last). `batch` counts every process's rows of one step, so the order,
    and the rows of each step, do not depend on how many processes share the step."""

    WINDOW_BATCHES = 50

    def __init__(self, lengths: list[int], batch: int, seed: int) -> None:
        self.lengths, self.batch, self.seed, self.epoch = lengths, batch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch * self.WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            rows = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)]
        short = batches.pop() if batches and len(batches[-1]) < self.batch else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([row for rows in [*shuffled, short] for row in rows])
