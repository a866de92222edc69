"""Scaling out on the CPU: FSDP, which transformers' Trainer cannot give there (pinned, so these tests fail
once it can), and a process of a torchrun run killed mid-run, which stops the run and resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(command: list[object], timeout: int = 150) -> subprocess.CompletedProcess:
    """`command` in a process group of its own; past `timeout`, every process in it prints where it waits
    (faulthandler, on SIGABRT), is killed, and the test fails with that; no process outlives the call."""
    command = [str(c) for c in command]
    with subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            out, err = process.communicate(timeout=30)
            pytest.fail(f"{' '.join(command[:6])} ... still ran after {timeout} s:\n{err[-6000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def torchrun(*argv: object) -> subprocess.CompletedProcess:
    return launch([*TORCHRUN, WORKER, *argv])


@pytest.mark.parametrize("world", ["1", "2"])
def test_fsdp_is_refused_with_its_reason(world, encoder_folder, sentiment_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", world)
    output = tmp_path / "run"
    argv = ["train", "--model", encoder_folder, "--data", sentiment_csv, "--output", output, "--fsdp"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for part in ("--fsdp is not available", "GPU-type devices", "trains DDP instead", "Leave out --fsdp"):
        assert part in err, err
    assert not (output / "checkpoints").exists() and not (output / "metrics.json").exists()


def test_trainer_fsdp_on_cpu_processes_trains_ddp(tmp_path):
    """The reason --fsdp is refused: asked for FSDP2 on 2 gloo CPU processes, the Trainer builds no FSDP at
    all (accelerate sets DistributedType.FSDP only for GPU-type devices) and wraps the model in DDP."""
    done = torchrun("fsdp-probe", tmp_path / "found.json")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((tmp_path / "found.json").read_text())
    assert found == {
        "world_size": 2,
        "distributed_type": "DistributedType.MULTI_CPU",
        "is_fsdp_enabled": False,
        "wrapped_in": "DistributedDataParallel",
    }


def test_accelerate_launch_cpu_with_an_fsdp_config_starts_one_process(tmp_path):
    """The other route, `accelerate launch --cpu` with an FSDP config for 2 processes: it starts one process,
    with no process group to shard over (FSDP's launcher is taken only without --cpu)."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "distributed_type: FSDP\nnum_processes: 2\nuse_cpu: true\nfsdp_config:\n  fsdp_version: 2\n"
    )
    script = tmp_path / "env.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, sys
        keys = ["WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP"]
        found = {k: os.environ.get(k) for k in keys}
        open(os.path.join(sys.argv[1], f"{os.getpid()}.json"), "w").write(json.dumps(found))
        """)
    )
    found = tmp_path / "found"
    found.mkdir()
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--cpu"]
    done = launch([*accelerate, "--num_processes", 2, script, found])
    assert done.returncode == 0, done.stderr[-3000:]
    started = [json.loads(f.read_text()) for f in found.iterdir()]
    assert started == [{"WORLD_SIZE": None, "RANK": None, "ACCELERATE_USE_FSDP": None}]


def test_a_killed_process_stops_the_run_and_resume_ends_like_an_uninterrupted_run(
    encoder_folder, sentiment_csv, tmp_path
):
    """Rank 1 SIGKILLed after step 5 of 6 (checkpoints every 2 steps): torchrun names rank 1 and the signal,
    rank 0 stops on its own at its next collective with a message that says to resume, and --resume on 2
    processes continues from checkpoint-4 to the adapter an uninterrupted 2-process run ends with."""

    def argv(output: Path) -> list[object]:
        return [
            "train", "--model", encoder_folder, "--data", sentiment_csv, "--output", output,
            "--batch-size", 4, "--max-steps", 6, "--save-steps", 2, "--dropout", 0.1, "--lr", 1e-2,
            "--max-eval-examples", 8,
        ]  # fmt: skip

    whole = torchrun(*argv(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = torchrun("--sigkill", "1:5", *argv(tmp_path / "killed"))
    assert killed.returncode == 1
    root_cause = killed.stderr.rpartition("Root Cause (first observed failure):")[2]
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : -9" in root_cause, killed.stderr[-3000:]
    assert "Signal 9 (SIGKILL)" in root_cause, root_cause
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "Process 0 lost another process of this run (" in killed.stderr, killed.stderr[-3000:]
    kept = f"The last checkpoint is {checkpoints / 'checkpoint-4'}: run the same command with --resume"
    assert kept in killed.stderr, killed.stderr[-3000:]
    assert "Unable to shutdown process" not in killed.stderr  # rank 0 ended by itself, not by torchrun's kill
    assert "after" not in json.loads((tmp_path / "killed" / "metrics.json").read_text())

    resumed = torchrun(*argv(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "| 4/6 [" in resumed.stderr and "| 0/6 [" not in resumed.stderr  # the progress bar: from step 4
    first, second = (load_file(tmp_path / r / "adapter_model.safetensors") for r in ("whole", "killed"))
    assert first.keys() == second.keys() and len(first) > 0
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=0)
    rank0, rank1 = (load_file(checkpoints / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 6
