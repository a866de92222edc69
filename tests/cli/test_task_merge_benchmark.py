"""`benchmarks/task_merge.py` end to end on the tiny causal LM: it trains both task adapters, scores every
merge on both tasks, and the adapters alone score what their own runs recorded."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "task_merge.py"


def test_the_task_merge_benchmark_runs_and_agrees_with_the_runs(causal_folder, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("task_merge", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["task_merge.py", "--model", str(causal_folder), "--max-steps", "2", "--max-eval-examples", "12"]
    monkeypatch.setattr(sys, "argv", [*argv, "--work", str(tmp_path)])
    script.main()
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["merge"] for r in results] == [m[0] for m in script.MERGES]
    by_name = {r["merge"]: r for r in results}
    for task in ("sentiment", "intensity"):
        after = json.loads((tmp_path / task / "metrics.json").read_text())["after"]["accuracy"]
        assert by_name[f"{task} adapter alone"][task] == after
        before = json.loads((tmp_path / task / "metrics.json").read_text())["before"]["accuracy"]
        assert by_name["base model"][task] == before
    assert "| cat, weights 1 / 1 (= both active) |" in capsys.readouterr().out
