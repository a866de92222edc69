"""`peftkit compare`: the arms, one end-to-end comparison on the tiny encoder (each arm and seed in its own
process), its tables and plots, failed arms, seeds and --resume; and the pure functions behind them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.cli import build_parser, main, train_parser
from peftkit.cli.compare import (
    BASE_GENERAL_FILE,
    PLOTS,
    Arm,
    _shared_figure,
    arm_from_name,
    arm_from_spec,
    choose_arms,
    collect,
    default_arm_names,
    general_text,
    human_bytes,
    markdown_table,
    pareto_front,
    quality_metric,
    shared_method_options,
    summarize,
    train_options,
)
from peftkit.cli.train import method_choices

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BROKEN = "broken=--method lora --target-modules nomatch"


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def compare_argv(model, data, output, *extra) -> list[str]:
    argv = ["compare", "--model", model, "--data", data, "--output", output, "--methods", "lora,ia3"]
    argv += ["--arm", BROKEN, "--seeds", 2, "--max-steps", 4, "--save-steps", 4, "--batch-size", 8, *extra]
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, encoder_folder, sentiment_csv):
    """LoRA, IA3 and an arm that cannot start (its target matches no layer), two seeds each: six processes.
    Returns the folder and what the command printed."""
    output = tmp_path_factory.mktemp("compare") / "tiny"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("OMP_NUM_THREADS", "1")  # the arms' processes: one core each, on a shared machine
        status = cli(*compare_argv(encoder_folder, sentiment_csv, output))
    assert status == 0, printed.getvalue()
    return output, printed.getvalue()


def results_of(output: Path) -> dict[str, dict]:
    return {r["arm"]: r for r in json.loads((output / "results.json").read_text())}


def seed_metrics(output: Path, arm: str, seed: int) -> dict:
    return json.loads((output / "arms" / arm / f"seed-{seed}" / "metrics.json").read_text())


# ---- the end-to-end comparison -------------------------------------------------------------------


def test_every_arm_has_its_row_and_the_failed_one_its_error(comparison):
    output, printed = comparison
    results = json.loads((output / "results.json").read_text())
    assert [r["arm"] for r in results] == ["lora", "ia3", "broken"]
    assert [r["method"] for r in results] == ["lora", "ia3", "lora"]
    assert [r["status"] for r in results] == ["ok", "ok", "failed"]
    for row in results[:2]:
        assert row["error"] is None and (row["seeds"], row["seeds_ok"]) == (2, 2)
        for key in (
            "metrics",
            "trainable_parameters",
            "adapter_bytes",
            "peak_memory_bytes",
            "seconds_per_step",
            "train_seconds",
        ):
            assert row[key] is not None, (row["arm"], key)
        assert 0 <= row["metrics"]["accuracy"] <= 1 and row["peak_memory_bytes"] > 2**20
        assert row["optimizer_steps"] == 4 and row["merges"] is True
    broken = results[2]
    assert broken["options"] == ["--method", "lora", "--target-modules", "nomatch"]
    assert (broken["seeds"], broken["seeds_ok"]) == (2, 0) and "metrics" not in broken
    assert "peftkit train exited with status 2 (see arms/broken/seed-0/train.log in" in broken["error"]
    assert "target_modules=['nomatch'] matched nothing in BertForSequenceClassification" in broken["error"]
    assert "1 arms failed: broken" in printed
    for seed in (0, 1):
        record = json.loads((output / "arms" / "broken" / f"seed-{seed}" / "arm.json").read_text())
        assert record["status"] == "failed" and "matched nothing" in record["error"]


def test_the_figures_are_the_runs_own(comparison):
    """Each ok arm's figures are the two seeds' metrics.json, averaged; the spread is their stdev."""
    output, _ = comparison
    results = results_of(output)
    for arm in ("lora", "ia3"):
        row, runs = results[arm], [seed_metrics(output, arm, s) for s in (0, 1)]
        assert [r["seed_folder"] for r in row["runs"]] == [f"arms/{arm}/seed-{s}" for s in (0, 1)]  # relative
        assert [r["metrics"] for r in row["runs"]] == [m["after"] for m in runs]
        for name in ("accuracy", "f1"):
            values = [m["after"][name] for m in runs]
            assert row["metrics"][name] == pytest.approx(statistics.fmean(values))
            assert row["metrics_spread"][name] == pytest.approx(statistics.stdev(values))
        assert (
            row["trainable_parameters"] == runs[0]["trainable_parameters"] == runs[1]["trainable_parameters"]
        )
        assert row["adapter_bytes"] == round(statistics.fmean(m["saved_bytes"] for m in runs))
        assert row["peak_memory_bytes"] == round(statistics.fmean(m["peak_memory_bytes"] for m in runs))
        assert row["train_seconds"] == pytest.approx(statistics.fmean(m["train_seconds"] for m in runs))
        assert row["seconds_per_step"] == pytest.approx(statistics.fmean(m["seconds_per_step"] for m in runs))
        for m in runs:  # 139 training rows: too few for a default validation slice
            assert (m["validation_rows"], m["validation"], m["best_step"]) == (0, [], 4)
    assert results["ia3"]["trainable_parameters"] < results["lora"]["trainable_parameters"]
    assert results["ia3"]["adapter_bytes"] < results["lora"]["adapter_bytes"]


def test_each_arm_and_seed_has_its_own_folder(comparison):
    output, _ = comparison
    for arm, peft_type in (("lora", "LORA"), ("ia3", "IA3")):
        for seed in (0, 1):
            folder = output / "arms" / arm / f"seed-{seed}"
            assert (folder / "adapter_model.safetensors").is_file()
            assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
            assert json.loads((folder / "peftkit_run.json").read_text())["seed"] == seed
            log = (folder / "train.log").read_text()
            assert log.startswith("$ peftkit train ") and f"--seed {seed} --output {folder}" in log
    assert not list((output / "arms" / "broken").glob("*/adapter_model.safetensors"))


def test_the_csv_and_markdown_have_a_row_per_arm(comparison):
    output, printed = comparison
    results = results_of(output)
    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arm"] for r in rows] == ["lora", "ia3", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    for r in rows[:2]:
        assert float(r["accuracy"]) == pytest.approx(results[r["arm"]]["metrics"]["accuracy"])
        assert float(r["accuracy_spread"]) == pytest.approx(results[r["arm"]]["metrics_spread"]["accuracy"])
        assert int(r["trainable_parameters"]) == results[r["arm"]]["trainable_parameters"]
    assert rows[2]["accuracy"] == "" and "matched nothing" in rows[2]["error"]
    table = (output / "results.md").read_text()
    assert table == markdown_table(list(results.values()))
    assert table in printed
    lines = table.splitlines()
    assert lines[0].startswith("| arm | accuracy | f1 | trainable |") and len(lines) == 5
    assert lines[2].startswith("| lora | ") and lines[3].startswith("| ia3 | ")
    assert lines[4].startswith("| broken | failed: peftkit train exited with status 2")
    spread = results["lora"]["metrics_spread"]["accuracy"]
    assert f"{results['lora']['metrics']['accuracy']:.4f} ± {spread:.4f}" in lines[2]


def test_the_plots_are_pngs(comparison):
    output, _ = comparison
    assert len(PLOTS) == 3
    for name in PLOTS:
        assert (output / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_resume_keeps_finished_arms_and_retries_the_failed_one(
    comparison, encoder_folder, sentiment_csv, tmp_path, capsys
):
    output, _ = comparison
    copy = tmp_path / "tiny"
    shutil.copytree(output, copy)
    before = {
        (arm, seed): (copy / "arms" / arm / f"seed-{seed}" / "metrics.json").stat().st_mtime_ns
        for arm in ("lora", "ia3")
        for seed in (0, 1)
    }
    kept = {key: seed_metrics(copy, *key) for key in before}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert cli(*compare_argv(encoder_folder, sentiment_csv, copy, "--resume")) == 0
    printed = capsys.readouterr().out
    for k, label in enumerate(["lora (seed 0)", "lora (seed 1)", "ia3 (seed 0)", "ia3 (seed 1)"], 1):
        assert f"[arm {k}/6] {label}: finished earlier, kept" in printed
    assert "[arm 5/6] broken (seed 0): elapsed" in printed and "[arm 6/6] broken (seed 1): elapsed" in printed
    assert "[arm 5/6] broken (seed 0) failed:" in printed
    for key, mtime in before.items():
        path = copy / "arms" / key[0] / f"seed-{key[1]}" / "metrics.json"
        assert path.stat().st_mtime_ns == mtime and seed_metrics(copy, *key) == kept[key], key
    log = (copy / "arms" / "broken" / "seed-0" / "train.log").read_text()
    assert log.count("$ peftkit train ") == 2  # tried again, the log appended to
    first, again = results_of(output), results_of(copy)
    for arm in ("lora", "ia3"):
        assert again[arm]["metrics"] == first[arm]["metrics"]
        assert again[arm]["metrics_spread"] == first[arm]["metrics_spread"]
    assert again["broken"]["status"] == "failed"


def test_an_existing_comparison_needs_resume(comparison, encoder_folder, sentiment_csv, capsys):
    output, _ = comparison
    written = (output / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(*compare_argv(encoder_folder, sentiment_csv, output)) == 2
    err = capsys.readouterr().err
    assert f"{output} already holds a comparison. Pass --resume to continue it, or another --output." in err
    assert (output / "results.json").stat().st_mtime_ns == written


def test_seeds_must_be_at_least_one(encoder_folder, sentiment_csv, tmp_path, capsys):
    capsys.readouterr()
    argv = ["compare", "--model", encoder_folder, "--data", sentiment_csv, "--output", tmp_path / "c"]
    assert cli(*argv, "--methods", "lora", "--seeds", 0) == 2
    assert "--seeds must be at least 1, got 0." in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_causal_lm_comparison_measures_the_base_general_perplexity_once(
    causal_folder, sentiment_csv, tmp_path
):
    """Both seeds' "before" is the one stored in BASE_GENERAL_FILE, and that is exp of the mean token
    negative log-likelihood of the base model on the general text, computed here one sentence at a time."""
    output = tmp_path / "lm"
    argv = ["compare", "--model", causal_folder, "--data", sentiment_csv, "--output", output, "--no-plots"]
    argv += ["--methods", "lora", "--seeds", 2, "--max-steps", 2, "--batch-size", 8, "--max-eval-examples", 8]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert cli(*argv) == 0
    stored = json.loads((output / BASE_GENERAL_FILE).read_text())
    runs = [json.loads((output / "arms" / "lora" / f"seed-{s}" / "arm.json").read_text()) for s in (0, 1)]
    assert [r["general_perplexity"]["before"] for r in runs] == [stored["value"]] * 2
    assert stored["key"]["max_length"] == 128 and stored["key"]["sentences"] == len(general_text())
    tokenizer = AutoTokenizer.from_pretrained(causal_folder)
    model = AutoModelForCausalLM.from_pretrained(causal_folder).eval()
    total, count = 0.0, 0
    for text in general_text():
        ids = torch.tensor([tokenizer(text)["input_ids"][:128]])
        with torch.no_grad():
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert stored["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert results_of(output)["lora"]["general_perplexity"]["before"] == stored["value"]


def test_a_shared_figure_is_measured_once_per_key(tmp_path):
    path, measured = tmp_path / "figure.json", []

    def measure() -> float:
        measured.append(len(measured) + 1.5)
        return measured[-1]

    assert _shared_figure(path, {"model": "a"}, measure) == 1.5
    assert _shared_figure(path, {"model": "a"}, measure) == 1.5  # read back, not measured again
    assert _shared_figure(path, {"model": "b"}, measure) == 2.5  # another key: measured anew
    assert measured == [1.5, 2.5] and json.loads(path.read_text()) == {"key": {"model": "b"}, "value": 2.5}


# ---- arms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("lora", ("--method", "lora")),
        ("ia3", ("--method", "ia3")),
        ("lora+bottleneck", ("--method", "lora+bottleneck")),
        ("dora", ("--method", "lora", "--set", "use_dora=true")),
        ("rslora", ("--method", "lora", "--set", "use_rslora=true")),
        ("qlora", ("--method", "lora", "--quantize", "4")),
        ("parallel-adapter", ("--method", "bottleneck", "--set", "parallel=true")),
        ("lora-r16", ("--method", "lora", "--r", "16")),
        ("full", ("--method", "full")),
    ],
)
def test_arm_from_name(name, options):
    arm = arm_from_name(name)
    assert arm == Arm(name, options)
    assert arm.method == options[1]


@pytest.mark.parametrize("name", ["nope", "lora-rx", "lora-r"])
def test_an_unknown_arm_name_lists_the_methods(name):
    with pytest.raises(ValueError, match=rf"--method {name}: \['{name}'\] unknown; choose from .*lora.*ia3"):
        arm_from_name(name)


def test_arm_from_spec():
    arm = arm_from_spec("lora-all=--method lora --target-modules all-linear --set 'init_lora_weights=pissa'")
    assert arm == Arm(
        "lora-all", ("--method", "lora", "--target-modules", "all-linear", "--set", "init_lora_weights=pissa")
    )
    assert arm.method == "lora"
    assert arm_from_spec(" x =--r 4 --method ia3").method == "ia3"


@pytest.mark.parametrize("spec", ["lora", "=--method lora", "x=--r 4", "x=--method"])
def test_a_bad_arm_spec_says_how_to_write_it(spec):
    with pytest.raises(ValueError, match=r"write it as NAME=OPTIONS with a --method among the options"):
        arm_from_spec(spec)


def test_choose_arms_in_order_each_once():
    arms = choose_arms("lora, ia3,lora", "4,8,16", ["all=--method lora --target-modules all-linear"])
    assert [a.name for a in arms] == ["lora", "ia3", "lora-r4", "lora-r16", "all"]  # rank 8 is lora
    assert arms[3].options == ("--method", "lora", "--r", "16")


def test_the_default_arms():
    names = [a.name for a in choose_arms(None, None, None)]
    assert names == default_arm_names()
    assert names[:5] == ["lora-r4", "lora", "lora-r16", "lora-r64", "dora"] and names[-1] == "full"
    assert set(method_choices()) <= set(names) and len(set(names)) == len(names)


def test_bad_arm_choices_are_refused():
    with pytest.raises(
        ValueError, match=r"--ranks '4,x': give ranks as integers, for example --ranks 4,8,16,64\."
    ):
        choose_arms(None, "4,x", None)
    with pytest.raises(ValueError, match=r"Arms named twice: \['lora'\]; give each --arm its own name\."):
        choose_arms("lora", None, ["lora=--method lora --r 4"])
    with pytest.raises(ValueError, match=r"Arm names become folder names.*\['a/b'\]"):
        choose_arms(None, None, ["a/b=--method lora"])


# ---- the options every arm gets ----------------------------------------------------------------------


def test_train_options_carry_what_differs_from_trains_defaults():
    """Every option but compare's own and the method flags (those go to the arms that take them)."""
    parser = build_parser()
    argv = ["compare", "--model", "m", "--data", "d.csv", "--methods", "lora", "--seeds", "3", "--seed", "5"]
    argv += [
        "--output",
        "o",
        "--resume",
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.002",
        "--r",
        "4",
    ]
    argv += ["--set", "use_dora=true", "--gradient-checkpointing", "--validation-fraction", "0.2"]
    args = parser.parse_args(argv)
    options = train_options(args, train_parser(parser))
    assert options == [
        "--model", "m", "--data", "d.csv", "--max-steps", "4", "--lr", "0.002",
        "--validation-fraction", "0.2", "--batch-size", "8", "--gradient-checkpointing",
    ]  # fmt: skip
    again = parser.parse_args(["train", *options, "--method", "ia3", "--output", "x"])
    for key in (
        "model",
        "data",
        "max_steps",
        "lr",
        "validation_fraction",
        "batch_size",
        "epochs",
        "patience",
    ):
        assert getattr(again, key) == getattr(args, key), key
    assert again.gradient_checkpointing and (again.seed, again.resume) == (0, False)  # compare's own


