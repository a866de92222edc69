"""Faults while training: a loss, gradient or weight that stops being finite stops the run at that step and
keeps the last good checkpoint; a second run into a held output folder is refused (and a killed holder
does not keep it); a full disk is a clear error that leaves what was saved before intact."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import Crash, tiny_llama
from forked import kill_self, run_forked
from probes import cli_refuses, left_intact, refuses
from safetensors.torch import load_file
from transformers import TrainerCallback

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import build_parser, main
from peftkit.cli.train import TrainingStopped, checkpoint_folders, output_lock, train


def argv(folder: Path, data: Path, output: Path, *extra) -> list[str]:
    return [
        str(a)
        for a in ["train", "--model", folder, "--data", data, "--output", output, "--batch-size", 8,
                  "--max-steps", 8, "--save-steps", 3, "--max-eval-examples", 8, *extra]
    ]  # fmt: skip


class Poison(TrainerCallback):
    """After optimizer step `after_step`, makes one LoRA weight NaN ("weights"), or from then on makes
    its gradient infinite ("gradient"). The weight is on `value`: a NaN in a query reaches CPU attention
    (SDPA), whose softmax does not carry it forward, only back."""

    def __init__(self, after_step: int, what: str) -> None:
        self.after_step, self.what = after_step, what

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.after_step:
            return
        weight = next(p for n, p in model.named_parameters() if "value" in n and "lora_B" in n)
        if self.what == "weights":
            with torch.no_grad():
                weight[0, 0] = float("nan")
        else:
            weight.register_hook(lambda grad: grad * float("inf"))


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values())


@pytest.mark.parametrize(
    "after_step, what, message, kept",
    [
        (4, "weights", "at step 5, the loss is nan. It stopped before its update", ["checkpoint-3"]),
        (
            4,
            "gradient",
            "at step 5, a gradient is not finite. It stopped before its update",
            ["checkpoint-3"],
        ),
        (6, "weights", "step 6 left weights that are not finite", ["checkpoint-3"]),  # before its checkpoint
        (7, "gradient", "at step 8, a gradient is not finite", ["checkpoint-3", "checkpoint-6"]),
    ],
)
def test_a_fault_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(
    after_step, what, message, kept, encoder_folder, sentiment_csv, tmp_path
):
    output = tmp_path / "run"
    args = build_parser().parse_args(argv(encoder_folder, sentiment_csv, output, "--lr", 1e-2))
    refuses(
        lambda: train(args, callbacks=[Poison(after_step, what)]),
        message,
        f"the last good checkpoint, {output / 'checkpoints' / kept[-1]}, is kept",
        hints=("Lower --lr",),
        types=(TrainingStopped,),
    )
    assert [p.name for p in checkpoint_folders(output / "checkpoints")] == kept
    assert all(all_finite(p) for p in checkpoint_folders(output / "checkpoints"))
    assert not (output / "adapter_model.safetensors").exists()  # no adapter of the poisoned state
    assert not (output / "checkpoints" / ".partial").exists()


def test_a_huge_learning_rate_exits_2_naming_the_step(encoder_folder, sentiment_csv, tmp_path):
    output = tmp_path / "run"
    line = cli_refuses(
        argv(encoder_folder, sentiment_csv, output, "--lr", 1e30, "--save-steps", 1),
        "Training stopped: at step",
        "is kept",
        hints=("Lower --lr (it is 1e+30)",),
    )
    assert "the loss is nan" in line or "not finite" in line
    assert checkpoint_folders(output / "checkpoints")  # the steps before the fault were kept
    assert all(all_finite(p) for p in checkpoint_folders(output / "checkpoints"))
    assert not (output / "adapter_model.safetensors").exists()


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_holder_frees_it(
    encoder_folder, sentiment_csv, tmp_path
):
    output = tmp_path / "run"
    with output_lock(output):
        cli_refuses(
            argv(encoder_folder, sentiment_csv, output, "--max-steps", 2),
            f"--output {output} is in use by another peftkit train (pid {os.getpid()}",
            hints=("pass another --output",),
        )
    assert not (output / "checkpoints").exists()

    def hold_and_die() -> int:
        with output_lock(output):
            kill_self()
        return 1

    assert run_forked(hold_and_die) == -9
    assert main(argv(encoder_folder, sentiment_csv, output, "--max-steps", 2)) == 0


def test_a_refused_run_leaves_no_folder_behind(encoder_folder, sentiment_csv, tmp_path):
    output = tmp_path / "new"
    cli_refuses(argv(encoder_folder, sentiment_csv, output, "--r", 0), "r must be a positive integer")
    assert not output.exists()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes in one file fail with EFBIG, as they would on a full disk (without the
    signal that would otherwise kill the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_saving_is_a_clear_error_and_the_previous_adapter_stays(tmp_path):
    folder = tmp_path / "adapter"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(folder))
    bigger = get_peft_model(tiny_llama(), LoraConfig(r=64, target_modules=["q_proj", "v_proj"]))
    limit = (folder / "adapter_model.safetensors").stat().st_size + 1024
    with left_intact(folder), file_size_limit(limit):
        refuses(
            lambda: bigger.save_pretrained(str(folder)),
            f"could not write {folder / 'adapter_model.safetensors'}",
            hints=("is unchanged",),
            types=(OSError,),  # a full disk is an OSError; its message now names the file
        )


def test_a_full_disk_while_checkpointing_exits_2_and_keeps_the_checkpoints_before(
    encoder_folder, sentiment_csv, tmp_path
):
    output = tmp_path / "run"
    assert main(argv(encoder_folder, sentiment_csv, output, "--max-steps", 3)) == 0
    before = {p.name for p in checkpoint_folders(output / "checkpoints")}
    assert before == {"checkpoint-3"}
    optimizer = (output / "checkpoints" / "checkpoint-3" / "optimizer.pt").stat().st_size
    err = tmp_path / "stderr.txt"

    def resume_on_a_full_disk() -> int:
        sys.stderr = open(err, "w", buffering=1)  # noqa: SIM115 - the child ends with os._exit
        with file_size_limit(optimizer - 1024):  # the adapter fits, the optimizer's state does not
            return main(argv(encoder_folder, sentiment_csv, output, "--max-steps", 6, "--resume"))

    with left_intact(output / "checkpoints" / "checkpoint-3"):
        assert run_forked(resume_on_a_full_disk) == 2
    message = err.read_text().strip().splitlines()[-1]
    assert message.startswith(
        f"peftkit train: error: could not write checkpoint-6 in {output / 'checkpoints'}"
    )
    assert "Free some space and pass --resume to continue" in message  # torch.save's own reason is vague
    assert {p.name for p in checkpoint_folders(output / "checkpoints")} == before
    assert not (output / "checkpoints" / ".partial").exists()


def test_resume_passes_over_an_incomplete_checkpoint(encoder_folder, sentiment_csv, tmp_path, capsys):
    """A checkpoint folder without the Trainer's state (copied in part, or left by another tool) is not
    resumed from: the run goes on from the one before, replaces it, and ends as an uninterrupted run."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(argv(encoder_folder, sentiment_csv, whole, "--max-steps", 7, "--lr", 1e-2)) == 0
    args = build_parser().parse_args(
        argv(encoder_folder, sentiment_csv, broken, "--max-steps", 7, "--lr", 1e-2)
    )
    with pytest.raises(RuntimeError, match="killed"):
        train(args, callbacks=[Crash(at_step=7)])
    (broken / "checkpoints" / "checkpoint-6" / "trainer_state.json").unlink()
    capsys.readouterr()
    assert main(argv(encoder_folder, sentiment_csv, broken, "--max-steps", 7, "--lr", 1e-2, "--resume")) == 0
    assert "checkpoint-6 is incomplete (no trainer_state.json or weights); resuming from an earlier one" in (
        capsys.readouterr().out
    )
    assert [p.name for p in checkpoint_folders(broken / "checkpoints")] == ["checkpoint-6", "checkpoint-7"]
    assert (broken / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    first, second = (load_file(run / "adapter_model.safetensors") for run in (whole, broken))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
