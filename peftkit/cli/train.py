"""`peftkit train`: fine-tune a model with any method on transformers' Trainer, with checkpoints and resume.

The run folder (`--output`) ends up holding the adapter in Hugging Face peft's layout (or, for `--method
full`, the whole model), `peftkit_run.json` (task, label names, how the data was read: what `peftkit eval`
needs to score it again), `metrics.json`, and `checkpoints/` for `--resume`. Under `torchrun` it runs as
DDP (gloo on CPU): the global batch is `--batch-size` × processes × `--grad-accum`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from ..composition import COMPOSITION_NAME, adapter_directory
from ..config import CONFIG_NAME, PeftConfig, TaskType, atomic_write
from ..peft_model import PeftModel, get_peft_model
from ..quantization import prepare_model_for_kbit_training
from ..registry import METHODS, method_for
from ..serialization import WEIGHTS_NAME, adapter_parameters, load_adapter_weights, read_weights
from .data import (
    Collator,
    Dataset,
    LengthGroupedOrder,
    causal_lm_features,
    classification_features,
    hold_out,
    load_dataset,
    require_classes,
    split,
)
from .metrics import evaluate, mean_loss
from .models import DEMO_DEFAULTS, is_causal_lm, load_model, load_tokenizer, model_folder
from .schedule import MAX_VALIDATION_ROWS, plan, validation_rows

RUN_FILE = "peftkit_run.json"
TRAINING_STATE = "training_state.safetensors"
TRAINER_FILE = "peftkit_trainer.json"  # in each checkpoint: the running total of the training loss
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
STAGING = ".partial"  # under checkpoints/: a checkpoint being written, renamed into place once whole
OUTPUT_LOCK = ".peftkit.lock"
MODEL_ADAPTER_STATE = "model_adapter_state:"  # key prefix of model adapters' running state in TRAINING_STATE
METRICS_FILE = "metrics.json"
# metrics.json's figures of the machine rather than of the run: they differ between identical runs.
MACHINE_FIGURES = ("elapsed_seconds", "train_seconds", "seconds_per_step", "peak_memory_bytes")
FULL = "full"
FULL_WARMUP_FRACTION = 0.06  # full fine-tuning's warm-up share (each method's is its config's)
FULL_LEARNING_RATE = 2e-5
# Flags for the options most methods share; each maps to the config field of that name or alias.
METHOD_FLAGS = ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens")


class TrainingStopped(RuntimeError):
    """Training stopped on a fault it cannot go past (a loss or gradient that is no longer finite, another
    process of the run gone); the message names the step or process and what was kept."""


def method_choices() -> dict[str, type[PeftConfig] | None]:
    """Every registered method by its command-line name ("PREFIX_TUNING" is "prefix-tuning"), and "full"."""
    choices = {t.lower().replace("_", "-"): m.config_class for t, m in sorted(METHODS.items())}
    return choices | {FULL: None}


def parse_value(text: str) -> Any:
    """A command-line value as JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_names(spec: str) -> list[str]:
    """`--method lora+bottleneck` as its methods, each a name `method_choices` knows, each once."""
    names = [n.strip() for n in spec.split("+")]
    choices = method_choices()
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"--method {spec}: {unknown} unknown; choose from {', '.join(choices)}, joined by +")
    if len(names) > 1 and (FULL in names or len(set(names)) < len(names)):
        raise ValueError(
            f"--method {spec}: join different methods, each once, and not {FULL} (it trains every weight)."
        )
    return names