def test_method_options_go_to_the_arms_that_take_them():
    parser = build_parser()
    args = parser.parse_args(
        [
            "compare",
            "--r",
            "16",
            "--alpha",
            "32",
            "--set",
            "use_dora=true",
            "--set",
            "bottleneck.adapter_size=4",
        ]
        + ["--set", "lora.dropout=0.1", "--set", "no_such_option=1"]
    )
    lora = ["--r", "16", "--alpha", "32.0", "--set", "use_dora=true", "--set", "lora.dropout=0.1"]
    assert shared_method_options(arm_from_name("lora"), args) == lora
    assert shared_method_options(arm_from_name("ia3"), args) == []
    assert shared_method_options(arm_from_name("full"), args) == []
    assert shared_method_options(arm_from_name("lora+bottleneck"), args) == [
        *lora[:6],
        "--set",
        "bottleneck.adapter_size=4",
        *lora[6:],
    ]
    # an arm's own options come after the shared ones, so they win: lora-r4 trains at rank 4
    arm = arm_from_name("lora-r4")
    train = parser.parse_args(["train", *shared_method_options(arm, args), *arm.options])
    assert (train.r, train.alpha, train.method) == (4, 32.0, "lora")


def test_train_options_of_a_default_compare_are_none():
    parser = build_parser()
    assert train_options(parser.parse_args(["compare"]), train_parser(parser)) == []


