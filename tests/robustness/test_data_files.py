"""Data files (issue 15): every odd file `--data` may name is either read correctly or refused with a message
that names the file and the line (1-based physical lines; a CSV row spanning lines by the line it starts
on) and says what would be valid. Generated contents must agree with Python's own csv and json parse."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from probes import cli_refuses, reads, refuses
from transformers import AutoTokenizer

from peftkit.cli import data as data_module
from peftkit.cli.data import Example, classification_features, load_dataset, require_classes

BOM = codecs.BOM_UTF8


def write(folder: Path, name: str, content: str | bytes) -> str:
    """`content` written byte for byte (no newline translation) to folder/name; returns the path."""
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# ---- empty files, missing columns ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("d.csv", b"", "is empty"),
        ("d.csv", b"  \n\t\r\n", "is empty"),
        ("d.csv", b",,\r\n,,\r\n", "is empty"),  # Excel's blank rows
        ("d.csv", b"text,label\n", "but no rows"),
        ("d.tsv", b"text\tlabel\r\n\r\n", "but no rows"),
        ("d.jsonl", b"", "is empty"),
        ("d.jsonl", b" \n\r\n\t\n", "is empty"),
        ("d.jsonl", b'{}\n{"text": null}\n', "has no rows"),
    ],
)
def test_a_file_without_rows_is_refused(tmp_path, name, content, said):
    path = write(tmp_path, name, content)
    valid = "one JSON object per line" if name.endswith(".jsonl") else "one row per line"
    refuses(lambda: load_dataset(path), path, said, hints=(valid,))


def test_a_missing_column_lists_the_columns_there(tmp_path):
    csv_file = write(tmp_path, "d.csv", "sentence,stars\nhi,1\n")
    refuses(
        lambda: load_dataset(csv_file), csv_file, "--text-column 'text'", hints=("['sentence', 'stars']",)
    )
    refuses(
        lambda: load_dataset(csv_file, text_column="sentence", label_column="sentiment"),
        csv_file,
        "--label-column 'sentiment'",
        hints=("['sentence', 'stars']",),
    )
    jsonl = write(tmp_path, "d.jsonl", '{"a": 1}\n{"sentence": "hi"}\n')
    refuses(lambda: load_dataset(jsonl), jsonl, "'text'", hints=("['a', 'sentence']",))
    # Under its default name the label column may be absent: plain text, for a causal LM.
    plain = reads(lambda: load_dataset(write(tmp_path, "plain.csv", "text,id\nhello,1\nworld,2\n")))
    assert plain.examples == [Example("hello"), Example("world")] and not plain.has_labels


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    path = write(tmp_path, "d.csv", "\ntext,label,text\na,b,c\n")
    refuses(lambda: load_dataset(path), path, "line 2", "'text'", hints=("name each column once",))


# ---- labels: one class, none, some missing --------------------------------------------------------------


def test_a_single_class_is_refused_for_classification_only(tmp_path):
    path = write(tmp_path, "one.csv", "text,label\ngood,pos\nfine,pos\ngreat, pos \n")
    dataset = reads(lambda: load_dataset(path))
    assert dataset.labels == ["pos"]
    refuses(
        lambda: require_classes(dataset, "classification"), path, "'pos'", hints=("at least two classes",)
    )
    require_classes(dataset, "causal-lm")  # a causal LM learns to say the one label: fine


def test_labels_all_empty_are_unlabelled_text(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nhello,\nworld, \n")
    dataset = reads(lambda: load_dataset(path))
    assert dataset.examples == [Example("hello"), Example("world")] and not dataset.has_labels


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("d.csv", "text,label\na,pos\nb,\nc,neg\nd,  \n", "line 3"),
        ("d.tsv", "text\tlabel\na\tpos\n\nb\t\n", "line 4"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', "line 2"),
        ("d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n', "line 3"),
    ],
)
def test_a_row_without_its_label_names_the_line(tmp_path, name, content, line):
    # It used to slip through as an unlabelled row, and classification_features raised a KeyError.
    path = write(tmp_path, name, content)
    refuses(lambda: load_dataset(path), path, line, "'label'", hints=("every row a label",))


def test_a_prompt_without_its_response_names_the_line(tmp_path):
    path = write(
        tmp_path, "qa.jsonl", '{"prompt": "2+2?", "response": "4"}\n{"prompt": "3+3?", "response": ""}\n'
    )
    refuses(lambda: load_dataset(path), path, "line 2", "'response'", hints=("every row a response",))


def test_a_row_without_its_text_names_the_line(tmp_path):
    path = write(tmp_path, "d.csv", "id,text,label\n1,a,pos\n2,,neg\n")
    refuses(lambda: load_dataset(path), path, "line 3", "'text'", hints=("every row needs a text",))
    skipped = reads(
        lambda: load_dataset(write(tmp_path, "e.csv", "id,text,label\n1,a,pos\n,,\n , ,\n2,b,neg\n"))
    )
    assert skipped.examples == [Example("a", "pos"), Example("b", "neg")]  # blank rows are skipped


def test_classification_features_refuse_a_row_without_a_known_label(encoder_folder):
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder)
    rows = [Example("good", "pos"), Example("bad")]
    refuses(lambda: classification_features(rows, tokenizer, ["neg", "pos"], 8), "'bad'", "no label")
    refuses(lambda: classification_features([Example("ok", "meh")], tokenizer, ["neg", "pos"], 8), "'meh'")


# ---- encodings and line ends ---------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_name_the_line_and_offset(tmp_path):
    content = b"text,label\r\nok,pos\r\ncaf\xe9,neg\r\n"  # Latin-1
    path = write(tmp_path, "d.csv", content)
    offset = content.index(b"\xe9")
    refuses(lambda: load_dataset(path), path, "line 3", f"byte offset {offset}", "0xe9", hints=("UTF-8",))
    content = BOM + b'{"text": "a"}\n\n{"text": "\xff"}\n'  # the offset counts the byte-order mark
    after_bom = write(tmp_path, "e.jsonl", content)
    offset = content.index(b"\xff")
    refuses(lambda: load_dataset(after_bom), after_bom, "line 3", f"byte offset {offset}", hints=("re-save",))
    utf16 = write(tmp_path, "f.csv", "text,label\nhi,pos\n".encode("utf-16"))
    refuses(lambda: load_dataset(utf16), utf16, "line 1", "byte offset 0", "UTF-16", hints=("as UTF-8",))


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_an_excel_byte_order_mark_is_read(tmp_path, name):
    content = "text,label\r\nhi,pos\r\nyo,neg\r\n"
    if name.endswith(".jsonl"):
        content = '{"text": "hi", "label": "pos"}\r\n{"text": "yo", "label": "neg"}\r\n'
    dataset = reads(lambda: load_dataset(write(tmp_path, name, BOM + content.encode())))
    assert dataset.examples == [Example("hi", "pos"), Example("yo", "neg")]


def test_crlf_and_quoted_commas_and_line_breaks_are_read(tmp_path):
    content = 'text,label\r\n"hello, world",pos\r\n"two\r\nlines, ""quoted""",neg\r\nlast,pos'
    dataset = reads(lambda: load_dataset(write(tmp_path, "d.csv", content)))
    expected = [
        Example("hello, world", "pos"),
        Example('two\r\nlines, "quoted"', "neg"),
        Example("last", "pos"),
    ]
    assert dataset.examples == expected
    # Lines are physical lines: the quoted line break makes the row after it line 5.
    path = write(tmp_path, "e.csv", content.replace("last,pos", "last,pos,extra"))
    refuses(lambda: load_dataset(path), path, "line 5", "3 field", hints=("quote a field",))
    old_mac = write(tmp_path, "f.tsv", "text\tlabel\rhi\tpos\rbye\r")  # lone \r ends a line too
    refuses(lambda: load_dataset(old_mac), old_mac, "line 3", "1 field", hints=("header (line 1) has 2",))


