"""Run by test_ddp.py under torchrun: `peftkit train` with every rank saving the adapter it ends with."""

from __future__ import annotations

import os
import sys

from safetensors.torch import save_file
from transformers import TrainerCallback

from peftkit.cli import build_parser
from peftkit.cli.train import train


class SaveEveryRank(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(args.output_dir, f"rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    train(build_parser().parse_args(sys.argv[1:]), callbacks=[SaveEveryRank()])