# ---- tables, the Pareto front, summaries -------------------------------------------------------------


def row(arm: str, accuracy: float, spread: float, seeds_ok: int = 2, **figures) -> dict:
    return {
        "arm": arm,
        "method": "lora",
        "status": "ok",
        "error": None,
        "seeds": 2,
        "seeds_ok": seeds_ok,
        "metrics": {"accuracy": accuracy, "f1": accuracy - 0.1},
        "metrics_spread": {"accuracy": spread, "f1": 0.02},
        "trainable_parameters": 1234,
        "trainable_share": 0.01234,
        "adapter_bytes": 2048,
        "peak_memory_bytes": 3 * 2**30,
        "seconds_per_step": 0.5,
        "train_seconds": 125,
        "merges": True,
        "unmerged_over_merged": 1.234,
    } | figures


def test_markdown_table():
    failed = {
        "arm": "bad",
        "method": "lora",
        "status": "failed",
        "error": "no | way\nsecond line",
        "seeds": 2,
    }
    failed["seeds_ok"] = 0
    partial = row("half", 0.5, 0.0, seeds_ok=1, status="failed", error="seed 1 failed", merges=None)
    partial |= {"unmerged_over_merged": None, "seconds_per_step": None, "adapter_bytes": 1023}
    assert markdown_table([row("lora", 0.9, 0.01), partial, failed]).splitlines() == [
        "| arm | accuracy | f1 | trainable | share | adapter | peak memory | s/step | training | merges | "
        "unmerged ÷ merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| lora | 0.9000 ± 0.0100 | 0.8000 ± 0.0200 | 1,234 | 1.234% | 2.0 KiB | 3.0 GiB | 0.500 | 2m05s "
        "| yes | 1.23 |",
        "| half (1/2 seeds) | 0.5000 | 0.4000 | 1,234 | 1.234% | 1023 B | 3.0 GiB |  | 2m05s | — | — |",
        "| bad | failed: no \\| way |" + " |" * 9,
    ]


