"""Probes of the robustness suite. Every probe counts the input it tried and how peftkit answered, and
the run ends with the figures: inputs tried, clear errors, inputs read correctly, crashes without a clear
error (goal 0), files left corrupted (goal 0), kill points survived.

A *clear error* is an exception of a documented type whose message names what was wrong (each of the
probe's `names`, case-insensitively) and what would be valid (its `hints`); on the command line, exit
status 2 with that message on one line of stderr and no traceback."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from peftkit.layer import NotMergeableError

CLEAR_TYPES: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, NotMergeableError)


@dataclass
class Figures:
    inputs_tried: int = 0
    clear_errors: int = 0
    read_correctly: int = 0
    crashes_without_a_clear_error: int = 0
    files_checked: int = 0
    files_left_corrupted: int = 0
    kill_points_survived: int = 0

    def lines(self) -> list[str]:
        goals = {"crashes_without_a_clear_error": 0, "files_left_corrupted": 0}
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            goal = ""
            if f.name in goals:
                goal = f" (goal {goals[f.name]}: {'met' if value == goals[f.name] else 'MISSED'})"
            shown.append(f"{f.name.replace('_', ' ')}: {value}{goal}")
        return shown


FIGURES = Figures()


def _unclear(message: str, names: tuple[str, ...], hints: tuple[str, ...]) -> list[str]:
    lowered = message.lower()
    return [n for n in (*names, *hints) if str(n).lower() not in lowered]


def refuses(
    call: Callable[[], Any],
    *names: str,
    hints: tuple[str, ...] = (),
    types: tuple[type[BaseException], ...] = CLEAR_TYPES,
) -> BaseException:
    """Run `call` on a bad input and require a clear error naming every one of `names` and `hints`."""
    FIGURES.inputs_tried += 1
    try:
        call()
    except types as error:
        missing = _unclear(str(error), names, hints)
        if missing:
            FIGURES.crashes_without_a_clear_error += 1
            pytest.fail(f"{type(error).__name__} does not name {missing}: {error}")
        FIGURES.clear_errors += 1
        return error
    except Exception as error:
        FIGURES.crashes_without_a_clear_error += 1
        pytest.fail(f"{type(error).__name__} is not a clear error: {error}")
    FIGURES.crashes_without_a_clear_error += 1
    pytest.fail(f"bad input accepted without an error (expected one naming {names})")


def reads(call: Callable[[], Any]) -> Any:
    """Run `call` on an unusual but valid input, which must be read; the test then checks the result."""
    FIGURES.inputs_tried += 1
    try:
        result = call()
    except Exception:
        FIGURES.crashes_without_a_clear_error += 1
        raise
    FIGURES.read_correctly += 1
    return result


def cli_refuses(argv: list[Any], *names: str, hints: tuple[str, ...] = ()) -> str:
    """Run the `peftkit` command in this process on a bad input: exit status 2, one line on stderr naming
    `names` and `hints`, no traceback. Returns that line."""
    from peftkit.cli import main

    FIGURES.inputs_tried += 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
        except Exception as error:
            FIGURES.crashes_without_a_clear_error += 1
            pytest.fail(f"peftkit {argv[0]} raised {type(error).__name__}: {error}")
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    problems = []
    if status != 2:
        problems.append(f"exit status {status}, not 2")
    if any("Traceback" in line for line in lines):
        problems.append("a traceback")
    message = lines[-1] if lines else ""
    if not message.startswith("peftkit") or "error:" not in message:
        problems.append("no 'peftkit ...: error: ...' line")
    missing = _unclear(message, names, hints)
    if missing:
        problems.append(f"a message that does not name {missing}")
    if problems:
        FIGURES.crashes_without_a_clear_error += 1
        pytest.fail(f"peftkit {' '.join(map(str, argv))}: {', '.join(problems)}; stderr: {err.getvalue()}")
    FIGURES.clear_errors += 1
    return message


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def left_intact(folder: Path) -> Iterator[None]:
    """Every file under `folder` holds the same bytes after the block as before it (and no file is added
    or removed), whatever the block raised."""
    before = digest(folder)
    try:
        yield
    finally:
        after = digest(folder)
        FIGURES.files_checked += len(before)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        FIGURES.files_left_corrupted += len(changed)
        assert not changed, f"files changed or left behind in {folder}: {changed}"


def survived_kill() -> None:
    FIGURES.kill_points_survived += 1
