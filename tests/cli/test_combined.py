"""`peftkit train --method a+b`: several methods trained together, each with its own options and learning
rate, saved as one combination that `eval` scores and `merge` folds as far as it can."""

from __future__ import annotations

import json

import pytest
import torch
from test_commands import cli, train_args
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from peftkit import AdapterConfig, LoraConfig, PeftModel, PromptTuningConfig
from peftkit.cli import build_parser
from peftkit.cli.models import load_model
from peftkit.cli.train import build_configs, train


def configs_for(*argv: str) -> dict:
    return build_configs(build_parser().parse_args(["train", *argv]), "classification", 100)


def test_each_method_takes_its_own_options():
    configs = configs_for(
        "--method",
        "lora+bottleneck+prompt-tuning",
        "--r",
        "4",  # only LoRA has r
        "--set",
        "adapter_size=16",  # only the bottleneck has it
        "--set",
        "lora.target_modules=query,key",
        "--set",
        "bottleneck.target_modules=output.dense",
        "--num-virtual-tokens",
        "5",
    )
    assert list(configs) == ["default", "bottleneck", "prompt-tuning"]
    lora, bottleneck, prompt = configs.values()
    assert isinstance(lora, LoraConfig) and lora.r == 4 and lora.target_modules == ["query", "key"]
    assert isinstance(bottleneck, AdapterConfig) and bottleneck.adapter_size == 16
    assert bottleneck.target_modules == ["output.dense"]
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "lora+lora"], "join different methods, each once"),
        (["--method", "lora+full"], "join different methods, each once, and not full"),
        (["--method", "lora+lorra"], r"\['lorra'\] unknown; choose from"),
        (["--method", "lora+ia3", "--set", "bottleneck.adapter_size=4"], "'bottleneck' is not in --method"),
        (["--method", "lora+ia3", "--set", "adapter_size=4"], "'adapter_size' is an option of none of"),
        (["--method", "lora+ia3", "--set", "ia3.r=4"], "IA3Config has no option 'r'"),
        (["--method", "lora+prompt-tuning", "--set", "lora.x"], "write it as KEY=VALUE"),
    ],
)
def test_bad_combinations_say_what_is_wrong(argv, message):
    with pytest.raises(ValueError, match=message):
        configs_for(*argv)


class RecordOptimizer(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates = [group["initial_lr"] for group in optimizer.param_groups]  # warm-up starts at 0
        self.sizes = [len(group["params"]) for group in optimizer.param_groups]


def test_a_combination_trains_saves_evaluates_and_merges(encoder_folder, sentiment_csv, tmp_path, capsys):
    output = tmp_path / "combined"
    argv = train_args(encoder_folder, sentiment_csv, output, "--max-steps", 3, "--method", "lora+ia3")
    argv += ["--set", "ia3.target_modules=key,output.dense", "--set", "ia3.feedforward_modules=output.dense"]
    recorder = RecordOptimizer()
    metrics = train(build_parser().parse_args([str(a) for a in argv]), callbacks=[recorder])
    printed = capsys.readouterr().out
    assert "learning rate 0.001 (lora), 0.003 (ia3)" in printed
    assert recorder.rates == [1e-3, 3e-3]
    base = load_model(encoder_folder, "classification", ["neg", "pos"])
    model = PeftModel.from_composition(base, str(output))
    assert model.active_adapters == ["default", "ia3"]
    lora_tensors = sum(1 for n, _ in model.named_parameters() if ".default." in n)  # with its head copy
    ia3_tensors = sum(1 for n, _ in model.named_parameters() if ".ia3." in n and "modules_to_save" not in n)
    assert recorder.sizes == [lora_tensors, ia3_tensors]  # ia3's unused head copy is not trained
    files = ["adapter_config.json", "adapter_model.safetensors"]
    saved = [*files, *(f"ia3/{f}" for f in files), "adapter_composition.json"]
    assert metrics["saved_bytes"] == sum((output / f).stat().st_size for f in saved)

    assert cli("eval", "--adapter", output, "--json") == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == pytest.approx(metrics["after"]["accuracy"])

    merged_folder = tmp_path / "merged"
    assert cli("merge", "--adapter", output, "--output", merged_folder) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(merged_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder)
    batch = tokenizer(["good fun film", "dull weak plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_merging_a_combination_with_a_bottleneck_names_what_cannot_fold(
    encoder_folder, sentiment_csv, tmp_path, capsys
):
    output = tmp_path / "with-bottleneck"
    argv = train_args(encoder_folder, sentiment_csv, output, "--max-steps", 1, "--method", "lora+bottleneck")
    assert cli(*argv, "--set", "adapter_size=4") == 0
    capsys.readouterr()
    assert cli("merge", "--adapter", output, "--output", tmp_path / "merged") == 2
    error = capsys.readouterr().err
    assert "merge_and_unload cannot fold 'bottleneck' (Bottleneck adapters cannot be merged" in error
    assert not (tmp_path / "merged").exists()
    assert cli("merge", "--adapter", output, "--adapter", output, "--output", tmp_path / "m2") == 2
    assert "holds several adapters trained together" in capsys.readouterr().err
    assert cli("merge", "--adapter", output, "--as-adapter", "--output", tmp_path / "m3") == 2
    assert "holds several adapters trained together" in capsys.readouterr().err


def test_inspect_counts_a_combination(encoder_folder, capsys):
    argv = ["inspect", "--model", encoder_folder, "--method", "lora+ia3", "--set", "lora.r=2"]
    argv += ["--set", "ia3.target_modules=key", "--set", "ia3.feedforward_modules=[]"]
    assert cli(*argv) == 0
    out = capsys.readouterr().out
    head = 32 * 2 + 2
    lora = 2 * 2 * (32 + 32) * 2  # r=2 on query and value of 2 layers
    assert f"trainable parameters {lora + 32 * 2 + head:,} of" in out  # IA3: one 32-vector per key layer
    assert "lora ['query', 'value'], ia3 ['key']" in out
