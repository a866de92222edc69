"""How long `peftkit train` trains when the user does not say (peftkit/cli/schedule.py), and the validation
slice that picks the checkpoint it keeps and stops it early (AdapterTrainer in peftkit/cli/train.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import build_parser, main, train_parser
from peftkit.cli.schedule import (
    MIN_ROWS_SEEN,
    Schedule,
    default_epochs,
    plan,
    validation_rows,
)
from peftkit.cli.train import train


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def train_argv(model, data, output, *extra) -> list[str]:
    argv = ["train", "--model", model, "--data", data, "--output", output, "--batch-size", 8, *extra]
    return [str(a) for a in argv]


# ---- the length: epochs from the number of rows ------------------------------------------------------


@pytest.mark.parametrize(
    "rows, epochs",
    [
        (0, 10),  # no rows: the most epochs, not a division by zero
        (1, 10),
        (100, 10),  # 10,000 / 100 = 100, capped at 10
        (1_000, 10),  # exactly 10
        (1_234, 8.1),  # 8.1037... to two decimals
        (2_500, 4.0),
        (3_000, 3.33),
        (5_000, 2.0),
        (9_009, 1.11),  # the built-in reviews' training rows: 10,000 rows seen
        (10_000, 1.0),  # exactly the floor
        (40_000, 1),  # 0.25, raised to one epoch
    ],
)
def test_default_epochs_see_ten_thousand_rows_within_one_to_ten_epochs(rows, epochs):
    assert default_epochs(rows) == epochs


def test_the_epochs_help_names_the_rows_the_default_sees():
    """`peftkit train --help` says how many rows the default length sees: the figure schedule.py uses."""
    help_text = next(a.help for a in train_parser(build_parser())._actions if "--epochs" in a.option_strings)
    assert f"at least {MIN_ROWS_SEEN:,} rows seen" in help_text, help_text


# ---- the validation slice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, fraction, cap, held",
    [
        (490, None, 500, 0),  # 10% is 49 rows, under the 50 a default slice needs
        (491, None, 500, 50),  # ceil(49.1)
        (1_000, None, 500, 100),
        (9_000, None, 500, 500),  # 900, capped
        (9_000, None, 200, 200),  # --max-validation-examples 200
        (139, 0.3, 500, 42),  # given: no minimum, ceil(41.7)
        (20, 0.5, 500, 10),
        (20, 0.5, 3, 3),
        (10_000, 0.0, 500, 0),  # 0 turns it off
        (1, 0.5, 500, 0),  # the slice would take every row: none
        (2, 0.99, 500, 0),
    ],
)
def test_validation_rows(rows, fraction, cap, held):
    assert validation_rows(rows, fraction, cap) == held


@pytest.mark.parametrize("rows, fraction, held", [(100, 0.07, 7), (25, 0.28, 7), (100, 0.29, 29)])
def test_a_given_fraction_of_rows_is_not_rounded_up_past_a_whole_row(rows, fraction, held):
    """7% of 100 rows is 7 rows; `rows * fraction` in floating point is 7.000000000000001."""
    assert validation_rows(rows, fraction, 500) == held


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_a_validation_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(
        ValueError, match=rf"--validation-fraction must be at least 0 and below 1, got {fraction}\."
    ):
        validation_rows(100, fraction, 500)


# ---- plan: the schedule ------------------------------------------------------------------------------


def test_plan_from_the_rows_alone():
    """2,000 rows, 16 a step, 125 steps an epoch: 5 epochs (10,000 rows), 625 steps, a checkpoint and
    validation every ceil(625 / 10) = 63 steps, warm-up ceil(0.06 * 625) = 38, patience 3."""
    schedule = plan(2_000, 16, 125, None, None, None, 0.06, 200, None)
    assert schedule == Schedule(
        rows=2_000,
        rows_per_step=16,
        epochs=5.0,
        total_steps=625,
        warmup_steps=38,
        eval_every=63,
        validation_rows=200,
        patience=3,
        length_from="at least 10,000 rows seen",
    )
    assert Schedule(**schedule.as_dict()) == schedule


def test_plan_with_the_users_epochs_steps_and_checkpoints():
    by_epochs = plan(2_000, 16, 125, 1.5, None, 7, 0.1, 200, 5)
    assert (by_epochs.total_steps, by_epochs.epochs, by_epochs.length_from) == (188, 1.5, "--epochs")
    assert (by_epochs.eval_every, by_epochs.warmup_steps, by_epochs.patience) == (7, 19, 5)  # ceil(18.8)
    by_steps = plan(2_000, 16, 125, 4.0, 50, None, 0.06, 200, 0)  # --max-steps wins over --epochs
    assert (by_steps.total_steps, by_steps.epochs, by_steps.length_from) == (50, 0.4, "--max-steps")
    assert (by_steps.eval_every, by_steps.warmup_steps, by_steps.patience) == (5, 3, 0)


def test_plan_for_a_tiny_set_and_no_validation():
    """8 rows of one step an epoch: 10 epochs, 10 steps, a checkpoint every step; without a validation
    slice there is nothing to be patient about, whatever --patience says."""
    schedule = plan(8, 8, 1, None, None, None, 0.06, 0, 4)
    assert (schedule.epochs, schedule.total_steps, schedule.eval_every, schedule.warmup_steps) == (
        10,
        10,
        1,
        1,
    )
    assert schedule.patience == 0
    assert plan(8, 8, 1, 0.0, None, None, 0.06, 0, None).total_steps == 1  # never zero steps


def test_describe_says_the_length_and_what_is_kept():
    with_slice = plan(2_000, 16, 125, None, None, None, 0.06, 200, None)
    assert with_slice.describe() == [
        "625 optimizer steps of 16 rows (5 epochs of 2000 rows, at least 10,000 rows seen), warm-up 38 steps",
        "validation: 200 rows held out of training, loss every 63 steps; the best checkpoint is kept, stops "
        "after 3 without improvement",
    ]
    never_stops = plan(2_000, 16, 125, None, 100, 10, 0.06, 200, 0)
    assert never_stops.describe()[1] == (
        "validation: 200 rows held out of training, loss every 10 steps; the best checkpoint is kept"
    )
    without = plan(8, 8, 1, None, None, 5, 0.06, 0, None)
    assert (
        without.describe()[1]
        == "no validation slice (too few rows): the last step is kept, checkpoints every 5 steps"
    )


# ---- train: the schedule and the validation slice in a run -----------------------------------------


def test_a_tiny_set_trains_the_default_length_without_a_validation_slice(
    encoder_folder, sentiment_csv, tmp_path, capsys
):
    """8 training rows and no length given: 10 epochs of one 8-row step; no slice (default options), so
    the last step is kept and nothing stops early."""
    output = tmp_path / "run"
    capsys.readouterr()
    assert (
        cli(*train_argv(encoder_folder, sentiment_csv, output, "--max-train-examples", 8, "--save-steps", 5))
        == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["schedule"] == {
        "rows": 8,
        "rows_per_step": 8,
        "epochs": 10,
        "total_steps": 10,
        "warmup_steps": 1,
        "eval_every": 5,
        "validation_rows": 0,
        "patience": 0,
        "length_from": f"at least {MIN_ROWS_SEEN:,} rows seen",
    }
    assert metrics["optimizer_steps"] == metrics["best_step"] == 10
    assert (metrics["validation_rows"], metrics["validation"], metrics["stopped_early"]) == (0, [], False)
    assert metrics["train_rows"] == 8 and metrics["held_out_rows"] == 16
    assert metrics["train_seconds"] > 0 and metrics["peak_memory_bytes"] > 2**20
    assert metrics["seconds_per_step"] == pytest.approx(metrics["train_seconds"] / 10, abs=1e-3)
    assert "no validation slice (too few rows): the last step is kept, checkpoints every 5 steps" in printed
    assert "best validation loss" not in printed
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    tally = json.loads((output / "checkpoints" / "checkpoint-10" / "peftkit_trainer.json").read_text())
    assert (tally["validation"], tally["stopped_early"]) == ([], False)


EARLY_STOPPING = ["--validation-fraction", 0.3, "--max-steps", 12, "--save-steps", 2, "--patience", 2]
EARLY_STOPPING += ["--batch-order", "random"]


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory, encoder_folder, sentiment_csv):
    """A validation slice of 30% on the tiny data, a loss every 2 steps, stopping after 2 passes without
    improvement, every row shuffled (the order this trajectory was read from): at LoRA's default rate the
    validation loss rises from the first pass on, so the run stops at step 6 of 12 and keeps step 2."""
    output = tmp_path_factory.mktemp("runs") / "early"
    extra = EARLY_STOPPING
    metrics = train(build_parser().parse_args(train_argv(encoder_folder, sentiment_csv, output, *extra)))
    return output, metrics


def expected_stop(losses: list[tuple[int, float]], patience: int) -> int | None:
    """The step at which `patience` passes in a row have not beaten the best so far (by hand)."""
    best_loss, since = math.inf, 0
    for step, loss in losses:
        best_loss, since = (loss, 0) if loss < best_loss else (best_loss, since + 1)
        if since >= patience:
            return step
    return None


def test_validation_picks_the_lowest_loss_and_stops_early(early_stopped):
    output, returned = early_stopped
    metrics = json.loads((output / "metrics.json").read_text())
    assert returned == metrics
    steps = [v["step"] for v in metrics["validation"]]
    losses = [(v["step"], v["loss"]) for v in metrics["validation"]]
    assert steps == [2, 4, 6]  # every --save-steps, until it stopped
    assert metrics["best_step"] == min(losses, key=lambda s: (s[1], s[0]))[0] == 2
    assert metrics["stopped_early"] is True
    assert metrics["optimizer_steps"] == expected_stop(losses, 2) == 6 < 12
    # 139 training rows after the held-out split; ceil(0.3 * 139) = 42 of them validate
    assert (metrics["train_rows"], metrics["validation_rows"]) == (97, 42)
    assert metrics["schedule"]["validation_rows"] == 42 and metrics["schedule"]["rows"] == 97
    assert metrics["schedule"]["patience"] == 2 and metrics["schedule"]["total_steps"] == 12


def test_each_checkpoint_keeps_the_validation_tally(early_stopped):
    output, metrics = early_stopped
    for step in (2, 4, 6):
        tally = json.loads(
            (output / "checkpoints" / f"checkpoint-{step}" / "peftkit_trainer.json").read_text()
        )
        assert tally["validation"] == [v for v in metrics["validation"] if v["step"] <= step]
        assert tally["stopped_early"] is (step == 6)


def test_rotation_keeps_the_best_checkpoint(early_stopped):
    """save_total_limit is 2: the newest two, and the best one though it is older."""
    output, _ = early_stopped
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_the_saved_adapter_is_the_best_checkpoints(early_stopped):
    output, _ = early_stopped
    saved = load_file(output / "adapter_model.safetensors")
    checkpoints = output / "checkpoints"
    best = load_file(checkpoints / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(checkpoints / "checkpoint-6" / "adapter_model.safetensors")
    in_training = load_file(checkpoints / "checkpoint-2" / "training_state.safetensors")
    state = {  # the tensors by their names in training, as saved in peft's layout
        k.replace("adapters.default.", "").replace("modules_to_save.default.", ""): v
        for k, v in in_training.items()
    }
    assert saved.keys() == best.keys() == state.keys() and len(saved) == 10  # LoRA A, B x 4; the head
    for key in saved:
        assert torch.equal(saved[key], best[key]), key
        assert torch.equal(saved[key], state[key]), key
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # the last step's weights were replaced


def test_resuming_a_run_that_stopped_early_trains_nothing(
    early_stopped, tmp_path, encoder_folder, sentiment_csv
):
    """The stopped run is finished: --resume keeps its best adapter and metrics, and trains no step."""
    import shutil

    output, first = early_stopped
    copy = tmp_path / "early"
    shutil.copytree(output, copy)
    extra = [*EARLY_STOPPING, "--resume"]
    again = train(build_parser().parse_args(train_argv(encoder_folder, sentiment_csv, copy, *extra)))
    for key in (
        "before",
        "after",
        "validation",
        "best_step",
        "stopped_early",
        "optimizer_steps",
        "train_loss",
    ):
        assert again[key] == first[key], key
    assert again["train_seconds"] == 0 and again["seconds_per_step"] is None
    saved, resumed = (load_file(f / "adapter_model.safetensors") for f in (output, copy))
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_the_validation_slice_respects_max_validation_examples(encoder_folder, sentiment_csv, tmp_path):
    """25 training rows, half of them asked for, at most 7: 7 rows validate and 18 train."""
    output = tmp_path / "capped"
    extra = ["--max-train-examples", 25, "--validation-fraction", 0.5, "--max-validation-examples", 7]
    metrics = train(
        build_parser().parse_args(train_argv(encoder_folder, sentiment_csv, output, *extra, "--max-steps", 1))
    )
    assert (metrics["validation_rows"], metrics["train_rows"]) == (7, 18)


def test_a_bad_validation_fraction_is_refused_on_the_command_line(
    encoder_folder, sentiment_csv, tmp_path, capsys
):
    capsys.readouterr()
    assert cli(*train_argv(encoder_folder, sentiment_csv, tmp_path / "run", "--validation-fraction", 1)) == 2
    assert "--validation-fraction must be at least 0 and below 1, got 1.0." in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
