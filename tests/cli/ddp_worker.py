"""Run by test_ddp.py and test_fsdp.py under torchrun: `peftkit train` with every rank saving the adapter it
ends with.

`ddp_worker.py [--sigkill RANK:STEP] train ...` SIGKILLs rank RANK once STEP optimizer steps are done
(before that step's checkpoint), and has the other ranks ignore torchrun's SIGTERM so that they stop, and say
why, on their own; `ddp_worker.py fsdp-probe FILE` asks transformers' Trainer for FSDP on this launch and
writes to FILE what it set up instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# Hugging Face peft, installed for the cross-checks only, hidden as on a user's machine: transformers then
# skips importing it (and bitsandbytes, torch's compiler), a third of every process's start, and peftkit
# would fail here if it imported peft.
sys.modules["peft"] = None  # type: ignore[assignment]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's peftkit, wherever installed

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from peftkit.cli import build_parser  # noqa: E402
from peftkit.cli.train import train  # noqa: E402


class SaveEveryRank(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(args.output_dir, f"rank{os.environ.get('RANK', '0')}.safetensors"))


class SigKill(TrainerCallback):
    """Kills rank `rank` the way the kernel's OOM killer or a lost node would: no cleanup, no message. The
    others ignore SIGTERM: torchrun sends it as soon as it sees the death, which could cut their own report
    short (it waits 30 s for them before it kills them)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_begin(self, args, state, control, **kwargs):
        if int(os.environ.get("RANK", "0")) != self.rank:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def fsdp_probe(file: str) -> None:
    """The Trainer asked for FSDP2 on a tiny BERT with a LoRA adapter: the distributed type accelerate chose,
    whether the Trainer thinks FSDP is on, and what it wrapped the model in for training."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from peftkit.methods.lora import LoraConfig
    from peftkit.peft_model import get_peft_model

    config = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(task_type="SEQ_CLS", r=4))
    rows = [{"input_ids": torch.arange(3, 11), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(
        output_dir=os.path.dirname(file),
        fsdp=True,
        fsdp_config={"version": 2},
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    if args.process_index == 0:
        found = {
            "world_size": args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "is_fsdp_enabled": trainer.is_fsdp_enabled,
            "wrapped_in": type(trainer.model_wrapped).__name__,
        }
        Path(file).write_text(json.dumps(found))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "fsdp-probe":
        fsdp_probe(argv[1])
        sys.exit(0)
    callbacks: list[TrainerCallback] = [SaveEveryRank()]
    if argv[0] == "--sigkill":
        rank, step = map(int, argv[1].split(":"))
        callbacks.append(SigKill(rank, step))
        argv = argv[2:]
    train(build_parser().parse_args(argv), callbacks=callbacks)
