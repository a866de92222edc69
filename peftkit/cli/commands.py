"""`peftkit eval`, `peftkit merge` and `peftkit inspect`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from ..composition import COMPOSITION_NAME
from ..config import CONFIG_NAME, TaskType
from ..peft_model import PeftModel, get_peft_model
from ..serialization import load_config
from ..targeting import is_linear, output_head_names, suggest_targets
from .data import load_dataset, split
from .metrics import evaluate
from .models import is_causal_lm, load_model, load_tokenizer, model_folder
from .train import FULL, RUN_FILE, build_configs, format_metrics, method_names


def read_run(adapter: Path) -> dict[str, Any]:
    """What `peftkit train` recorded about the run that made `adapter`; for an adapter made elsewhere, what
    its adapter_config.json tells (the task)."""
    if (adapter / RUN_FILE).is_file():
        return json.loads((adapter / RUN_FILE).read_text())
    if (adapter / CONFIG_NAME).is_file():
        task_type = load_config(str(adapter)).task_type
        task = {TaskType.CAUSAL_LM: "causal-lm", TaskType.SEQ_CLS: "classification"}.get(task_type)
        return {"task": task}
    if (adapter / "config.json").is_file():
        return {}
    raise FileNotFoundError(
        f"--adapter {str(adapter)!r} holds neither an adapter ({CONFIG_NAME}) nor a model (config.json)."
    )


def load_trained(
    args: argparse.Namespace, run: dict[str, Any], task: str, labels: list[str], quantized: bool = True
) -> tuple[nn.Module, Any]:
    """The model with `--adapter` applied (or the whole model saved there), and its tokenizer. The base is
    quantized as in training (QLoRA) where the run was and `quantized` allows."""
    adapter = Path(args.adapter)
    head_labels = labels if task == "classification" else None
    trust = args.trust_remote_code
    if (adapter / CONFIG_NAME).is_file():
        folder = model_folder(args.model or run.get("model") or _missing("--model"), trust, args.allow_pickle)
        bits = run.get("quantize") if quantized else None
        base = load_model(folder, task, head_labels, run.get("seed", 0), bits, trust)
        return PeftModel.from_composition(base, str(adapter)), load_tokenizer(folder, trust)
    model_folder(str(adapter), trust, args.allow_pickle)
    return load_model(adapter, task, head_labels, trust_remote_code=trust), load_tokenizer(adapter, trust)


def _missing(flag: str) -> Any:
    raise ValueError(f"{flag} is needed: the adapter folder does not record it.")


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    run = read_run(Path(args.adapter))
    columns = run.get("columns", {})
    data = args.data or run.get("data") or _missing("--data")
    dataset = load_dataset(
        data,
        args.text_column or columns.get("text") or "text",
        args.label_column or columns.get("label") or "label",
        args.prompt_column or columns.get("prompt"),
        args.response_column or columns.get("response"),
    )
    split_name = args.split or ("test" if data == run.get("data") else "all")
    rows = dataset.examples
    if split_name == "test":
        rows = split(rows, run.get("test_fraction", args.test_fraction), run.get("seed", args.seed))[1]
    rows = rows[: args.max_eval_examples]
    task = args.task or run.get("task")
    if task is None:  # a whole model, or an adapter saved without a task type: ask the model
        adapter = Path(args.adapter)
        has_adapter = (adapter / CONFIG_NAME).is_file()
        model = (args.model or _missing("--model")) if has_adapter else str(adapter)
        folder = model_folder(model, args.trust_remote_code, args.allow_pickle)
        task = "causal-lm" if is_causal_lm(folder, args.trust_remote_code) else "classification"
    labels = run.get("labels") or dataset.labels
    unknown = sorted({e.label for e in rows if e.label is not None} - set(labels))
    if unknown:
        raise ValueError(f"The data has labels the model was not trained on: {unknown}; it knows {labels}.")
    model, tokenizer = load_trained(args, run, task, labels)
    template = args.prompt_template or run.get("prompt_template") or dataset.prompt_template
    max_length = args.max_length or run.get("max_length", 128)
    labels = labels if dataset.has_labels else []
    metrics = evaluate(model, tokenizer, task, rows, labels, template, max_length, args.eval_batch_size)
    if args.json:
        print(json.dumps(metrics | {"examples": len(rows), "split": split_name}))
    else:
        print(f"{len(rows)} rows ({split_name}) of {data}: {format_metrics(metrics)}")
    return metrics


def run_merge(args: argparse.Namespace) -> None:
    """Fold the adapter into the base weights and save a plain transformers model (and its tokenizer); with
    several `--adapter`s, first combine them (`add_weighted_adapter`). With `--as-adapter`, save the combined
    adapter instead. Written beside `--output` and renamed into place, so a failure leaves nothing
    half-written."""
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; merge into a new folder.")
    adapters = [Path(a) for a in args.adapter]
    run = read_run(adapters[0])
    for adapter in adapters:
        if not (adapter / CONFIG_NAME).is_file():
            raise ValueError(f"--adapter {adapter} holds a whole model (--method {FULL}); nothing to merge.")
        if (len(adapters) > 1 or args.as_adapter) and (adapter / COMPOSITION_NAME).is_file():
            raise ValueError(
                f"--adapter {adapter} holds several adapters trained together (--method a+b); combining "
                "runs (and --as-adapter) takes one adapter from each. Merge that run on its own into a "
                "model, or pass its parts' folders."
            )
    task = run.get("task") or "causal-lm"
    labels = run.get("labels") or []
    # A QLoRA adapter is merged into the float32 base, not the 4-bit one: a plain model to load anywhere.
    first = argparse.Namespace(**{**vars(args), "adapter": str(adapters[0])})
    model, tokenizer = load_trained(first, run, task, labels, quantized=False)
    name = "default"
    if len(adapters) > 1 or args.as_adapter:
        names = ["default"] + [f"adapter_{i}" for i in range(1, len(adapters))]
        for adapter_name, adapter in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(str(adapter), adapter_name)
        name = "merged"
        model.add_weighted_adapter(
            names,
            merge_weights(args.weights, len(adapters)),
            name,
            combination_type=args.combination,
            svd_rank=args.svd_rank,
            density=args.density,
            majority_sign_method=args.majority_sign_method,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        if args.as_adapter:
            model.save_pretrained(str(partial), selected_adapters=[name])
            if (adapters[0] / RUN_FILE).is_file():  # so that `peftkit eval` knows the run's data and labels
                shutil.copy(adapters[0] / RUN_FILE, partial / name / RUN_FILE)
            written = partial / name
        else:
            merged = model.merge_and_unload(adapter_names=[name] if name != "default" else None)
            merged.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            written = partial
        if output.exists():
            output.rmdir()
        os.rename(written, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if args.as_adapter:
        print(f"merged adapter saved to {output}; score it with: peftkit eval --adapter {output}")
        return
    head = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForSequenceClassification"
    print(f"merged model saved to {output}; load it with transformers.{head}.from_pretrained('{output}')")


def merge_weights(text: str | None, count: int) -> list[float]:
    """`--weights 0.6,0.4` as floats, one per adapter; equal weights summing to 1 by default."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r} must be comma-separated numbers, e.g. 0.6,0.4.") from None
    if len(weights) != count:
        raise ValueError(
            f"--weights gives {len(weights)} numbers for {count} --adapter folders; give one each."
        )
    return weights


