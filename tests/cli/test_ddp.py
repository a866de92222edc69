"""`peftkit train` under `torchrun --nproc_per_node 2`: DDP with gloo on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(output: Path, folder: Path, data: Path, batch_size: int, processes: int) -> None:
    argv = [
        "train", "--model", folder, "--data", data, "--output", output, "--batch-size", batch_size,
        "--max-steps", 4, "--dropout", 0, "--lr", 1e-2, "--max-eval-examples", 8,
    ]  # fmt: skip
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(WORKER), *map(str, argv)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_end_with_identical_adapters_equal_to_one_process(
    encoder_folder, sentiment_csv, tmp_path
):
    """2 ranks × 4 rows per step against 1 process × 8 rows: the same global batches, the same updates."""
    run(tmp_path / "ddp", encoder_folder, sentiment_csv, batch_size=4, processes=2)
    run(tmp_path / "single", encoder_folder, sentiment_csv, batch_size=8, processes=1)
    rank0, rank1 = (load_file(tmp_path / "ddp" / "checkpoints" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "single" / "checkpoints" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=1e-5)
    saved = load_file(tmp_path / "ddp" / "adapter_model.safetensors")  # written once, by rank 0
    assert len(saved) == len(rank0)
