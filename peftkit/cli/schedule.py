"""How long `peftkit train` trains, and how it picks what it keeps, when the user does not say: functions of
the data, not constants tuned on one set (the README's "Defaults that follow the data" gives the runs that
chose them).

- **Length.** At least `MIN_ROWS_SEEN` training rows over the run, and at least `MIN_EPOCHS` epoch (at
  most `MAX_EPOCHS`): a set of 1,000 training rows trains 10 epochs, 2,000 rows 5, 5,000 rows 2, 10,000
  or more 1.
  `--epochs` or `--max-steps` replaces this.
- **Validation.** A slice of the training rows (`VALIDATION_FRACTION`, at most `MAX_VALIDATION_ROWS`) is
  held back; its loss is measured `EVALUATIONS` times over the run, at each checkpoint. The checkpoint of
  the lowest loss is the one saved at the end, and training stops once `PATIENCE` passes in a row bring
  no improvement. Sets too small for a slice of `MIN_VALIDATION_ROWS` train on every row and keep the last
  step, unless `--validation-fraction` is given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_ROWS_SEEN = 10_000
MIN_EPOCHS = 1
MAX_EPOCHS = 10
VALIDATION_FRACTION = 0.1
MAX_VALIDATION_ROWS = 500
MIN_VALIDATION_ROWS = 50
EVALUATIONS = 10
PATIENCE = 3


def default_epochs(rows: int) -> float:
    """epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, MIN_ROWS_SEEN / rows)), to two decimals."""
    return round(min(MAX_EPOCHS, max(MIN_EPOCHS, MIN_ROWS_SEEN / max(rows, 1))), 2)


def validation_rows(rows: int, fraction: float | None, cap: int) -> int:
    """How many of `rows` training rows to hold back for validation: `fraction` of them (the default's when
    None), at most `cap`; 0 when the default's share would be fewer than MIN_VALIDATION_ROWS rows."""
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(f"--validation-fraction must be at least 0 and below 1, got {fraction}.")
    share = math.ceil(round(rows * (VALIDATION_FRACTION if fraction is None else fraction), 9))  # 100 × 0.07
    if fraction is None and share < MIN_VALIDATION_ROWS:  # is 7.000000000000001 in floating point
        return 0
    wanted = min(cap, share)
    return wanted if wanted < rows else 0


@dataclass(frozen=True)
class Schedule:
    """A run's length and checkpoints; `length_from` says whether the user or the data set the length."""

    rows: int  # training rows, the validation slice excluded
    rows_per_step: int
    epochs: float
    total_steps: int
    warmup_steps: int
    eval_every: int  # optimizer steps between checkpoints (and validation passes, when there is a slice)
    validation_rows: int
    patience: int  # validation passes without improvement before training stops; 0: never stops early
    length_from: str

    def describe(self) -> list[str]:
        """The lines `peftkit train` prints about the schedule."""
        lines = [
            f"{self.total_steps} optimizer steps of {self.rows_per_step} rows ({self.epochs:g} epochs of "
            f"{self.rows} rows, {self.length_from}), warm-up {self.warmup_steps} steps"
        ]
        if self.validation_rows:
            stop = f", stops after {self.patience} without improvement" if self.patience else ""
            lines.append(
                f"validation: {self.validation_rows} rows held out of training, loss every {self.eval_every} "
                f"steps; the best checkpoint is kept{stop}"
            )
        else:
            lines.append(
                f"no validation slice (too few rows): the last step is kept, checkpoints every "
                f"{self.eval_every} steps"
            )
        return lines

    def as_dict(self) -> dict:
        return asdict(self)


def plan(
    rows: int,
    rows_per_step: int,
    steps_per_epoch: int,
    epochs: float | None,
    max_steps: int | None,
    save_steps: int | None,
    warmup_fraction: float,
    validation: int,
    patience: int | None,
) -> Schedule:
    """The schedule for `rows` training rows; each of `epochs`, `max_steps`, `save_steps`, `patience` is the
    user's value, or None for the default."""
    if max_steps:
        total, length_from = max_steps, "--max-steps"
        epochs = round(total / steps_per_epoch, 2)
    else:
        length_from = "--epochs" if epochs is not None else f"at least {MIN_ROWS_SEEN:,} rows seen"
        epochs = default_epochs(rows) if epochs is None else epochs
        total = max(1, math.ceil(epochs * steps_per_epoch))
    every = save_steps or max(1, math.ceil(total / EVALUATIONS))
    return Schedule(
        rows=rows,
        rows_per_step=rows_per_step,
        epochs=epochs,
        total_steps=total,
        warmup_steps=math.ceil(warmup_fraction * total),
        eval_every=every,
        validation_rows=validation,
        patience=(PATIENCE if patience is None else patience) if validation else 0,
        length_from=length_from,
    )
