"""How command-line options become a method's config."""

from __future__ import annotations

import pytest

from peftkit import AdaLoraConfig, LoraConfig, PromptTuningConfig, TaskType
from peftkit.cli import build_parser
from peftkit.cli.train import build_configs, method_choices, parse_value
from peftkit.registry import METHODS


def config_for(*argv: str, task: str = "classification", total_steps: int = 100):
    return build_configs(build_parser().parse_args(["train", *argv]), task, total_steps)["default"]


def test_every_registered_method_is_offered_with_full_fine_tuning():
    names = set(method_choices())
    assert names == {t.lower().replace("_", "-") for t in METHODS} | {"full"}
    assert {"lora", "adalora", "ia3", "bitfit", "bottleneck", "prefix-tuning", "prompt-tuning"} <= names
    assert {"p-tuning", "diff-pruning"} <= names


def test_shared_flags_map_to_each_config_s_own_fields():
    config = config_for("--r", "4", "--alpha", "8", "--dropout", "0.1", "--target-modules", "q_proj, v_proj")
    assert isinstance(config, LoraConfig) and config.task_type == TaskType.SEQ_CLS
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.1)
    assert config.target_modules == ["q_proj", "v_proj"]
    ada = config_for("--method", "adalora", "--r", "16", task="causal-lm", total_steps=50)
    assert isinstance(ada, AdaLoraConfig) and ada.init_r == 16 and ada.task_type == TaskType.CAUSAL_LM
    assert (ada.total_step, ada.tinit, ada.tfinal) == (50, 5, 10)  # the schedule follows the run's length


def test_defaults_and_set_options():
    assert (config_for().r, config_for().lora_alpha) == (8, 16)
    config = config_for(
        "--set", "use_dora=true", "--set", "init_lora_weights=pissa", "--target-modules", "all-linear"
    )
    assert (
        config.use_dora is True
        and config.init_lora_weights == "pissa"
        and config.target_modules == "all-linear"
    )
    prompt = config_for("--method", "prompt-tuning")
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 20
    assert type(prompt).default_learning_rate > LoraConfig.default_learning_rate


def test_values_parse_as_json_where_they_can():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('["a", "b"]') == ["a", "b"] and parse_value("pissa") == "pissa"


def test_malformed_set_is_explained():
    with pytest.raises(ValueError, match="write it as KEY=VALUE"):
        config_for("--set", "use_dora")
