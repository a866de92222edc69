"""Run a piece of a test in a forked child process, so that it can be killed with SIGKILL (or have its
file sizes limited) without touching the test process, and without the seconds a fresh interpreter takes
to import torch and transformers."""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable

import torch


def run_forked(target: Callable[[], int | None]) -> int:
    """`target()` in a child process: its return value as the exit status, or minus the signal that
    killed it (-9 for SIGKILL); 70 if it raised, with the traceback on the child's stderr."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test process
        code = 70
        try:
            torch.set_num_threads(1)  # an OpenMP pool forked mid-use can hang; one thread uses none
            code = target() or 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
