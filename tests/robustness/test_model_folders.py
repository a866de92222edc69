"""Model folders never run code or unpickle weights behind the user's back: a folder whose config names
custom code (auto_map) is refused unless `--trust-remote-code`, even with "y" waiting on standard input
(transformers' own prompt never appears), and weights stored only as pickles need `--allow-pickle`."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_modules
from probes import cli_refuses, reads
from safetensors.torch import load_file

from peftkit.cli import main

CUSTOM_CODE = """
import pathlib

from transformers import BertConfig, BertForSequenceClassification

pathlib.Path("{marker}").write_text("ran")


class CustomConfig(BertConfig):
    model_type = "bert"


class CustomClassifier(BertForSequenceClassification):
    config_class = CustomConfig
"""


@pytest.fixture
def custom_code_folder(encoder_folder, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny encoder whose config.json names custom code that leaves a marker file if run."""
    folder = tmp_path / "custom"
    shutil.copytree(encoder_folder, folder)
    marker = tmp_path / "custom-code-ran"
    (folder / "custom_config.py").write_text(CUSTOM_CODE.format(marker=marker))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom_config.CustomConfig",
        "AutoModelForSequenceClassification": "custom_config.CustomClassifier",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


COMMANDS = {
    "train": ["train", "--data", "{data}", "--output", "{out}", "--max-steps", 1],
    "inspect": ["inspect"],
    "eval-all": ["eval", "--adapter", "{folder}", "--data", "{data}", "--split", "all"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_custom_code_is_refused_without_trust_remote_code(
    command, custom_code_folder, sentiment_csv, tmp_path, monkeypatch
):
    folder, marker = custom_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))  # what a user might type at a prompt
    argv = [str(a).format(data=sentiment_csv, out=tmp_path / "run", folder=folder) for a in COMMANDS[command]]
    argv += [] if command.startswith("eval") else ["--model", str(folder)]
    cli_refuses(
        argv,
        f"{folder / 'config.json'} names custom code",
        "(AutoConfig, AutoModelForSequenceClassification in auto_map)",
        hints=("--trust-remote-code",),
    )
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_trust_remote_code_lets_the_folder_run_its_code(custom_code_folder, tmp_path, monkeypatch):
    folder, marker = custom_code_folder
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    assert reads(lambda: main(["inspect", "--model", str(folder), "--trust-remote-code"])) == 0
    assert marker.read_text() == "ran"


@pytest.fixture
def pickled_folder(encoder_folder, tmp_path) -> Path:
    """The tiny encoder with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(encoder_folder, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_need_allow_pickle(pickled_folder, sentiment_csv, tmp_path):
    output = tmp_path / "run"
    argv = ["train", "--model", pickled_folder, "--data", sentiment_csv, "--output", output, "--max-steps", 1]
    cli_refuses(
        argv,
        f"{pickled_folder} holds its weights only as pickle files (pytorch_model.bin)",
        hints=("Convert them to safetensors", "--allow-pickle"),
    )
    assert not output.exists()
    assert reads(lambda: main([str(a) for a in [*argv, "--allow-pickle"]])) == 0
    assert (output / "adapter_model.safetensors").is_file()


def test_a_model_config_that_is_not_json_is_a_clear_error(encoder_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(encoder_folder, folder)
    (folder / "config.json").write_text('{"model_type": "bert",')
    cli_refuses(["inspect", "--model", folder], f"{folder / 'config.json'} is not a JSON file")


def test_debug_shows_the_traceback_instead_of_one_line(encoder_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(encoder_folder, folder)
    (folder / "config.json").write_text("[")
    with pytest.raises(ValueError, match="is not a JSON file"):
        main(["inspect", "--model", str(folder), "--debug"])