def target_list(value: Any) -> Any:
    """A `target_modules` value as the flag takes it: comma-separated names, or "all-linear"."""
    if isinstance(value, str) and value != "all-linear":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def method_options(config_class: type[PeftConfig], method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line for `method`: the shared flags and `--set KEY=VALUE`,
    where the method has the option (one method alone takes every one, and its config names what is wrong),
    and every `--set METHOD.KEY=VALUE` for this method."""
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    alone = "+" not in args.method

    def field(key: str) -> str | None:
        name = key if key in fields else config_class.option_aliases.get(key)
        return name if name in fields else None

    options: dict[str, Any] = {}
    for flag in METHOD_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        if field(flag) is None:
            if alone:
                raise ValueError(f"--{flag.replace('_', '-')} is not an option of --method {args.method}.")
            continue
        options[field(flag)] = target_list(value) if flag == "target_modules" else value
    for scope, key, value in set_options(args):
        if scope not in (None, method) or (scope is None and not alone and field(key) is None):
            continue
        name = field(key) or key
        options[name] = target_list(value) if name == "target_modules" else value
    return options


def set_options(args: argparse.Namespace) -> list[tuple[str | None, str, Any]]:
    """Every `--set [METHOD.]KEY=VALUE` as (METHOD or None, KEY, value)."""
    found = []
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write it as KEY=VALUE, for example --set use_dora=true.")
        scope, dot, name = key.rpartition(".")
        found.append((scope if dot else None, name, parse_value(value)))
    return found


def build_configs(args: argparse.Namespace, task: str, total_steps: int) -> dict[str, PeftConfig]:
    """One config per method of `--method` (several joined by '+'), by adapter name: the first method is
    "default" (saved at the top level), each other one is named after its method."""
    names = method_names(args.method)
    unplaced = [s for s, _, _ in set_options(args) if s is not None and s not in names]
    if unplaced:
        raise ValueError(f"--set {unplaced[0]}.KEY=...: {unplaced[0]!r} is not in --method {args.method}.")
    task_type = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS
    configs, taken = {}, set()
    for i, method in enumerate(names):
        config_class = method_choices()[method]
        options = method_options(config_class, method, args)
        taken |= set(options)
        try:
            options = config_class.training_defaults(total_steps) | options
            config = config_class(task_type=task_type, **options)
        except TypeError as error:  # an option the config does not have: the message names the close ones
            raise ValueError(f"--method {method}: {error}") from None
        configs["default" if i == 0 else method] = config
    if len(names) > 1:
        given = [f for f in METHOD_FLAGS if getattr(args, f) is not None]
        given += [k for _, k, _ in set_options(args)]
        aliases = {a: f for c in map(type, configs.values()) for a, f in c.option_aliases.items()}
        stray = [k for k in given if k not in taken and aliases.get(k) not in taken]
        if stray:
            raise ValueError(f"{stray[0]!r} is an option of none of --method {args.method}'s methods.")
    return configs


def infer_task(requested: str | None, dataset: Dataset, causal: bool) -> str:
    """classification for labelled data on a model without a language-model head; causal-lm for a causal
    LM (labels then become the answer it should give) and for unlabelled text or prompt/response pairs."""
    if requested:
        if requested == "classification" and not dataset.has_labels:
            raise ValueError(
                "--task classification needs a label column; the data has none (--label-column)."
            )
        return requested
    if dataset.has_labels and not causal:
        return "classification"
    if not causal:
        raise ValueError(
            "This data has no labels, so the task is causal-lm, but the model has no language-model head. "
            "Pass --label-column for classification, or a causal LM (--model smollm2)."
        )
    return "causal-lm"


class AdapterTrainer(Trainer):
    """transformers' Trainer whose checkpoints hold the adapter (peft's files), not the base model, plus
    TRAINING_STATE, which resuming loads: every trainable tensor as it is in training and the model
    adapters' running state (AdaLoRA's importance scores).

    It also guards the run: a step whose loss or gradient is not finite stops before its update, no
    checkpoint or adapter of non-finite weights is written, and a checkpoint appears whole or not at all."""

    def __init__(
        self,
        *args: Any,
        learning_rates: dict[str, float] | None = None,
        validate: Callable[[], float] | None = None,
        patience: int = 0,
        train_order: torch.utils.data.Sampler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_order = train_order  # None: the Trainer's own shuffling
        self.learning_rates = learning_rates or {}
        self.loss_total = 0.0  # the sum of every optimizer step's loss, kept in checkpoints
        self.staging: str | None = None
        self.validate = validate  # the validation slice's loss, measured at each checkpoint
        self.patience = patience
        self.validation: list[dict[str, float]] = []  # {"step", "loss"} per checkpoint, kept in checkpoints
        self.stopped_early = False

    @property
    def best_step(self) -> int | None:
        """The step of the lowest validation loss so far (the earliest among equals), None without one."""
        if not self.validation:
            return None
        return int(min(self.validation, key=lambda v: (v["loss"], v["step"]))["step"])

    def record_validation(self) -> None:
        """Measure the validation loss at this step; stop training after `patience` passes in a row that
        did not improve on the best."""
        loss = self.validate()
        if not math.isfinite(loss):
            raise self.stopped(f"at step {self.state.global_step}, the validation loss is {loss}", "there")
        self.validation.append({"step": self.state.global_step, "loss": loss})
        since_best = sum(v["step"] > self.best_step for v in self.validation)
        if self.patience and since_best >= self.patience and self.state.global_step < self.state.max_steps:
            self.stopped_early = True
            self.control.should_training_stop = True

    def restore_best(self) -> None:
        """Put back the trainable weights of the best checkpoint, when it is not the last step's."""
        best = self.best_step
        if best is None or best == self.state.global_step:
            return
        folder = Path(super()._get_output_dir(None)) / f"checkpoint-{best}"
        self.load_weights(str(folder), self.model)

    @property
    def train_loss(self) -> float:
        """The mean loss over every optimizer step of the run, resumed or not (the Trainer's own counts only
        the steps of its last `train()` call); under DDP, the mean over the processes."""
        total = torch.tensor(self.loss_total, dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            total /= torch.distributed.get_world_size()
        return total.item() / max(self.state.global_step, 1)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        """The Trainer's step, stopped before the optimizer update when the loss or a gradient is not finite
        (the Trainer would otherwise leave NaN out of its logs and go on), on every process at once."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        faults = torch.tensor([not torch.isfinite(loss).item(), False], dtype=torch.float32)
        if grads:
            faults[1] = not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(faults, op=torch.distributed.ReduceOp.MAX)
        if faults.any():
            what = f"the loss is {loss.item()}" if faults[0] else "a gradient is not finite"
            raise self.stopped(f"at step {self.state.global_step + 1}, {what}", "before its update")
        self.loss_total += loss.item()
        return loss

    def stopped(self, fault: str, when: str) -> TrainingStopped:
        checkpoints = Path(self._get_output_dir(None))
        kept = last_checkpoint(checkpoints, announce=False)
        where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written yet"
        return TrainingStopped(
            f"Training stopped: {fault}. It stopped {when}; {where}. Lower --lr (it is "
            f"{self.args.learning_rate:g}) and train again with another --output."
        )

    def check_finite_weights(self, when: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            fault = f"step {self.state.global_step} left weights that are not finite ({', '.join(bad[:3])})"
            raise self.stopped(fault, when)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        return self.train_order or super()._get_train_sampler(train_dataset)

    def _get_output_dir(self, trial: Any) -> str:
        return self.staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into checkpoints/.partial and renamed into place once whole (a
        kill mid-write leaves no checkpoint that `--resume` would pick), and never of non-finite weights;
        then the oldest checkpoints beyond `save_total_limit` are moved aside and deleted."""
        self.check_finite_weights("without writing a checkpoint of them")
        run_dir = Path(super()._get_output_dir(trial))
        staging, name = run_dir / STAGING, f"checkpoint-{self.state.global_step}"
        self.staging = str(staging)
        if self.validate is not None and self.state.global_step not in [v["step"] for v in self.validation]:
            self.record_validation()
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                tally = {"loss_total": self.loss_total, "validation": self.validation}
                write_json(staging / name / TRAINER_FILE, tally | {"stopped_early": self.stopped_early})
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(staging, ignore_errors=True)
            raise OSError(
                f"could not write {name} in {run_dir} ({' '.join(str(error).split())}); the checkpoints "
                "before it are unchanged. Free some space and pass --resume to continue."
            ) from error
        finally:
            self.staging = None
        if torch.distributed.is_initialized():  # every process wrote its random state into the staging folder
            torch.distributed.barrier()
        if self.args.should_save:
            if (run_dir / name).exists():  # an incomplete checkpoint of this step that resuming skipped
                os.replace(run_dir / name, staging / f"{name}.replaced")
            os.replace(staging / name, run_dir / name)
            best = f"checkpoint-{self.best_step}"
            for old in checkpoint_folders(run_dir)[: -self.args.save_total_limit]:
                if old.name != best:  # the best checkpoint stays until training ends
                    os.replace(old, staging / old.name)
            shutil.rmtree(staging)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with one parameter group per adapter at its own learning rate when the
        model combines several methods."""
        peft_model = self.accelerator.unwrap_model(model or self.model)
        if self.optimizer is None and len(self.learning_rates) > 1:
            optimizer_class, options = self.get_optimizer_cls_and_kwargs(self.args, peft_model)
            groups, seen = [], set()
            for name, lr in self.learning_rates.items():
                params = [p for p in adapter_parameters(peft_model, name) if p.requires_grad]
                params = [p for p in params if id(p) not in seen]
                seen |= {id(p) for p in params}
                groups.append({"params": params, "lr": lr})
            self.optimizer = optimizer_class(groups, **options)
        return super().create_optimizer(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            for name, adapter in model.model_adapters.items():
                running = adapter.training_state()
                state |= {f"{MODEL_ADAPTER_STATE}{name}:{key}": t.contiguous() for key, t in running.items()}
            save_file(state, os.path.join(output_dir, TRAINING_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        tally = Path(resume_from_checkpoint) / TRAINER_FILE
        if tally.is_file():
            kept = json.loads(tally.read_text())
            self.loss_total = kept["loss_total"]
            self.validation = kept.get("validation", [])
            self.stopped_early = kept.get("stopped_early", False)
        self.load_weights(resume_from_checkpoint, model)

    def load_weights(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The checkpoint's trainable weights, and its model adapters' running state, into the model."""
        model = self.accelerator.unwrap_model(model or self.model)
        if not isinstance(model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = os.path.join(resume_from_checkpoint, TRAINING_STATE)
        if not os.path.isfile(state):  # a checkpoint with the adapter files only
            load_adapter_weights(model, model.active_adapter, read_weights(resume_from_checkpoint))
            return
        saved = load_file(state)
        running: dict[str, dict[str, torch.Tensor]] = {name: {} for name in model.model_adapters}
        for key in [k for k in saved if k.startswith(MODEL_ADAPTER_STATE)]:
            name, _, inner = key.removeprefix(MODEL_ADAPTER_STATE).partition(":")
            running.setdefault(name, {})[inner] = saved.pop(key)
        for name, tensors in running.items():
            model.model_adapters[name].load_training_state(tensors)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing, extra = sorted(trainable.keys() - saved.keys()), sorted(saved.keys() - trainable.keys())
        reshaped = [n for n in trainable.keys() & saved.keys() if trainable[n].shape != saved[n].shape]
        if missing or extra or reshaped:
            raise ValueError(
                f"{state} does not match this run's trainable tensors; were the method's options changed? "
                f"Missing {missing[:3]}, extra {extra[:3]}, other shape {sorted(reshaped)[:3]}. Resume with "
                "the options the run started with."
            )
        with torch.no_grad():
            for name, tensor in trainable.items():
                tensor.copy_(saved[name])


class LossProgressBar(TrainerCallback):
    """A progress bar over optimizer steps with the latest loss and learning rate beside it (transformers'
    own bar prints the logs as dictionaries between its lines instead)."""

    bar = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line (also when training stops on an error, before the error is printed)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class KeepBest(TrainerCallback):
    """At the end of training, before the methods' own end-of-training work (diff pruning's projection),
    put back the weights of the checkpoint with the lowest validation loss."""

    trainer: AdapterTrainer | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is not None:
            self.trainer.restore_best()


def peak_memory_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports it in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The `checkpoint-<step>` folders in `checkpoints`, oldest first."""
    found = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def is_whole_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint holds the Trainer's state (written last) and the weights to resume from."""
    weights = (TRAINING_STATE, "model.safetensors")
    return (folder / TRAINER_STATE).is_file() and any((folder / n).is_file() for n in weights)


def last_checkpoint(checkpoints: Path, announce: bool = True) -> Path | None:
    """The newest whole checkpoint in `checkpoints`, saying which incomplete ones it passes over (peftkit
    renames a checkpoint into place once written; another tool's copy may lack files)."""
    for folder in reversed(checkpoint_folders(checkpoints)):
        if is_whole_checkpoint(folder):
            return folder
        if announce:
            print(f"{folder} is incomplete (no {TRAINER_STATE} or weights); resuming from an earlier one")
    return None


def finished(checkpoint: Path, total_steps: int) -> bool:
    """Whether a checkpoint was written after the run's last optimizer step, or when it stopped early."""
    tally = checkpoint / TRAINER_FILE
    if tally.is_file() and json.loads(tally.read_text()).get("stopped_early"):
        return True
    return json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"] >= total_steps


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the run folder for this run: another `peftkit train` into it is refused while this one lives.
    The lock is the operating system's (flock on OUTPUT_LOCK), so a killed run never leaves it held."""
    import fcntl

    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    with open(output / OUTPUT_LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"--output {output} is in use by another peftkit train ({holder}). Wait for it to end, or "
                "pass another --output."
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            if created and [p.name for p in output.iterdir()] == [OUTPUT_LOCK]:  # refused before writing
                shutil.rmtree(output)


def remove_leftovers(output: Path) -> None:
    """Delete what an interrupted run left half-written: a checkpoint being staged, and the temporary files
    of writes that never reached their rename (`atomic_write`)."""
    staging = output / "checkpoints" / STAGING
    if staging.exists():
        print(f"removing {staging}, a checkpoint an interrupted run did not finish")
        shutil.rmtree(staging)
    for partial in [*output.glob("*.tmp"), *output.glob("*/*.tmp")]:
        partial.unlink()


def folder_size(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def write_json(path: Path, data: Any) -> None:
    atomic_write(str(path), (json.dumps(data, indent=2) + "\n").encode())


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if k != "perplexity" else f"{k} {v:.2f}" for k, v in metrics.items())


def refuse_fsdp() -> None:
    """`--fsdp` is refused with the reason it cannot run (tests/cli/test_fsdp.py pins that reason)."""
    raise ValueError(
        "--fsdp is not available: transformers' Trainer shards a model only on GPU-type devices (accelerate "
        f"{importlib.metadata.version('accelerate')} turns FSDP on for CUDA, XPU, NPU and the like; on CPU "
        "processes it trains DDP instead, and `accelerate launch --cpu` with an FSDP config starts one "
        "process), and peftkit does not gather sharded adapter tensors to save them. Leave out --fsdp: under "
        "torchrun every process holds the whole model and DDP splits each batch across them."
    )


def lost_peer(error: RuntimeError, checkpoints: Path) -> TrainingStopped | None:
    """The stop to report when a collective fails because another process of the run is gone (killed, out of
    memory, its machine lost): gloo's "Connection reset by peer", NCCL's DistBackendError; else None."""
    text = str(error)
    if not isinstance(error, torch.distributed.DistError) and "gloo" not in text:
        return None
    reason = text.split("] ", 1)[-1].split(". ", 1)[0]  # gloo: "[file:line] Read error ...: Connection ..."
    kept = last_checkpoint(checkpoints, announce=False)
    where = f"The last checkpoint is {kept}" if kept else "No checkpoint was written yet"
    return TrainingStopped(
        f"Process {os.environ.get('RANK', '0')} lost another process of this run ({reason}); the launcher's "
        f"summary names which one stopped and how. {where}: run the same command with --resume to continue."
    )


def apply_demo_defaults(args: argparse.Namespace, announce: bool) -> None:
    """A built-in model's run length (DEMO_DEFAULTS) for the options the user left unset."""
    chosen = {k: v for k, v in DEMO_DEFAULTS.get(args.model, {}).items() if getattr(args, k) is None}
    for option, value in chosen.items():
        setattr(args, option, value)
    if chosen and announce:
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items())
        print(f"{args.model} demo settings: {shown} (set them to change)")


def train(args: argparse.Namespace, callbacks: list | None = None) -> dict[str, Any]:
    """Run `peftkit train`; returns what it writes to metrics.json. `callbacks` are extra TrainerCallbacks.

    The main process holds the run folder (`output_lock`) from start to end."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    with output_lock(Path(args.output)) if main_process else contextlib.nullcontext():
        return _train(args, callbacks, main_process)


def _train(args: argparse.Namespace, callbacks: list | None, main_process: bool) -> dict[str, Any]:
    started = time.perf_counter()
    train_seconds = 0.0  # in trainer.train, this call (a resumed run counts its own part)
    output = Path(args.output)
    checkpoints = output / "checkpoints"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp:
        refuse_fsdp()
    if main_process:
        remove_leftovers(output)
    resume_from = last_checkpoint(checkpoints, announce=main_process) if args.resume else None
    if args.resume and resume_from is None:
        if not (output / METRICS_FILE).is_file():
            raise ValueError(f"--resume: no checkpoint in {checkpoints}; start the run without --resume.")
        if main_process:
            print(f"no checkpoint in {checkpoints} yet: the run starts from the beginning")
    if not args.resume and checkpoint_folders(checkpoints):
        raise ValueError(
            f"{output} already holds a run's checkpoints. Pass --resume to continue it, or another --output."
        )

    apply_demo_defaults(args, announce=main_process)
    folder = model_folder(args.model, args.trust_remote_code, args.allow_pickle)
    trust = args.trust_remote_code
    dataset = load_dataset(
        args.data, args.text_column, args.label_column, args.prompt_column, args.response_column
    )
    task = infer_task(args.task, dataset, is_causal_lm(folder, trust))
    require_classes(dataset, task)
    train_rows, test_rows = split(dataset.examples, args.test_fraction, args.seed)
    train_rows = train_rows[: args.max_train_examples]
    test_rows = test_rows[: args.max_eval_examples]
    cap = MAX_VALIDATION_ROWS if args.max_validation_examples is None else args.max_validation_examples
    held = validation_rows(len(train_rows), args.validation_fraction, cap)
    valid_rows: list = []
    if held:  # the same texts never on both sides, as in the held-out split
        train_rows, valid_rows = hold_out(train_rows, held, args.seed + 1)
    labels = dataset.labels
    template = args.prompt_template or dataset.prompt_template
    tokenizer = load_tokenizer(folder, trust)

    def featurize(rows: list) -> list:
        if not rows:
            return []
        if task == "classification":
            return classification_features(rows, tokenizer, labels, args.max_length)
        return causal_lm_features(rows, tokenizer, template, args.max_length)

    features, valid = featurize(train_rows), featurize(valid_rows)

    global_batch = args.batch_size * world * args.grad_accum
    batches = math.ceil(len(features) / (args.batch_size * world))  # per process and epoch
    steps_per_epoch = max(1, math.ceil(batches / args.grad_accum))  # as the Trainer counts them
    first = method_choices()[method_names(args.method)[0]]
    schedule = plan(
        len(features),
        global_batch,
        steps_per_epoch,
        args.epochs,
        args.max_steps,
        args.save_steps,
        first.default_warmup_fraction if first else FULL_WARMUP_FRACTION,
        len(valid),
        args.patience,
    )
    total_steps = schedule.total_steps

    set_seed(args.seed)
    head_labels = labels if task == "classification" else None
    model = load_model(folder, task, head_labels, args.seed, args.quantize, trust)
    if args.quantize:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    learning_rates: dict[str, float] = {}  # by adapter; each method trains at its own rate unless --lr
    if args.method != FULL:
        configs = build_configs(args, task, total_steps)
        model = get_peft_model(model, configs["default"])
        for name, config in list(configs.items())[1:]:
            model.add_adapter(name, config)
        model.set_adapter(list(configs))
        extra = [c for config in configs.values() for c in method_for(config).training_callbacks(config)]
        learning_rates = {n: args.lr or type(c).default_learning_rate for n, c in configs.items()}
        learning_rate = learning_rates["default"]
    else:
        extra, learning_rate = [], args.lr or FULL_LEARNING_RATE
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    run = {
        "task": task,
        "labels": labels if dataset.has_labels else [],
        "prompt_template": template,
        "model": args.model,
        "data": args.data,
        "columns": {
            "text": args.text_column,
            "label": args.label_column,
            "prompt": args.prompt_column,
            "response": args.response_column,
        },
        "max_length": args.max_length,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "method": args.method,
        "quantize": args.quantize,
        "batch_order": args.batch_order,
    }
    metrics_path = output / METRICS_FILE
    previous = json.loads(metrics_path.read_text()) if resume_from and metrics_path.is_file() else {}
    if main_process:
        rows = f"{len(train_rows)} training and {len(test_rows)} held-out rows"
        print(f"{args.method} on {args.model} ({task}), {rows}")
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
        rates = f"{learning_rate:g}"
        if len(learning_rates) > 1:
            methods = method_names(args.method)
            rates = ", ".join(f"{lr:g} ({m})" for lr, m in zip(learning_rates.values(), methods, strict=True))
        for line in schedule.describe():
            print(line)
        print(f"learning rate {rates}")
        order = "rows of like length, shuffled by step" if args.batch_order == "length" else "shuffled rows"
        print(f"batches: {order} (--batch-order {args.batch_order})")
    before = previous.get("before")
    if before is None and main_process:
        before = evaluate(
            model, tokenizer, task, test_rows, labels, template, args.max_length, args.eval_batch_size
        )
        output.mkdir(parents=True, exist_ok=True)
        write_json(metrics_path, {"before": before})
    if main_process:
        print(f"held-out before training: {format_metrics(before)}")

    training_args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=learning_rate,
        max_steps=total_steps,
        warmup_steps=schedule.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=schedule.eval_every,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        torch_compile=bool(args.compile),
        torch_compile_backend=args.compile,
    )
    trainer = AdapterTrainer(
        model=model,
        learning_rates=learning_rates,
        args=training_args,
        train_dataset=features,
        data_collator=Collator(tokenizer.pad_token_id),
        validate=(lambda: mean_loss(model, valid, tokenizer.pad_token_id, args.eval_batch_size))
        if valid
        else None,
        patience=schedule.patience,
        train_order=LengthGroupedOrder([len(f["input_ids"]) for f in features], global_batch, args.seed)
        if args.batch_order == "length"
        else None,
        callbacks=[progress := LossProgressBar(), keep_best := KeepBest(), *extra, *(callbacks or [])],
    )
    keep_best.trainer = trainer
    for unwanted in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(unwanted)
    # The Trainer passes num_items_in_batch to any forward taking **kwargs and then, under DDP, multiplies
    # the loss by the number of processes. Causal LM losses divide by it; a classifier's mean loss ignores
    # it, so there the scaling would double the gradient on 2 processes (and change clipping).
    trainer.model_accepts_loss_kwargs = task == "causal-lm"
    try:
        if resume_from and finished(resume_from, total_steps):  # the Trainer would train one step too many
            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = TrainerState.load_from_json(str(resume_from / TRAINER_STATE))
            trainer.restore_best()
        else:
            training_started = time.perf_counter()
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            train_seconds = time.perf_counter() - training_started
    except RuntimeError as error:
        stop = lost_peer(error, checkpoints) if world > 1 else None
        if stop is None:
            raise
        raise stop from error
    finally:
        progress.close()
    trainer.check_finite_weights("without saving them")
    train_loss = trainer.train_loss
    steps_run = trainer.state.global_step - (int(resume_from.name[11:]) if resume_from else 0)

    try:
        if not main_process:
            return {}
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(output))
        if args.method == FULL:
            tokenizer.save_pretrained(str(output))
            run_files = {RUN_FILE, METRICS_FILE}
            saved = [p.name for p in output.iterdir() if p.is_file() and p.name not in run_files]
        else:
            saved = [
                str(Path(adapter_directory("", name)) / file)
                for name in model.peft_config
                for file in (CONFIG_NAME, WEIGHTS_NAME)
            ] + ([COMPOSITION_NAME] if len(model.peft_config) > 1 else [])
        write_json(output / RUN_FILE, run)
        after = evaluate(
            model, tokenizer, task, test_rows, labels, template, args.max_length, args.eval_batch_size
        )
        size = folder_size(output, saved)
        metrics = {
            "before": before,
            "after": after,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "optimizer_steps": trainer.state.global_step,
            "train_loss": train_loss,
            "saved_bytes": size,
            "train_rows": len(train_rows),
            "validation_rows": len(valid_rows),
            "held_out_rows": len(test_rows),
            "schedule": schedule.as_dict(),
            "validation": trainer.validation,
            "best_step": trainer.best_step or trainer.state.global_step,
            "stopped_early": trainer.stopped_early,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / steps_run, 4) if steps_run > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(),
            "elapsed_seconds": round(time.perf_counter() - started, 1),
        }
        write_json(metrics_path, metrics)
        if trainer.validation:
            best = min(trainer.validation, key=lambda v: (v["loss"], v["step"]))
            end = f"stopped early at step {trainer.state.global_step}" if trainer.stopped_early else "kept"
            print(f"best validation loss {best['loss']:.4f} at step {best['step']} ({end})")
        print(f"held-out after training:  {format_metrics(after)}")
        what = "model" if args.method == FULL else "adapter"
        print(f"{what} saved to {output}: {size / 1024:,.0f} KiB ({', '.join(saved)})")
        print(f"elapsed: {metrics['elapsed_seconds']:.0f} s")
        return metrics
    finally:
        if torch.distributed.is_initialized():  # the ranks leave together, once rank 0 has written the run
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
