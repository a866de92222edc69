"""`peftkit train --resume` after a crash ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from peftkit.cli import build_parser, main
from peftkit.cli.train import train


class Crash(TrainerCallback):
    """Raises once `at_step` optimizer steps are done: the process dies before that step's checkpoint."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError("killed")


@pytest.mark.parametrize("model", ["encoder_folder", "causal_folder"])
def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(model, sentiment_csv, tmp_path, request):
    folder = request.getfixturevalue(model)

    def argv(output):  # dropout on, so the restored random state matters too
        return [
            "train", "--model", folder, "--data", sentiment_csv, "--output", output, "--batch-size", 8,
            "--max-steps", 8, "--save-steps", 3, "--dropout", 0.1, "--lr", 1e-2,
        ]  # fmt: skip

    assert main([str(a) for a in argv(tmp_path / "whole")]) == 0
    with pytest.raises(RuntimeError, match="killed"):
        train(build_parser().parse_args([str(a) for a in argv(tmp_path / "crashed")]), callbacks=[Crash(7)])
    checkpoints = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"] and not (
        tmp_path / "crashed" / "metrics.json"
    ).read_text().count("after")
    assert main([str(a) for a in argv(tmp_path / "crashed")] + ["--resume"]) == 0

    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    first, second = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "crashed"))
    assert first["after"] == second["after"] and first["before"] == second["before"]
    assert second["optimizer_steps"] == 8
