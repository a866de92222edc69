"""torch.compile: peftkit against Hugging Face peft, both compiled side by side in one process.

    python benchmarks/compiled.py [--rounds 10] [--warmup 2] [--threads 2] [--backend inductor]
                                  [--json compiled.json]

The model, adapters, batches and AdamW are benchmarks/speed.py's (the 33.5M-parameter Llama, LoRA r=16,
alpha 32 on every linear layer but the head, training batches 4 x 128, inference 16 x 64, fused AdamW).
Each library's LoRA and DoRA model is compiled with `torch.compile(model)` (default mode, the inductor
backend); its eager step runs the same model object uncompiled, so both see the same weights.

Figures (the goal is peftkit's):
* graph breaks in the training forward (`torch._dynamo.explain`), each library;
* compile time: the first compiled training step (forward and backward compiled), in seconds;
* the compiled LoRA training step, peftkit ÷ peft;
* the compiled DoRA training step ÷ the compiled LoRA step, each library;
* compiled ÷ eager training step, LoRA and DoRA, each library;
* compiled inference with the adapter unmerged ÷ the same adapter merged (`merge_and_unload`, compiled).

Timing is speed.py's: configurations run in the same rounds, one step each in a rotating order, medians and
per-round ratios. Before anything is timed every compiled model is checked to compute what the eager one
does (loss and logits), and the two libraries to compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora  # noqa: E402
import speed  # noqa: E402  (the models, adapters, checks and interleaved timing)
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from speed import LIBS, Checks, Key, copy_adapter, each_figure, interleaved, max_diff, versus_figure  # noqa: E402

TOLERANCE = 1e-4  # largest |difference| of float32 logits between compiled and eager

# (key, label, goal for peftkit or None, kind): see speed.py
FIGURES = [
    ("lora_compiled_vs_peft", "compiled LoRA training step, peftkit ÷ peft", 0.95, "vs peft"),
    ("dora_compiled_vs_peft", "compiled DoRA training step, peftkit ÷ peft", None, "vs peft"),
    ("dora_over_lora_compiled", "compiled DoRA step ÷ compiled LoRA step", 1.05, "each"),
    ("lora_compiled_over_eager", "LoRA training step, compiled ÷ eager", None, "each"),
    ("dora_compiled_over_eager", "DoRA training step, compiled ÷ eager", None, "each"),
    ("unmerged_over_merged_compiled", "compiled inference, unmerged ÷ merged", 1.05, "each"),
]


def graph_breaks(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    torch._dynamo.reset()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._dynamo.explain(model)(**batch).graph_break_count


def training_phase(folder: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    models: dict[Key, torch.nn.Module] = {}
    for kind, options in (("lora", {}), ("dora", {"use_dora": True})):
        models["peftkit", kind] = speed.wrap("peftkit", qlora.load_fp32(folder), **options)
        qlora.randomize_lora_b(models["peftkit", kind], seed=3)
        models["peft", kind] = speed.wrap("peft", qlora.load_fp32(folder), **options)
        copy_adapter(models["peftkit", kind], models["peft", kind], "default")
    batch = qlora.make_batch(models["peft", "lora"].config.vocab_size)
    breaks = {" ".join(key): graph_breaks(model, batch) for key, model in models.items()}
    print("  graph breaks in the training forward: " + ", ".join(f"{k} {v}" for k, v in breaks.items()))
    torch._dynamo.reset()
    compiled = {key: torch.compile(model, backend=args.backend) for key, model in models.items()}
    optimizers = {key: qlora.adamw(model, fused=True) for key, model in models.items()}
    print("Checks, compiled training (batch 4 x 128, train mode):")
    compile_seconds, eager_loss = {}, {}
    for key, model in models.items():
        model.train()
        with torch.no_grad():
            eager_loss[key] = model(**batch).loss.item()
        start = time.perf_counter()
        first = qlora.train_step(compiled[key], optimizers[key], batch)  # compiles forward and backward
        compile_seconds[" ".join(key)] = time.perf_counter() - start
        print(f"  compiled {' '.join(key)} in {compile_seconds[' '.join(key)]:.0f} s", flush=True)
        checks.add(f"{' '.join(key)} first compiled loss vs eager", abs(first - eager_loss[key]), 1e-5)
    for kind in ("lora", "dora"):
        difference = abs(eager_loss["peftkit", kind] - eager_loss["peft", kind])
        checks.add(f"{kind} loss, peftkit vs peft", difference, 1e-5)
    checks.stop_if_failed()

    losses: dict[Key, float] = {}

    def step(key: Key, run: torch.nn.Module) -> Any:
        def one() -> None:
            losses[key] = qlora.train_step(run, optimizers[key[:2]], batch)

        return one

    steps = {(*key, "compiled"): step((*key, "compiled"), compiled[key]) for key in models}
    steps |= {(*key, "eager"): step((*key, "eager"), models[key]) for key in models}
    times = {(lib, f"{kind} {mode}"): t for (lib, kind, mode), t in interleaved(steps, args).items()}
    for kind in ("lora", "dora"):
        difference = abs(losses["peftkit", kind, "compiled"] - losses["peft", kind, "compiled"])
        checks.add(f"{kind} compiled loss after the timed steps, peftkit vs peft", difference, 1e-3)
    return {
        "figures": {
            "lora_compiled_vs_peft": versus_figure(times, "lora compiled"),
            "dora_compiled_vs_peft": versus_figure(times, "dora compiled"),
            "dora_over_lora_compiled": each_figure(times, "dora compiled", "lora compiled"),
            "lora_compiled_over_eager": each_figure(times, "lora compiled", "lora eager"),
            "dora_compiled_over_eager": each_figure(times, "dora compiled", "dora eager"),
        },
        "graph_breaks": breaks,
        "compile_seconds": compile_seconds,
        **speed.medians_and_rounds(times),
    }


def inference_phase(folder: Path, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    models: dict[Key, torch.nn.Module] = {}
    source = speed.wrap("peftkit", qlora.load_fp32(folder))
    qlora.randomize_lora_b(source, seed=4)
    for lib in LIBS:
        unmerged = speed.wrap(lib, qlora.load_fp32(folder))
        copy_adapter(source, unmerged, "default")
        models[lib, "one"] = unmerged.eval()
        merged = speed.wrap(lib, qlora.load_fp32(folder))
        copy_adapter(source, merged, "default")
        models[lib, "merged"] = merged.merge_and_unload().eval()
    ids = speed.infer_batch(models["peft", "one"].config.vocab_size)
    torch._dynamo.reset()
    compiled = {key: torch.compile(model, backend=args.backend) for key, model in models.items()}
    print("Checks, compiled inference (batch 16 x 64, eval mode, no gradients):")
    reference = {}
    with torch.no_grad():
        for key, model in models.items():
            reference[key] = model(input_ids=ids).logits
            checks.add(
                f"{' '.join(key)} compiled vs eager",
                max_diff(compiled[key](input_ids=ids).logits, reference[key]),
                TOLERANCE,
            )
    checks.add(
        "one logits, peftkit vs peft",
        max_diff(reference["peftkit", "one"], reference["peft", "one"]),
        TOLERANCE,
    )
    checks.add(
        "peftkit merged vs unmerged",
        max_diff(reference["peftkit", "merged"], reference["peftkit", "one"]),
        TOLERANCE,
    )
    checks.stop_if_failed()

    def forward(key: Key) -> Any:
        def one() -> None:
            with torch.no_grad():
                compiled[key](input_ids=ids)

        return one

    times = interleaved({key: forward(key) for key in models}, args)
    return {
        "figures": {"unmerged_over_merged_compiled": each_figure(times, "one", "merged")},
        **speed.medians_and_rounds(times),
    }


PHASES = {"training": training_phase, "inference": inference_phase}


def table(figures: dict[str, dict[str, Any]]) -> tuple[str, dict[str, bool | None]]:
    lines = ["| figure | peft | peftkit | goal | holds |", "|---|---|---|---|---|"]
    verdicts = {}
    for key, label, goal, kind in FIGURES:
        if key not in figures:
            continue
        peft_cell, peftkit_cell, value = speed.cells(key, kind, figures[key])
        verdicts[key] = None if goal is None else value <= goal
        holds = "—" if goal is None else ("yes" if verdicts[key] else "NO")
        goal_cell = "—" if goal is None else f"<= {goal:.2f}"
        lines.append(f"| {label} | {peft_cell} | {peftkit_cell} | {goal_cell} | {holds} |")
    return "\n".join(lines), verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (at least 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="run only these"
    )
    args = parser.parse_args()
    if args.rounds < 7:
        parser.error("--rounds must be at least 7: medians of fewer rounds are too noisy to compare")
    qlora.quiet_torch(args.threads)
    torch._dynamo.config.recompile_limit = 16  # four models share each forward's code object
    checks, results = Checks(), {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = qlora.llama_33m(Path(scratch) / "llama-33m")
        for name in args.phases:
            phase = PHASES[name]
            print(f"{name} ...", flush=True)
            start = time.perf_counter()
            results[name] = phase(folder, args, checks)
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    figures = {k: f for phase in results.values() for k, f in phase["figures"].items()}
    text, verdicts = table(figures)
    training = results.get("training", {"graph_breaks": {}, "compile_seconds": {}})
    print(
        f"\nLlama 33.5M, LoRA r={qlora.LORA['r']} all-linear, torch.compile(backend={args.backend!r}) "
        f"{torch.__version__}; training {qlora.BATCH} x {qlora.SEQ} with fused AdamW, inference "
        f"{speed.INFER_BATCH} x {speed.INFER_SEQ}; {args.threads} threads; medians of {args.rounds} "
        f"interleaved rounds after {args.warmup} warm-up\n"
    )
    print(text)
    print(
        "\ngraph breaks in the training forward: "
        + ", ".join(f"{k} {v}" for k, v in training["graph_breaks"].items())
    )
    print(
        "first compiled step (compile time), s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in training["compile_seconds"].items())
    )
    medians = {k: v for phase in results.values() for k, v in phase["ms"].items()}
    print("median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    bad = [row["check"] for row in checks.rows if not row["ok"]]
    print(f"checks: {len(checks.rows) - len(bad)} of {len(checks.rows)} within tolerance {bad or ''}")
    if args.json:
        payload = {"figures": figures, "verdicts": verdicts, "results": results, "checks": checks.rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