@pytest.mark.parametrize(
    "content, line, said",
    [
        ("text,label\na,b,c\n", "line 2", "3 field(s)"),
        ("text,label\na,b\nc\n", "line 3", "1 field(s)"),
        ('text,label\na,b\n"never closed,x\ny,z\n', "line 3", "unexpected end of data"),
        ('text,label\n"a\nb"c,d\n', "line 2", "expected after"),
    ],
)
def test_a_malformed_csv_row_names_its_line(tmp_path, content, line, said):
    path = write(tmp_path, "d.csv", content)
    refuses(lambda: load_dataset(path), path, line, said, hints=("quote",))


def test_a_field_longer_than_the_csv_modules_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200,000 characters: past csv.field_size_limit()'s 131,072
    dataset = reads(lambda: load_dataset(write(tmp_path, "d.csv", f'text,label\n"{long}",a\nb,c\n')))
    assert dataset.examples == [Example(long, "a"), Example("b", "c")]
    assert csv.field_size_limit() == 131_072  # the module's limit is left as it was


# ---- JSON Lines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, said",
    [
        ('{"text": "b", "label": }', "not valid JSON"),
        ('{"text": "b"} {"text": "c"}', "not valid JSON"),
        ('[{"text": "b"}]', "a JSON list, not an object"),
        ("42", "a JSON number, not an object"),
        ('"just text"', "a JSON string, not an object"),
        ("[" * 100_000, "nested too deeply"),
        ('{"text": ' + "9" * 5000 + "}", "not valid JSON"),  # past Python's 4300-digit limit on int()
    ],
)
def test_a_line_that_is_not_a_json_object_names_its_line(tmp_path, line, said):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n\n' + line + "\n")
    refuses(lambda: load_dataset(path), path, "line 3", said, hints=("one JSON object per line",))


