"""What merging two task adapters does to each task, on real data.

SmolLM2-135M-Instruct learns two tasks from the built-in movie reviews (Hutto & Gilbert, 2014), each as its
own LoRA adapter trained by `peftkit train`: the review's sentiment (positive / negative: the sign of its
mean rating) and the sentiment's intensity (strong / mild: |mean rating| at or above 1.8 of 4, the median).
Every combination type then merges the two adapters into one, which is scored on both tasks' held-out
reviews (the split `peftkit train` held out, the same reviews for both tasks).

    python benchmarks/task_merge.py [--model smollm2] [--max-steps 150] [--max-eval-examples 300]

Trained adapters are kept in `--work` (default runs/task-merge) and reused by a second run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from peftkit import PeftModel  # noqa: E402
from peftkit.cli import build_parser  # noqa: E402
from peftkit.cli.data import load_dataset, split  # noqa: E402
from peftkit.cli.metrics import evaluate  # noqa: E402
from peftkit.cli.models import load_model, load_tokenizer, model_folder  # noqa: E402
from peftkit.cli.train import train  # noqa: E402

STRONG = 1.8  # the median |mean rating| of the reviews: the intensity classes are balanced
TASKS = {
    "sentiment": ("Review: {text}\nSentiment:", lambda r: "positive" if r > 0 else "negative"),
    "intensity": ("Review: {text}\nIntensity:", lambda r: "strong" if abs(r) >= STRONG else "mild"),
}
BOTH = ["sentiment", "intensity"]
# (row label, adapters, weights, add_weighted_adapter's other options); no adapters: the base model
MERGES = [
    ("base model", [], None, {}),
    ("sentiment adapter alone", ["sentiment"], None, {}),
    ("intensity adapter alone", ["intensity"], None, {}),
    ("linear, weights 0.5 / 0.5", BOTH, [0.5, 0.5], {"combination_type": "linear"}),
    ("linear, weights 1 / 1", BOTH, [1.0, 1.0], {"combination_type": "linear"}),
    ("cat, weights 1 / 1 (= both active)", BOTH, [1.0, 1.0], {"combination_type": "cat"}),
    ("svd, weights 1 / 1, rank 8", BOTH, [1.0, 1.0], {"combination_type": "svd"}),
    ("ties, density 0.5, weights 1 / 1", BOTH, [1.0, 1.0], {"combination_type": "ties", "density": 0.5}),
    (
        "dare_ties, density 0.5, weights 1 / 1",
        BOTH,
        [1.0, 1.0],
        {"combination_type": "dare_ties", "density": 0.5},
    ),
    (
        "magnitude_prune, density 0.5, weights 1 / 1",
        BOTH,
        [1.0, 1.0],
        {"combination_type": "magnitude_prune", "density": 0.5},
    ),
]


def write_task_data(work: Path) -> dict[str, Path]:
    """One CSV per task (text, label) from the shipped reviews, the 0.0 ties left out as `train` does."""
    path = resources.files("peftkit").joinpath("data/movie_reviews/movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, rating, sentence = line.split("\t", 2)
        if float(rating) != 0:
            rows.append((sentence.strip(), float(rating)))
    files = {}
    for task, (_, label_of) in TASKS.items():
        files[task] = work / f"{task}.csv"
        with open(files[task], "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((text, label_of(rating)) for text, rating in rows)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--max-eval-examples", type=int, default=300)
    parser.add_argument("--work", default="runs/task-merge")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_task_data(work)

    for task, (template, _) in TASKS.items():
        if (work / task / "metrics.json").is_file() and "after" in (work / task / "metrics.json").read_text():
            print(f"{task}: reusing the adapter in {work / task}")
            continue
        argv = ["train", "--model", args.model, "--data", str(data[task]), "--prompt-template", template]
        argv += ["--max-steps", str(args.max_steps), "--max-eval-examples", str(args.max_eval_examples)]
        argv += ["--output", str(work / task), "--save-steps", str(args.max_steps)]
        train(build_parser().parse_args(argv))

    folder = model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    model = PeftModel.from_pretrained(load_model(folder, "causal-lm"), str(work / "sentiment"), "sentiment")
    model.load_adapter(str(work / "intensity"), "intensity")
    held_out = {}
    for task in TASKS:
        dataset = load_dataset(str(data[task]), "text", "label")
        held_out[task] = (split(dataset.examples, 0.1, 0)[1][: args.max_eval_examples], dataset.labels)

    results = []
    for number, (label, adapters, weights, options) in enumerate(MERGES):
        if not adapters:
            context = model.disable_adapter()
        else:
            name = adapters[0]
            if weights is not None:
                torch.manual_seed(0)  # DARE's random drop
                name = f"merge_{number}"
                model.add_weighted_adapter(adapters, weights, name, **options)
            model.set_adapter(name)
            context = torch.no_grad()
        scores = {}
        with context:
            for task, (template, _) in TASKS.items():
                rows, labels = held_out[task]
                metrics = evaluate(model, tokenizer, "causal-lm", rows, labels, template, 128)
                scores[task] = metrics["accuracy"]
        results.append({"merge": label, **scores})
        print(f"{label}: " + ", ".join(f"{t} {s:.3f}" for t, s in scores.items()), flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = len(held_out["sentiment"][0])
    print(f"\n| {args.model}, {rows} held-out reviews | sentiment accuracy | intensity accuracy | mean |")
    print("|---|---|---|---|")
    for result in results:
        mean = (result["sentiment"] + result["intensity"]) / 2
        print(f"| {result['merge']} | {result['sentiment']:.3f} | {result['intensity']:.3f} | {mean:.3f} |")


if __name__ == "__main__":
    main()
