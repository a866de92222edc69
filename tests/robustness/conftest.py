"""The robustness suite: generated inputs through hypothesis (a fixed, derandomized set in CI; many more
with `pytest --long`), and the figures its probes counted, printed at the end of the run."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from probes import FIGURES

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=500, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def pytest_configure(config: Any) -> None:
    settings.load_profile("long" if config.getoption("--long") else "ci")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES.inputs_tried or FIGURES.kill_points_survived:
        terminalreporter.section("peftkit robustness figures")
        for line in FIGURES.lines():
            terminalreporter.write_line(line)