@pytest.mark.parametrize(
    "row, column, kind",
    [
        ({"text": {"a": 1}, "label": "x"}, "'text'", "object"),
        ({"text": ["a", "b"], "label": "x"}, "'text'", "list"),
        ({"text": "a", "label": ["x"]}, "'label'", "list"),
    ],
)
def test_a_json_value_of_the_wrong_type_names_line_and_column(tmp_path, row, column, kind):
    path = write(tmp_path, "d.jsonl", '{"text": "ok", "label": "y"}\n' + json.dumps(row) + "\n")
    refuses(lambda: load_dataset(path), path, "line 2", column, kind, hints=("string",))


def test_numbers_are_read_as_text_and_as_one_class(tmp_path):
    rows = [
        {"text": 5, "label": 1},
        {"text": 1.5, "label": 1.0},
        {"text": True, "label": "1.0"},
        {"text": "x", "label": " 1 "},
        {"text": "y", "label": 2.5},
        {"text": "z", "label": "2.50"},
        {"text": "w", "label": 10},
    ]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dataset = reads(lambda: load_dataset(path))
    assert [e.text for e in dataset.examples] == ["5", "1.5", "true", "x", "y", "z", "w"]
    assert [e.label for e in dataset.examples] == ["1", "1", "1", "1", "2.5", "2.5", "10"]
    assert dataset.labels == ["1", "2.5", "10"]
    in_csv = reads(lambda: load_dataset(write(tmp_path, "d.csv", "text,label\na,1\nb,1.0\nc,2\nd,007\n")))
    assert [e.label for e in in_csv.examples] == ["1", "1", "2", "007"]


# ---- paths ---------------------------------------------------------------------------------------------


