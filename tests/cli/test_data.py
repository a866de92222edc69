"""Reading data files, the held-out split, and the features each task trains on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from peftkit.cli.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    LengthGroupedOrder,
    causal_lm_features,
    classification_features,
    load_dataset,
    movie_reviews,
    split,
)


def test_movie_reviews_are_the_shipped_rated_snippets():
    data = movie_reviews()
    assert data.labels == ["negative", "positive"]
    assert len(data.examples) == 10568  # 10605 snippets less the 37 rated exactly 0
    counts = {name: sum(e.label == name for e in data.examples) for name in data.labels}
    assert counts == {"negative": 5326, "positive": 5242}


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_files_of_each_kind_read_alike(tmp_path, kind):
    rows = [{"review": "so good", "stars": 5}, {"review": "so bad", "stars": 1}, {"review": "ok", "stars": 5}]
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    else:
        sep = "," if kind == "csv" else "\t"
        path.write_text("\n".join([f"review{sep}stars"] + [f"{r['review']}{sep}{r['stars']}" for r in rows]))
    data = load_dataset(str(path), text_column="review", label_column="stars")
    assert data.examples == [Example("so good", "5"), Example("so bad", "1"), Example("ok", "5")]
    assert data.labels == ["1", "5"]


def test_numeric_labels_sort_as_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": i}) for i in (10, 2, 1)).replace("}{", "}\n{")
    )
    assert load_dataset(str(path)).labels == ["1", "2", "10"]


def test_a_missing_column_names_the_columns_there(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"--text-column 'text' is not a column .* \['sentence', 'label'\]"):
        load_dataset(str(path))


def test_prompt_and_response_columns_are_found_without_being_named(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    data = load_dataset(str(path))
    assert data.examples == [Example("2+2?", None, "4")] and not data.has_labels


def test_unknown_data_says_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a built-in dataset"):
        load_dataset("no-such-data")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"use a \.csv, \.tsv or \.jsonl file"):
        load_dataset(str(tmp_path / "d.parquet"))


def test_split_keeps_a_text_on_one_side_and_drops_duplicates():
    examples = [Example(f"q{i % 30}", "a" if i % 60 < 30 else "b") for i in range(120)]  # each row twice
    train, test = split(examples, 0.2, seed=3)
    assert len(train) + len(test) == 60  # the 60 distinct rows
    assert not {e.text for e in train} & {e.text for e in test}
    assert len({e.text for e in test}) == 6  # 20% of 30 texts
    assert split(examples, 0.2, seed=3) == (train, test)
    assert split(examples, 0.2, seed=4) != (train, test)


def test_causal_lm_features_mask_the_prompt_and_end_with_eos(causal_folder):
    tokenizer = AutoTokenizer.from_pretrained(causal_folder)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # padding with the end token must not hide the trained one
    (feature,) = causal_lm_features(
        [Example("the film was good", "positive")], tokenizer, "review: {text}", 32
    )
    prompt = tokenizer("review: the film was good")["input_ids"]
    answer = tokenizer(" positive", add_special_tokens=False)["input_ids"] + [eos]
    assert feature["input_ids"] == prompt + answer
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    (cut,) = causal_lm_features([Example("the film was good", "positive")], tokenizer, "review: {text}", 4)
    assert cut["input_ids"] == prompt[-2:] + answer  # the prompt loses its start; the answer stays whole

    batch = Collator(eos)([feature, cut])
    assert batch["input_ids"][1].tolist() == cut["input_ids"] + [eos] * 3
    assert batch["labels"][1, -3:].tolist() == [IGNORE_INDEX] * 3
    assert batch["labels"][1, 3].item() == eos  # the trained end token is kept
    assert batch["attention_mask"].sum(1).tolist() == [7, 4]
    left = Collator(eos, padding_side="left")([feature, cut])
    assert left["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_classification_features_map_labels_to_indices(encoder_folder):
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder)
    features = classification_features(
        [Example("good", "pos"), Example("bad", "neg")], tokenizer, ["neg", "pos"], 8
    )
    assert [f["labels"] for f in features] == [1, 0]
    batch = Collator(tokenizer.pad_token_id)(features)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].dtype == torch.long


def test_length_grouped_order_batches_like_lengths_and_reshuffles_each_epoch():
    lengths = [(7 * i) % 101 + 1 for i in range(101)]  # 101 distinct lengths, one window of batches
    order = LengthGroupedOrder(lengths, batch=8, seed=3)
    first = list(order)
    assert sorted(first) == list(range(101)) and first == list(LengthGroupedOrder(lengths, 8, 3))
    batches = [first[i : i + 8] for i in range(0, 101, 8)]
    by_length = sorted(range(101), key=lengths.__getitem__)
    chunks = [by_length[i : i + 8] for i in range(0, 96, 8)]  # the 12 whole batches of the sorted rows
    assert sorted(map(sorted, batches[:-1])) == sorted(map(sorted, chunks))
    assert batches[:-1] != chunks  # shuffled by batch
    assert sorted(batches[-1]) == sorted(by_length[96:])  # the short batch stays last
    order.set_epoch(1)
    assert list(order) != first and sorted(order) == list(range(101))


def test_length_grouped_order_sorts_only_within_windows():
    lengths = list(range(1, 1201))
    first = list(LengthGroupedOrder(lengths, batch=4, seed=0))  # windows of 200 of the shuffled rows
    window = torch.randperm(1200, generator=torch.Generator().manual_seed(0))[:200].tolist()
    expected = sorted(window, key=lengths.__getitem__)
    batches = {tuple(first[i : i + 4]) for i in range(0, 1200, 4)}
    assert all(tuple(expected[i : i + 4]) in batches for i in range(0, 200, 4))