def brief_tree(module: nn.Module, name: str = "", depth: int = 0, max_depth: int = 6) -> list[str]:
    """The module tree, indented, with runs of blocks of one class (layers 0-5) shown once and leaves
    without parameters (dropout, activations) left out."""
    params = sum(p.numel() for p in module.parameters())
    lines = [f"{'  ' * depth}{name or '(model)'}: {type(module).__name__} ({params:,} parameters)"]
    if depth >= max_depth:
        return lines
    children = list(module.named_children())
    i = 0
    while i < len(children):
        child_name, child = children[i]
        run = 1
        while (
            child_name.isdigit()
            and i + run < len(children)
            and type(children[i + run][1]) is type(child)
            and children[i + run][0].isdigit()
        ):
            run += 1
        label = child_name if run == 1 else f"{child_name}-{children[i + run - 1][0]} (×{run}, each)"
        if any(True for _ in child.parameters()):
            lines += brief_tree(child, label, depth + 1, max_depth)
        i += run
    return lines


def linear_layers(model: nn.Module) -> list[str]:
    """Linear layers grouped by their short name: how many, and their shape (in → out)."""
    groups: dict[str, Counter] = {}
    heads = output_head_names(model)
    for full_name, module in model.named_modules():
        if is_linear(module):
            short = full_name.rsplit(".", 1)[-1]
            rows, columns = module.weight.shape  # Linear is (out, in); Conv1D is (in, out)
            shape = (columns, rows) if isinstance(module, nn.Linear) else (rows, columns)
            groups.setdefault(short, Counter())[(shape, full_name in heads)] += 1
    lines = []
    for short, shapes in groups.items():
        for (shape, head), count in shapes.items():
            where = " (output head)" if head else ""
            lines.append(f"  {short:<16} ×{count:<3} {shape[0]} → {shape[1]}{where}")
    return lines


def run_inspect(args: argparse.Namespace) -> None:
    trust = args.trust_remote_code
    folder = model_folder(args.model, trust, args.allow_pickle)
    task = args.task or ("causal-lm" if is_causal_lm(folder, trust) else "classification")
    labels = [str(i) for i in range(args.num_labels)]
    model = load_model(folder, task, labels if task == "classification" else None, trust_remote_code=trust)
    print(f"{args.model} ({folder}), loaded for {task}")
    print("\n".join(brief_tree(model, max_depth=args.depth)))
    print("\nlinear layers by name (count, in → out):")
    print("\n".join(linear_layers(model)))
    targets = suggest_targets(model)
    total = sum(p.numel() for p in model.parameters())
    if args.method == FULL:
        print(f'\nsuggested target_modules: {targets}  (or "all-linear")')
        print(f"\n--method {FULL}: trainable parameters {total:,} of {total:,} (100%)")
        return
    configs = build_configs(args, task, total_steps=1000)
    peft_model = get_peft_model(model, configs["default"])
    for name, config in list(configs.items())[1:]:
        peft_model.add_adapter(name, config)
    peft_model.set_adapter(list(configs))
    heads = {m.rsplit(".", 1)[-1] for m in peft_model.peft_config["default"].modules_to_save or []}
    suggested = [t for t in targets if t not in heads]  # a task head is trained whole, not adapted
    print(f'\nsuggested target_modules: {suggested}  (or "all-linear")')
    trainable, total = peft_model.get_nb_trainable_parameters()
    targets_of = {
        method: re.sub(r"\s+", " ", str(getattr(config, "target_modules", None)))
        for method, config in zip(method_names(args.method), peft_model.peft_config.values(), strict=True)
    }
    shown = ", ".join(f"{m} {t}" for m, t in targets_of.items())
    shown = shown if len(targets_of) > 1 else targets_of[args.method]
    print(
        f"\n--method {args.method} (target_modules {shown}): trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.4f}%)"
    )