def test_a_path_that_is_no_data_file_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "data.csv"
    folder.mkdir()
    refuses(lambda: load_dataset(str(folder)), str(folder), "is a folder", hints=(".csv, .tsv or .jsonl",))
    missing = str(tmp_path / "missing.csv")
    refuses(lambda: load_dataset(missing), missing, "neither a file", hints=("movie-reviews",))
    for name in ("d.txt", "d.json", "d"):
        path = write(tmp_path, name, "text\nhi\n")
        refuses(lambda path=path: load_dataset(path), path, hints=("use a .csv, .tsv or .jsonl file",))

    # A file the system will not let us read (what chmod 000 does to anyone but root, which runs CI here).
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    path = write(tmp_path, "locked.csv", "text,label\na,b\n")
    monkeypatch.setattr(data_module, "open", denied, raising=False)
    refuses(lambda: load_dataset(path), path, "Permission denied", hints=("make it readable",))


# ---- on the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, said",
    [
        ("text,label\na,pos\nb,neg,extra\n", ("line 3", "3 field(s)")),
        ("text,label\na,pos\nb,\n", ("line 3", "'label' is empty")),
        ("text,label\na,pos\nb,pos\n", ("'pos'", "at least two classes")),
        (b"text,label\na,pos\nb\xff,neg\n", ("line 3", "byte offset 18", "utf-8")),
        ("", ("is empty",)),
    ],
)
def test_train_refuses_a_bad_file_in_one_line(tmp_path, encoder_folder, content, said):
    path = write(tmp_path, "bad.csv", content)
    argv = [
        "train",
        "--model",
        encoder_folder,
        "--data",
        path,
        "--output",
        tmp_path / "run",
        "--max-steps",
        1,
    ]
    cli_refuses(argv, path, *said)
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()  # before training


def test_train_says_a_classifier_needs_labels(tmp_path, encoder_folder):
    path = write(tmp_path, "plain.csv", "text,label\na,\nb,\n")
    argv = ["train", "--model", encoder_folder, "--data", path, "--output", tmp_path / "run"]
    cli_refuses(argv, "no labels", hints=("--label-column",))
    cli_refuses([*argv, "--task", "classification"], "needs a label column")


# ---- generated contents --------------------------------------------------------------------------------

EXTENSIONS = {"csv": ",", "tsv": "\t"}


def _class_name(value: Any) -> str:
    """Python's own reading of a label as a class: the text stripped, a decimal's trailing zeros gone."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = value.strip() if isinstance(value, str) else json.dumps(value)
    if re.fullmatch(r"[+-]?[0-9]+\.[0-9]*", name):
        name = name.rstrip("0").rstrip(".")
    return name


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parsed(text: str, kind: str) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Columns and non-blank rows by Python's csv (strict) or json, or None where they refuse the text."""
    if kind == "jsonl":
        objects = []
        for line in re.split(r"\r\n|\r|\n", text):
            if line.strip(" \t"):
                try:
                    objects.append(json.loads(line))
                except (ValueError, RecursionError):
                    return None
        if not all(isinstance(o, dict) for o in objects):
            return None
        columns = list(dict.fromkeys(k for o in objects for k in o))
        return columns, [o for o in objects if not all(map(_blank, o.values()))]
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=EXTENSIONS[kind], strict=True))
    except csv.Error:
        return None
    records = [r for r in records if any(f.strip() for f in r)]
    if not records:
        return None
    header = [name.strip() for name in records[0]]
    named = [n for n in header if n]
    if len(set(named)) < len(named) or any(len(r) != len(header) for r in records[1:]):
        return None
    return header, [dict(zip(header, r, strict=True)) for r in records[1:]]


def expected(content: bytes, kind: str) -> list[Example] | None:
    """The rows `load_dataset` must return for `content` (columns "text" and "label"), or None where it
    must refuse: not UTF-8, not parsed, no rows, no text column, a row without text, a value that is an
    object or a list, labels on some rows only."""
    try:
        text = content.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        return None
    parsed = _parsed(text, kind)
    if parsed is None or not parsed[1] or "text" not in parsed[0]:
        return None
    examples = []
    for row in parsed[1]:
        value, label = row.get("text"), row.get("label")
        if _blank(value) or isinstance(value, dict | list) or isinstance(label, dict | list):
            return None
        text_ = value if isinstance(value, str) else json.dumps(value)
        examples.append(Example(text_, None if _blank(label) else _class_name(label)))
    if len({e.label is None for e in examples}) > 1:
        return None
    return examples


