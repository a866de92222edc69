"""`peftkit train / eval / merge / inspect` end to end on tiny models and data."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import one_torch_thread
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftkit import PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.cli.models import load_model
from peftkit.cli.train import method_choices


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def train_args(model, data, output, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--output", output, "--batch-size", 8, *extra]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, encoder_folder, sentiment_csv):
    """LoRA on the tiny encoder for the tiny sentiment data, long enough to learn it."""
    output = tmp_path_factory.mktemp("runs") / "lora"
    assert cli(*train_args(encoder_folder, sentiment_csv, output, "--max-steps", 120, "--lr", 3e-2)) == 0
    return output


def test_train_writes_the_adapter_run_and_metrics(classifier_run, encoder_folder):
    files = {p.name for p in classifier_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit_run.json", "metrics.json"} <= files
    run = json.loads((classifier_run / "peftkit_run.json").read_text())
    assert run["task"] == "classification" and run["labels"] == ["neg", "pos"]
    metrics = json.loads((classifier_run / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] >= 0.9 > metrics["before"]["accuracy"]
    assert metrics["optimizer_steps"] == 120
    reference = get_peft_model(load_model(encoder_folder, "classification", ["neg", "pos"]), _lora_config())
    assert metrics["trainable_parameters"] == reference.get_nb_trainable_parameters()[0]
    size = sum(
        (classifier_run / f).stat().st_size for f in ["adapter_config.json", "adapter_model.safetensors"]
    )
    assert metrics["saved_bytes"] == size
    # a checkpoint every tenth of the run (12 steps), the last two kept
    assert sorted(p.name for p in (classifier_run / "checkpoints").iterdir()) == [
        "checkpoint-108",
        "checkpoint-120",
    ]


def _lora_config():
    from peftkit import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16)


def test_eval_json_reproduces_the_held_out_metrics(classifier_run, capsys):
    capsys.readouterr()
    assert cli("eval", "--adapter", classifier_run, "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((classifier_run / "metrics.json").read_text())
    assert {k: printed[k] for k in metrics["after"]} == metrics["after"]
    assert printed["split"] == "test" and printed["examples"] == metrics["held_out_rows"] == 16


def test_eval_on_all_rows_of_a_file(classifier_run, sentiment_csv, capsys):
    capsys.readouterr()
    assert cli("eval", "--adapter", classifier_run, "--data", sentiment_csv, "--split", "all", "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["examples"] == 160 and 0.9 <= printed["accuracy"] <= 1  # every row, repeats too


def test_eval_of_an_adapter_made_elsewhere(classifier_run, encoder_folder, sentiment_csv, tmp_path, capsys):
    """Without peftkit_run.json (an adapter saved from Python or by peft) the task comes from
    adapter_config.json and the labels from the data; told the same split, eval gives the same metrics."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((classifier_run / name).read_bytes())
    capsys.readouterr()
    argv = ["eval", "--adapter", bare, "--model", encoder_folder, "--data", sentiment_csv, "--split", "test"]
    assert cli(*argv, "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = json.loads((classifier_run / "metrics.json").read_text())["after"]
    assert {k: printed[k] for k in after} == after
    assert cli("eval", "--adapter", bare, "--data", sentiment_csv) == 2
    assert "--model is needed" in capsys.readouterr().err


def test_the_adapter_loads_in_hugging_face_peft_with_the_same_outputs(classifier_run, encoder_folder):
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder)
    batch = tokenizer(["the film was good", "awful plot"], return_tensors="pt", padding=True)
    ours = PeftModel.from_pretrained(
        load_model(encoder_folder, "classification", ["neg", "pos"]), classifier_run
    )
    base = AutoModelForSequenceClassification.from_pretrained(encoder_folder, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, classifier_run).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)


