"""`peftkit train --resume` after a crash ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Crash
from safetensors.torch import load_file

from peftkit.cli import build_parser, main
from peftkit.cli.train import method_choices, train

CASES = {  # dropout on where the method has it, so the restored random state matters too
    "lora-encoder": ("encoder_folder", ["--dropout", 0.1]),
    "lora-causal": ("causal_folder", ["--dropout", 0.1]),
    **{method: ("encoder_folder", []) for method in method_choices() if method != "lora"},
    "lora+bottleneck+prompt-tuning": ("encoder_folder", ["--set", "adapter_size=4"]),  # one group each
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(case, sentiment_csv, tmp_path, request):
    fixture, extra = CASES[case]
    folder = request.getfixturevalue(fixture)
    method = "lora" if case.startswith("lora-") else case

    def argv(output):
        return [
            "train", "--model", folder, "--data", sentiment_csv, "--output", output, "--batch-size", 8,
            "--max-steps", 8, "--save-steps", 3, "--lr", 1e-2, "--method", method, *extra,
        ]  # fmt: skip

    assert main([str(a) for a in argv(tmp_path / "whole")]) == 0
    with pytest.raises(RuntimeError, match="killed"):
        train(build_parser().parse_args([str(a) for a in argv(tmp_path / "crashed")]), callbacks=[Crash(7)])
    checkpoints = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"] and not (
        tmp_path / "crashed" / "metrics.json"
    ).read_text().count("after")
    assert main([str(a) for a in argv(tmp_path / "crashed")] + ["--resume"]) == 0

    saved = ["model.safetensors" if method == "full" else "adapter_model.safetensors"]
    saved += [f"{m}/adapter_model.safetensors" for m in method.split("+")[1:]]
    for file in saved:
        whole, resumed = (load_file(tmp_path / run / file) for run in ("whole", "crashed"))
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), key
    first, second = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "crashed"))
    assert first["after"] == second["after"] and first["before"] == second["before"]
    assert second["optimizer_steps"] == 8


def test_resuming_with_other_options_is_refused(encoder_folder, sentiment_csv, tmp_path, capsys):
    argv = ["train", "--model", encoder_folder, "--data", sentiment_csv, "--output", tmp_path / "run"]
    argv += ["--batch-size", 8, "--max-steps", 4, "--save-steps", 2]
    with pytest.raises(RuntimeError, match="killed"):
        train(build_parser().parse_args([str(a) for a in argv]), callbacks=[Crash(3)])
    assert main([str(a) for a in argv] + ["--resume", "--r", "4"]) == 2
    assert (
        "does not match this run's trainable tensors; were the method's options changed?"
        in capsys.readouterr().err
    )