def check(folder: Path, content: bytes, kind: str) -> None:
    """`load_dataset` on `content` returns exactly the expected rows, or refuses naming the file."""
    path = write(folder, f"generated.{kind}", content)
    want = expected(content, kind)
    if want is None:
        refuses(lambda: load_dataset(path), path)
    else:
        assert reads(lambda: load_dataset(path)).examples == want


KINDS = st.sampled_from(["csv", "tsv", "jsonl"])
PIECES = st.sampled_from(
    ["", " ", "a", "pos", "neg", "1", "1.0", "2.50", ",", '"', "\t", "\n", "\r\n", "\r", "é"]
)
FIELDS = st.one_of(st.lists(PIECES, max_size=4).map("".join), st.text(max_size=6))


STARTS = {"csv": b"text,label\n", "tsv": b"text\tlabel\n", "jsonl": b'{"text": "a", "label": "b"}\n'}


@given(
    content=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode)),
    kind=KINDS,
    start=st.booleans(),
)
def test_random_bytes_are_read_as_python_reads_them_or_refused(tmp_path_factory, content, kind, start):
    """Random bytes or text, alone or after a valid first line (a header, an object)."""
    check(tmp_path_factory.getbasetemp(), (STARTS[kind] if start else b"") + content, kind)


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["csv", "tsv"]))
    header = draw(
        st.sampled_from([["text", "label"], ["label", "text", "id"], ["text"], [" text ", "label"]])
    )
    labelled = draw(st.sampled_from(["all", "none", "some"]))
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        row = {name: draw(FIELDS) for name in header}
        if "label" in row and labelled != "some":
            row["label"] = (
                draw(st.sampled_from(["pos", "neg", "1", "1.0", " 2.50 "])) if labelled == "all" else ""
            )
        fields = [row[name] for name in header]
        rows.append(fields + [draw(FIELDS)] * draw(st.sampled_from([0, 0, 0, 1])))  # now and then ragged
    out = io.StringIO()
    writer = csv.writer(
        out,
        delimiter=EXTENSIONS[kind],
        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
        lineterminator=draw(st.sampled_from(["\r\n", "\n"])),
    )
    writer.writerows([header, *rows])
    return (BOM if draw(st.booleans()) else b"") + out.getvalue().encode(), kind


@given(csv_files())
def test_generated_csv_rows_read_as_pythons_csv_reads_them(tmp_path_factory, file):
    check(tmp_path_factory.getbasetemp(), *file)


SCALARS = st.one_of(st.none(), FIELDS, st.integers(-5, 5), st.floats(allow_nan=False), st.booleans())
VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=2), SCALARS, max_size=2)
)
LINES = st.one_of(
    st.dictionaries(st.sampled_from(["text", "label", "id"]), VALUES, max_size=3).map(json.dumps),
    st.fixed_dictionaries({"text": FIELDS, "label": SCALARS}).map(
        lambda r: json.dumps(r, ensure_ascii=False)
    ),
    st.fixed_dictionaries({"text": FIELDS, "label": st.sampled_from(["a", "b", 1, 1.0])}).map(json.dumps),
    st.sampled_from(["", "  ", "[1]", "3", '"x"', "{", '{"text": "a"} x', "null"]),
)


@given(
    lines=st.lists(LINES, max_size=6),
    ending=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
def test_generated_json_lines_read_as_pythons_json_reads_them(tmp_path_factory, lines, ending, bom):
    content = (BOM if bom else b"") + ending.join(lines).encode()
    check(tmp_path_factory.getbasetemp(), content, "jsonl")
