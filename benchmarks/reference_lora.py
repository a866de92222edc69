"""The 30-line reference `peftkit train`'s defaults are measured against (issue 12): Hugging Face peft's LoRA
(its defaults: r=8, alpha=8, query and value) on MiniLM-L6 in a plain loop, 2 epochs of AdamW at lr 1e-3,
batch 32. It trains on every training row of peftkit's split and scores the same held-out rows.

    python benchmarks/reference_lora.py --data my.csv [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from peftkit.cli.data import Collator, classification_features, load_dataset, split  # noqa: E402
from peftkit.cli.metrics import classifier_metrics  # noqa: E402
from peftkit.cli.models import minilm  # noqa: E402


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", default="movie-reviews")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    dataset = load_dataset(args.data)
    train_rows, test_rows = split(dataset.examples, 0.1, args.seed)  # peftkit train's split
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(dataset.labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    features = classification_features(train_rows, tokenizer, dataset.labels, 128)
    collate, order = Collator(tokenizer.pad_token_id), random.Random(args.seed)
    model.train()
    for _ in range(2):
        order.shuffle(features)
        for start in range(0, len(features), 32):
            loss = model(**collate(features[start : start + 32])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    train_seconds = time.perf_counter() - started
    model.eval()
    metrics = classifier_metrics(model, tokenizer, test_rows, dataset.labels, 128, 64)
    result = {"data": args.data, "seed": args.seed, "train_rows": len(train_rows), **metrics}
    result["seconds"] = round(train_seconds, 1)
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
