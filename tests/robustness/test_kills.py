"""SIGKILL `peftkit train` at many points, spread over the training steps, the checkpoint writes and the
final save, and resume each. At no point does the output folder hold a half-written adapter or a
checkpoint that `--resume` would pick and fail on, and every resumed run ends with the adapter and the
metrics of an uninterrupted run. `pytest --long` kills at every point instead of 21 of them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from forked import kill_self, run_forked
from probes import survived_kill
from safetensors.torch import load_file

import peftkit.cli.train as train_module
from peftkit.cli import main

CHECKPOINT_FILES = [
    "adapter_config.json", "adapter_model.safetensors", "training_state.safetensors", "optimizer.pt",
    "scheduler.pt", "rng_state.pth", "trainer_state.json", "peftkit_trainer.json",
]  # fmt: skip
KILLS_IN_CI = 21


def folder_problems(output: Path) -> list[str]:
    """What in a run folder is half-written: a checkpoint missing a file, or an adapter, metrics or run
    file that does not parse."""
    problems = []
    for checkpoint in train_module.checkpoint_folders(output / "checkpoints"):
        missing = [f for f in CHECKPOINT_FILES if not (checkpoint / f).is_file()]
        if missing:
            problems.append(f"{checkpoint.name} lacks {missing}")
        else:
            load_file(checkpoint / "adapter_model.safetensors")
    for name in ("adapter_model.safetensors",):
        if (output / name).exists():
            try:
                load_file(output / name)
            except Exception as error:  # noqa: BLE001
                problems.append(f"{name}: {error}")
    for name in ("adapter_config.json", "metrics.json", "peftkit_run.json"):
        if (output / name).exists():
            try:
                json.loads((output / name).read_text())
            except ValueError as error:
                problems.append(f"{name}: {error}")
    return problems


class KillPoints:
    """In the child: counts each step and each write of the run, before and after it, labelled with the
    phase it belongs to; kills the process at event `kill_at`, and (when `watch` is given) checks the run
    folder at every event."""

    def __init__(self, kill_at: int | None, watch: Path | None = None) -> None:
        self.kill_at, self.watch = kill_at, watch
        self.phase = "start"
        self.labels: list[str] = []
        self.problems: list[str] = []

    def event(self, what: str) -> None:
        self.labels.append(f"{self.phase}: {what}")
        if len(self.labels) == self.kill_at:
            kill_self()
        if self.watch is not None:
            self.problems += [f"at {self.labels[-1]}: {p}" for p in folder_problems(self.watch)]

    def counted(self, function, what: str, phase: str | None = None):
        def wrapper(*args, **kwargs):
            if phase:
                self.phase = phase
            self.event(f"before {what}")
            result = function(*args, **kwargs)
            self.event(f"after {what}")
            return result

        return wrapper

    def install(self) -> None:
        trainer = train_module.AdapterTrainer
        trainer.training_step = self.counted(trainer.training_step, "a step", phase="training")
        save_checkpoint = trainer._save_checkpoint

        def checkpoint(*args, **kwargs):
            self.phase = "checkpoint"
            save_checkpoint(*args, **kwargs)
            self.phase = "training"

        trainer._save_checkpoint = checkpoint
        original_train = trainer.train

        def train_then_final_save(*args, **kwargs):
            result = original_train(*args, **kwargs)
            self.phase = "final save"
            return result

        trainer.train = train_then_final_save
        train_module.evaluate = self.counted(train_module.evaluate, "evaluating")
        train_module.save_file = self.counted(train_module.save_file, "writing the training state")
        torch.save = self.counted(torch.save, "torch.save")
        os.fsync = self.counted(os.fsync, "fsync of a written file")
        os.replace = self.counted(os.replace, "a rename")
        shutil.rmtree = self.counted(shutil.rmtree, "deleting a folder")


def argv(folder: Path, data: Path, output: Path) -> list[str]:
    return [
        str(a)
        for a in ["train", "--model", folder, "--data", data, "--output", output, "--batch-size", 8,
                  "--max-steps", 7, "--save-steps", 3, "--lr", 1e-2, "--dropout", 0.1,
                  "--max-eval-examples", 8]
    ]  # fmt: skip


def test_killed_at_every_point_a_run_resumes_to_the_uninterrupted_result(
    encoder_folder, sentiment_csv, tmp_path, request
):
    whole = tmp_path / "whole"
    events = tmp_path / "events.json"

    def uninterrupted() -> int:
        points = KillPoints(kill_at=None, watch=whole)
        points.install()
        status = main(argv(encoder_folder, sentiment_csv, whole))
        events.write_text(json.dumps({"labels": points.labels, "problems": points.problems}))
        return status

    assert run_forked(uninterrupted) == 0
    recorded = json.loads(events.read_text())
    labels = recorded["labels"]
    assert recorded["problems"] == []  # the folder was whole at every one of the run's events
    phases = {label.partition(":")[0] for label in labels}
    assert {"training", "checkpoint", "final save"} <= phases, phases
    everywhere = request.config.getoption("--long")
    count = len(labels) if everywhere else min(KILLS_IN_CI, len(labels))
    chosen = sorted({round(1 + i * (len(labels) - 1) / (count - 1)) for i in range(count)})
    assert len(chosen) >= 20 and {labels[k - 1].partition(":")[0] for k in chosen} >= phases - {"start"}

    reference = {p.name: load_file(p) for p in whole.glob("*.safetensors")}
    expected = json.loads((whole / "metrics.json").read_text())
    failures = []
    for kill_at in chosen:
        output = tmp_path / f"killed-at-{kill_at}"

        def killed(kill_at=kill_at, output=output) -> int:
            KillPoints(kill_at).install()
            return main(argv(encoder_folder, sentiment_csv, output))

        where = f"killed {labels[kill_at - 1]!r} (event {kill_at})"
        if run_forked(killed) != -9:
            failures.append(f"{where}: the run was not killed")
            continue
        problems = folder_problems(output) if output.exists() else []
        if problems:
            failures.append(f"{where}: left {problems}")
        started = (output / "metrics.json").is_file()
        again = argv(encoder_folder, sentiment_csv, output) + (["--resume"] if started else [])
        if run_forked(lambda again=again: main(again)) != 0:
            failures.append(f"{where}: resuming failed")
            continue
        resumed = json.loads((output / "metrics.json").read_text())
        same = {k: v for k, v in resumed.items() if k not in train_module.MACHINE_FIGURES} == {
            k: v for k, v in expected.items() if k not in train_module.MACHINE_FIGURES
        }
        tensors = {p.name: load_file(p) for p in output.glob("*.safetensors")}
        equal = tensors.keys() == reference.keys() and all(
            tensors[f].keys() == reference[f].keys()
            and all(torch.equal(tensors[f][k], reference[f][k]) for k in reference[f])
            for f in reference
        )
        if not (same and equal):
            failures.append(f"{where}: resumed to other {'metrics' if not same else 'weights'}")
            continue
        survived_kill()
    assert not failures, "\n".join(failures)