def test_merge_writes_a_model_transformers_loads(classifier_run, encoder_folder, tmp_path, capsys):
    output = tmp_path / "merged"
    assert cli("merge", "--adapter", classifier_run, "--output", output) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    adapted = PeftModel.from_pretrained(
        load_model(encoder_folder, "classification", ["neg", "pos"]), classifier_run
    )
    tokenizer = AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["the film was good", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    assert cli("merge", "--adapter", classifier_run, "--output", output) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_inspect_shows_layers_targets_and_the_trainable_count(encoder_folder, capsys):
    assert (
        cli("inspect", "--model", encoder_folder, "--method", "lora", "--r", 4, "--target-modules", "query")
        == 0
    )
    out = capsys.readouterr().out
    assert "    0-1 (×2, each): BertLayer (8,544 parameters)\n          attention: BertAttention" in out
    assert "Dropout" not in out  # leaves without parameters are left out
    assert "query            ×2   32 → 32" in out
    assert "suggested target_modules: ['query', 'key', 'value', 'dense']" in out  # not the head
    assert "trainable parameters 578 of" in out  # 4·(32 + 32) on 2 layers, and the head's 32·2 + 2


def test_training_again_into_a_run_folder_needs_resume(classifier_run, encoder_folder, sentiment_csv, capsys):
    assert cli(*train_args(encoder_folder, sentiment_csv, classifier_run, "--max-steps", 2)) == 2
    assert "already holds a run's checkpoints. Pass --resume" in capsys.readouterr().err


def test_bad_options_say_what_to_do(encoder_folder, sentiment_csv, tmp_path, capsys):
    args = train_args(encoder_folder, sentiment_csv, tmp_path / "x", "--max-steps", 1)
    assert cli(*args, "--target-modules", "q_proj") == 2
    assert "matched nothing" in capsys.readouterr().err
    assert cli(*args, "--set", "lora_alpah=4") == 2
    assert "no option 'lora_alpah' (did you mean 'lora_alpha'?)" in capsys.readouterr().err
    assert cli(*args, "--method", "ia3", "--r", 4) == 2
    assert "--r is not an option of --method ia3" in capsys.readouterr().err
    assert cli(*args, "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli(*args, "--label-column", "stars") == 2
    assert "classification needs labels" not in capsys.readouterr().err  # a column that's absent: no labels


@pytest.mark.parametrize("method", [m for m in method_choices() if m != "lora"])
def test_every_method_trains_from_the_command_line(method, encoder_folder, sentiment_csv, tmp_path):
    output = tmp_path / method
    assert cli(*train_args(encoder_folder, sentiment_csv, output, "--max-steps", 2, "--method", method)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 and 0 <= metrics["after"]["accuracy"] <= 1
    saved = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (output / saved).is_file()


def test_causal_lm_learns_labels_as_answers(causal_folder, sentiment_csv, tmp_path, capsys):
    output = tmp_path / "causal"
    extra = ["--max-steps", 200, "--lr", 1e-2, "--target-modules", "all-linear"]
    extra += ["--prompt-template", "review: {text} sentiment:"]
    assert cli(*train_args(causal_folder, sentiment_csv, output, *extra)) == 0
    run = json.loads((output / "peftkit_run.json").read_text())
    assert run["task"] == "causal-lm"  # inferred: a causal LM given labelled data
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    assert metrics["after"]["accuracy"] >= 0.9
    capsys.readouterr()
    assert cli("eval", "--adapter", output, "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == metrics["after"]["accuracy"]
    assert printed["perplexity"] == pytest.approx(metrics["after"]["perplexity"], rel=1e-6)
    merged = tmp_path / "merged"
    assert cli("merge", "--adapter", output, "--output", merged) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(merged), torch.nn.Module)


def test_dora_trained_by_the_trainer_evaluates_the_same_after_reloading(
    causal_folder, sentiment_csv, tmp_path, capsys
):
    """The Trainer's default AdamW is fused: it moves A, B and m without bumping their version counters. The
    held-out perplexity measured right after training must be the one a fresh load of the adapter gives."""
    output = tmp_path / "dora"
    extra = ["--max-steps", 6, "--lr", 1e-2, "--target-modules", "all-linear", "--set", "use_dora=true"]
    assert cli(*train_args(causal_folder, sentiment_csv, output, *extra)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["after"]["perplexity"] != pytest.approx(metrics["before"]["perplexity"], rel=1e-2)
    capsys.readouterr()
    assert cli("eval", "--adapter", output, "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["perplexity"] == pytest.approx(metrics["after"]["perplexity"], rel=1e-6)


def test_instruction_data_is_scored_by_exact_match_and_rouge(causal_folder, instructions_jsonl, tmp_path):
    output = tmp_path / "qa"
    extra = ["--max-steps", 200, "--lr", 1e-2, "--target-modules", "all-linear"]
    assert cli(*train_args(causal_folder, instructions_jsonl, output, *extra)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["after"]) == {"perplexity", "exact_match", "rouge_l"}
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    assert metrics["after"]["exact_match"] > metrics["before"]["exact_match"]


def test_full_fine_tuning_saves_and_evaluates_the_whole_model(
    encoder_folder, sentiment_csv, tmp_path, capsys
):
    output = tmp_path / "full"
    assert cli(*train_args(encoder_folder, sentiment_csv, output, "--max-steps", 3, "--method", "full")) == 0
    saved = load_file(output / "model.safetensors")
    assert any(k.startswith("classifier") for k in saved) and len(saved) > 20
    capsys.readouterr()
    assert cli("eval", "--adapter", output, "--json") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == json.loads((output / "metrics.json").read_text())["after"]["accuracy"]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_from_the_command_line(bits, causal_folder, sentiment_csv, tmp_path, capsys):
    """--quantize: the base's linear layers in bitsandbytes, training lowers the answers' perplexity, eval
    rebuilds the quantized base (same metrics), merge writes a float32 model."""
    pytest.importorskip("bitsandbytes")
    output = tmp_path / "qlora"
    extra = ["--max-steps", 20, "--lr", 1e-2, "--quantize", bits, "--max-eval-examples", 16]
    with one_torch_thread():
        assert cli(*train_args(causal_folder, sentiment_csv, output, *extra)) == 0
        capsys.readouterr()
        assert cli("eval", "--adapter", output, "--json") == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert cli("merge", "--adapter", output, "--output", tmp_path / "merged") == 0
    run = json.loads((output / "peftkit_run.json").read_text())
    metrics = json.loads((output / "metrics.json").read_text())
    assert run["quantize"] == bits and metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    assert printed["perplexity"] == pytest.approx(metrics["after"]["perplexity"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.fixture(scope="module")
def two_causal_runs(tmp_path_factory, causal_folder, sentiment_csv):
    """Two short LoRA runs on the tiny causal LM, with other seeds and targets."""
    runs = []
    for seed, targets in [(1, "q_proj,v_proj"), (2, "q_proj,k_proj,down_proj")]:
        output = tmp_path_factory.mktemp("runs") / f"lora-{seed}"
        extra = ["--max-steps", 8, "--lr", 1e-2, "--seed", seed, "--target-modules", targets]
        assert cli(*train_args(causal_folder, sentiment_csv, output, *extra)) == 0
        runs.append(output)
    return runs


def test_merge_combines_adapters_as_add_weighted_adapter_does(
    two_causal_runs, causal_folder, tmp_path, capsys
):
    first, second = two_causal_runs
    combine = ["--adapter", first, "--adapter", second, "--weights", "0.6,-0.4", "--combination", "ties"]
    combine += ["--density", "0.5"]
    assert cli("merge", *combine, "--as-adapter", "--output", tmp_path / "adapter") == 0
    assert cli("merge", *combine, "--output", tmp_path / "model") == 0
    reference = PeftModel.from_pretrained(load_model(causal_folder, "causal-lm"), str(first))
    reference.load_adapter(str(second), "b")
    reference.add_weighted_adapter(["default", "b"], [0.6, -0.4], "m", combination_type="ties", density=0.5)
    reference.set_adapter("m")
    ids = torch.tensor([[5, 9, 3, 17, 2, 11]])
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_model(causal_folder, "causal-lm"), str(tmp_path / "adapter"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert sorted(
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    ) == [
        "down_proj",
        "k_proj",
        "q_proj",
        "v_proj",
    ]
    capsys.readouterr()
    assert cli("eval", "--adapter", tmp_path / "adapter", "--json") == 0  # the run file came along
    assert "perplexity" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "0.5"], "--weights gives 1 numbers for 2 --adapter folders"),
        (["--weights", "a,b"], "must be comma-separated numbers"),
        (["--combination", "dare_ties"], "pass density in (0, 1]"),
    ],
)
def test_merge_refuses_bad_combinations_with_a_message(two_causal_runs, tmp_path, capsys, extra, message):
    first, second = two_causal_runs
    argv = ["merge", "--adapter", first, "--adapter", second, *extra, "--output", tmp_path / "out"]
    assert cli(*argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("fresh_dynamo")
def test_train_compile_trains_as_eager_training_does(encoder_folder, sentiment_csv, tmp_path):
    """`--compile` hands the model to torch.compile through the Trainer (AOTAutograd here, as inductor
    traces it, without its slow C++ build): the same steps give the same adapter as eager training."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        output = tmp_path / name
        assert cli(*train_args(encoder_folder, sentiment_csv, output, "--max-steps", 6, *extra)) == 0
        runs[name] = load_file(output / "adapter_model.safetensors")
    assert runs["eager"].keys() == runs["compiled"].keys()
    assert any(t.abs().max() > 0 for k, t in runs["eager"].items() if "lora_B" in k)  # the steps trained B
    for key, tensor in runs["eager"].items():
        torch.testing.assert_close(runs["compiled"][key], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("order", ["length", "random"])
def test_batch_order_decides_how_much_a_training_batch_pads(order, encoder_folder, tmp_path, monkeypatch):
    """By length, each step's rows pad to nearly their own tokens; shuffled, texts of 1 to 24 words pad to
    far more. Counted in the batches the Trainer trains on."""
    import random

    from peftkit.cli import train as train_module
    from peftkit.cli.data import Collator

    rng = random.Random(0)
    rows = [f"{' '.join(['good'] * rng.randint(1, 24))} {i},{'pos' if i % 2 else 'neg'}" for i in range(96)]
    data = tmp_path / "lengths.csv"
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    counts = {"real": 0, "padded": 0}

    class CountingCollator(Collator):
        def __call__(self, features):
            batch = super().__call__(features)
            counts["real"] += int(batch["attention_mask"].sum())
            counts["padded"] += batch["attention_mask"].numel()
            return batch

    monkeypatch.setattr(train_module, "Collator", CountingCollator)
    extra = ["--max-steps", 10, "--batch-order", order, "--validation-fraction", 0, "--max-eval-examples", 4]
    assert cli(*train_args(encoder_folder, data, tmp_path / "run", *extra)) == 0
    ratio = counts["padded"] / counts["real"]
    assert ratio < 1.1 if order == "length" else ratio > 1.3
    run = json.loads((tmp_path / "run" / "peftkit_run.json").read_text())
    assert run["batch_order"] == order