def test_quality_metric():
    assert quality_metric([{"metrics": {"f1": 0.5, "accuracy": 0.6}}]) == ("accuracy", True)
    assert quality_metric([{"status": "failed"}, {"metrics": {"perplexity": 3.0}}]) == ("perplexity", False)
    assert quality_metric([{"metrics": {"rouge": 0.3}}]) == ("rouge", True)
    assert quality_metric([{"status": "failed"}]) is None


def test_pareto_front():
    points = [(1.0, 0.8), (2.0, 0.9), (3.0, 0.85), (2.0, 0.9), (0.5, 0.7), (4.0, 0.95)]
    assert pareto_front(points, higher_is_better=True) == [0, 1, 3, 4, 5]  # (3, 0.85) is beaten by (2, 0.9)
    assert pareto_front([(1.0, 10.0), (2.0, 5.0), (3.0, 7.0), (1.0, 12.0)], higher_is_better=False) == [0, 1]


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 2**10, 1.5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "1.5 GiB",
    ]


def test_summarize_an_arm_with_one_seed_failed(tmp_path):
    """The row is failed with that seed's error, and its figures come from the seed that finished."""
    trained = {
        "after": {"accuracy": 0.75},
        "before": {"accuracy": 0.5},
        "trainable_parameters": 10,
        "total_parameters": 1000,
        "saved_bytes": 4096,
        "peak_memory_bytes": None,  # from the process instead
        "seconds_per_step": 0.2,
        "train_seconds": 8.0,
        "optimizer_steps": 40,
    }
    ok = {
        "status": "ok",
        "folder": "/somewhere/comparison/arms/a/seed-0",
        "train": trained,
        "merges": False,
        "process_peak_memory_bytes": 7,
    }
    missing = collect(tmp_path / "never-run")
    assert (missing["status"], missing["error"]) == ("failed", "not run")
    summary = summarize(Arm("a", ("--method", "ia3")), [ok, missing])
    assert (summary["status"], summary["error"], summary["seeds"], summary["seeds_ok"]) == (
        "failed",
        "not run",
        2,
        1,
    )
    assert summary["method"] == "ia3" and summary["metrics"] == {"accuracy": 0.75}
    assert summary["metrics_spread"] == {"accuracy": 0.0} and summary["trainable_share"] == 0.01
    assert (summary["peak_memory_bytes"], summary["adapter_bytes"], summary["merges"]) == (7, 4096, False)
    assert summary["unmerged_over_merged"] is None
    assert summary["runs"] == [{"seed_folder": "arms/a/seed-0", "metrics": {"accuracy": 0.75}}]
