"""`peftkit compare`: train several arms (methods, or one method with other options) on the same model,
data, split and seed, each in its own process, and tabulate what each bought and cost.

Each arm runs `python -m peftkit.cli.compare <train options>`: `peftkit train` into `OUTPUT/arms/<arm>/
seed-<seed>/`, then, where its method merges, the inference time unmerged ÷ merged, written to ARM_FILE.
An arm's own process makes its peak memory its own, and an arm that fails (an error, a crash, the
kernel's out-of-memory kill) is recorded with its error while the others go on. The folder then holds
RESULTS_JSON (one object per arm, every seed's run and their mean and spread), a CSV and a Markdown
table, and PNG plots of quality against trainable parameters, peak memory and training time.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import atomic_write
from .train import (
    FULL,
    METHOD_FLAGS,
    METRICS_FILE,
    RUN_FILE,
    checkpoint_folders,
    method_choices,
    method_names,
    write_json,
)

ARM_FILE = "arm.json"  # in each arm's seed folder: its status, error and inference timing, written last
LOG_FILE = "train.log"
# In the comparison's folder: the base model's perplexity on the general text, the same for every arm and
# seed, so measured by the first arm and read by the rest (with the model and length it was measured at).
BASE_GENERAL_FILE = "base_general_perplexity.json"
RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"
DEFAULT_RANKS = (4, 8, 16, 64)
# Arms by name beyond the method names themselves: a method with the options that make it a variant.
PRESETS: dict[str, list[str]] = {
    "dora": ["--method", "lora", "--set", "use_dora=true"],
    "rslora": ["--method", "lora", "--set", "use_rslora=true"],
    "qlora": ["--method", "lora", "--quantize", "4"],
    "parallel-adapter": ["--method", "bottleneck", "--set", "parallel=true"],
}
ERROR_TAIL = 2000  # characters of a failed arm's output kept as its error


@dataclass(frozen=True)
class Arm:
    """One configuration to train: its name and the `peftkit train` options that make it."""

    name: str
    options: tuple[str, ...]

    @property
    def method(self) -> str:
        return self.options[self.options.index("--method") + 1]


def arm_from_name(name: str) -> Arm:
    """`lora`, any `--method` name, a preset (`dora`, `qlora`, ...), or `lora-r<N>` (LoRA at rank N)."""
    if name in PRESETS:
        return Arm(name, tuple(PRESETS[name]))
    if name.startswith("lora-r") and name[6:].isdigit():
        return Arm(name, ("--method", "lora", "--r", name[6:]))
    method_names(name)  # a method, or methods joined by +; else the error lists the choices
    return Arm(name, ("--method", name))


def arm_from_spec(spec: str) -> Arm:
    """`--arm NAME=OPTIONS`: `lora-all="--method lora --target-modules all-linear"`."""
    import shlex

    name, sep, options = spec.partition("=")
    words = shlex.split(options)
    if not sep or not name or "--method" not in words[:-1]:
        raise ValueError(
            f"--arm {spec!r}: write it as NAME=OPTIONS with a --method among the options, for example "
            "--arm 'lora-all=--method lora --target-modules all-linear'."
        )
    return Arm(name.strip(), tuple(words))


def default_arm_names() -> list[str]:
    """Every method at its defaults, DoRA, full fine-tuning, the LoRA rank sweep, and QLoRA where
    bitsandbytes is installed."""
    methods = [m for m in method_choices() if m not in ("lora", FULL)]
    sweep = [rank_arm_name(r) for r in DEFAULT_RANKS]
    qlora = ["qlora"] if importlib.util.find_spec("bitsandbytes") else []
    return [*sweep, "dora", *methods, *qlora, FULL]


def rank_arm_name(rank: int) -> str:
    """`lora` for LoRA's own default rank (its config's training default), else `lora-r<rank>`."""
    default_rank = method_choices()["lora"].training_defaults(0)["r"]
    return "lora" if rank == default_rank else f"lora-r{rank}"


def choose_arms(methods: str | None, ranks: str | None, specs: list[str] | None) -> list[Arm]:
    """The arms `--methods`, `--ranks` and `--arm` name, in that order, each name once; the default set
    when none is given."""
    names: list[str] = []
    if methods:
        names += [m.strip() for m in methods.split(",") if m.strip()]
    if ranks:
        try:
            names += [rank_arm_name(int(r)) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise ValueError(
                f"--ranks {ranks!r}: give ranks as integers, for example --ranks 4,8,16,64."
            ) from None
    arms = [arm_from_name(n) for n in dict.fromkeys(names)]
    arms += [arm_from_spec(s) for s in specs or []]
    if not arms:
        arms = [arm_from_name(n) for n in default_arm_names()]
    seen = [a.name for a in arms]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"Arms named twice: {twice}; give each --arm its own name.")
    unsafe = [n for n in seen if not n.replace("-", "").replace("_", "").replace("+", "").isalnum()]
    if unsafe:
        raise ValueError(f"Arm names become folder names: use letters, digits, -, _ and + ({unsafe}).")
    return arms


# ---- one arm, in its own process ------------------------------------------------------------------


def run_arm(argv: list[str]) -> int:
    """The child process: `peftkit train` with `argv`, then the inference timing; ARM_FILE records the
    outcome either way (the parent records a crash that leaves no ARM_FILE)."""
    from . import build_parser, main

    args = build_parser().parse_args(["train", *argv])
    output = Path(args.output)
    status = main(["train", *argv])
    record: dict[str, Any] = {"status": "ok" if status == 0 else "failed"}
    if status == 0:
        try:
            record |= inference_timing(args)
        except Exception as error:  # the timing is extra: a failure here is noted, the arm stands
            record["timing_error"] = f"{type(error).__name__}: {error}"
    else:
        log = (output / LOG_FILE).relative_to(comparison_folder(output)).as_posix()
        record["error"] = f"peftkit train exited with status {status} (see {log} in the comparison)"
    write_json(output / ARM_FILE, record)
    return status


def inference_timing(args: argparse.Namespace, batches: int = 5) -> dict[str, Any]:
    """Median forward time over one batch of held-out rows, unmerged and merged (`merge_adapter`); whether
    the method merges. Also, for a causal LM, the perplexity of the general text after training and
    before it (the base model's, measured once per comparison: BASE_GENERAL_FILE)."""
    import torch

    from ..layer import NotMergeableError
    from .commands import load_trained, read_run
    from .data import Collator, causal_lm_features, classification_features, load_dataset, split
    from .metrics import answer_log_likelihoods, perplexity
    from .models import load_model, load_tokenizer, model_folder

    output = Path(args.output)
    run = json.loads((output / RUN_FILE).read_text())
    task, labels = run["task"], run["labels"]
    dataset = load_dataset(
        args.data, args.text_column, args.label_column, args.prompt_column, args.response_column
    )
    rows = split(dataset.examples, args.test_fraction, args.seed)[1][: args.eval_batch_size]
    loaded = argparse.Namespace(
        adapter=str(output),
        model=args.model,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    model, tokenizer = load_trained(loaded, read_run(output), task, labels)
    model.eval()
    if task == "classification":
        features = classification_features(rows, tokenizer, labels, args.max_length)
    else:
        features = causal_lm_features(rows, tokenizer, run["prompt_template"], args.max_length)
    inputs = Collator(tokenizer.pad_token_id)(features)
    inputs.pop("labels", None)

    def median_seconds() -> float:
        times = []
        with torch.no_grad():
            model(**inputs)  # warm-up
            for _ in range(batches):
                start = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    record: dict[str, Any] = {"merges": None, "unmerged_over_merged": None}
    if args.method != FULL:
        unmerged = median_seconds()
        try:
            model.merge_adapter()
        except NotMergeableError:
            record["merges"] = False
        else:
            record |= {"merges": True, "unmerged_over_merged": round(unmerged / median_seconds(), 4)}
    if task == "causal-lm":
        folder = model_folder(args.model, args.trust_remote_code, args.allow_pickle)
        general = general_text()
        tokens = [
            {"input_ids": ids, "labels": ids}
            for ids in (tokenizer(t)["input_ids"][: args.max_length] for t in general)
        ]
        after = perplexity(*answer_log_likelihoods(model, tokenizer, tokens, args.eval_batch_size))
        del model

        def measure_base() -> float:
            base = load_model(folder, task, None, args.seed, None, args.trust_remote_code).eval()
            scores = answer_log_likelihoods(base, load_tokenizer(folder), tokens, args.eval_batch_size)
            return perplexity(*scores)

        key = {"model": str(folder), "max_length": args.max_length, "sentences": len(general)}
        before = _shared_figure(comparison_folder(output) / BASE_GENERAL_FILE, key, measure_base)
        record["general_perplexity"] = {"before": before, "after": after}
    return record


def _shared_figure(path: Path, key: dict[str, Any], measure: Callable[[], float]) -> float:
    """The figure stored at `path` under `key`, measured (and stored) when absent or stored for another
    key."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    value = measure()
    write_json(path, {"key": key, "value": value})
    return value


def general_text() -> list[str]:
    """Held-out text unrelated to the built-in task (editorial sentences, see peftkit/data/general_text):
    what a causal LM's perplexity on it says about what training did to what the model already knew."""
    from importlib import resources

    path = resources.files("peftkit").joinpath("data/general_text/sentences.txt")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the parent: every arm and seed, then the tables and plots -----------------------------------------


def compare(
    output: str | Path,
    arms: list[Arm],
    train_options: list[str],
    seeds: list[int],
    resume: bool = False,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Train every arm once per seed, each in its own process, into `output`/arms/<arm>/seed-<seed>; write
    the results (returned too) and the plots. `train_options` go to every arm (not --method, --output or
    --seed); with `resume`, runs already finished are kept and interrupted ones continue."""
    output = Path(output)
    if not resume and (output / "arms").exists():
        raise ValueError(
            f"{output} already holds a comparison. Pass --resume to continue it, or another --output."
        )
    runs = [(arm, seed) for arm in arms for seed in seeds]
    started, done_seconds, done = time.perf_counter(), 0.0, 0
    for k, (arm, seed) in enumerate(runs, 1):
        folder = run_folder(output, arm, seed)
        elapsed = time.perf_counter() - started
        remaining = len(runs) - k + 1
        estimate = f", about {_minutes(done_seconds / done * remaining)} left" if done else ""
        label = f"{arm.name} (seed {seed})" if len(seeds) > 1 else arm.name
        if resume and _finished(folder):
            print(f"[arm {k}/{len(runs)}] {label}: finished earlier, kept", flush=True)
            continue
        print(f"[arm {k}/{len(runs)}] {label}: elapsed {_minutes(elapsed)}{estimate}", flush=True)
        arm_started = time.perf_counter()
        record = launch(arm, seed, folder, train_options)
        done_seconds += time.perf_counter() - arm_started
        done += 1
        if record["status"] != "ok":
            print(
                f"[arm {k}/{len(runs)}] {label} failed: {record['error'].splitlines()[-1][:300]}", flush=True
            )
    results = [summarize(arm, [collect(run_folder(output, arm, s)) for s in seeds]) for arm in arms]
    write_results(output, results)
    if plots:
        write_plots(output, results)
    return results


def run_folder(output: Path, arm: Arm, seed: int) -> Path:
    return output / "arms" / arm.name / f"seed-{seed}"


def comparison_folder(run: Path) -> Path:
    """The comparison a `run_folder` belongs to."""
    return run.parents[2]


def _finished(folder: Path) -> bool:
    record = folder / ARM_FILE
    return record.is_file() and json.loads(record.read_text()).get("status") == "ok"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def launch(arm: Arm, seed: int, folder: Path, train_options: list[str]) -> dict[str, Any]:
    """Run one arm's process; its standard error (the training bar) passes through and the last of it is
    kept; its standard output goes to LOG_FILE. Returns what it recorded, or the crash."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARM_FILE).unlink(missing_ok=True)
    argv = [*train_options, *arm.options, "--seed", str(seed), "--output", str(folder)]
    if checkpoint_folders(folder / "checkpoints"):
        argv.append("--resume")  # an interrupted earlier attempt
    command = [sys.executable, "-m", "peftkit.cli.compare", *argv]
    tail = b""
    with open(folder / LOG_FILE, "ab") as log:
        log.write(f"$ peftkit train {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE)
        assert process.stderr is not None
        while chunk := os.read(process.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            log.write(chunk)
            tail = (tail + chunk)[-16 * ERROR_TAIL :]
        _, wait_status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(wait_status)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if (folder / ARM_FILE).is_file():
        record = json.loads((folder / ARM_FILE).read_text())
    else:
        code = process.returncode
        why = (
            f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
            if code < 0
            else f"exit {code}"
        )
        record = {"status": "failed", "error": f"the arm's process ended without a result ({why})"}
    if record["status"] != "ok":
        record["error"] = record.get("error", "") + "\n" + _last_lines(tail.decode(errors="replace"))
    record["process_peak_memory_bytes"] = peak
    write_json(folder / ARM_FILE, record)
    return record


def _last_lines(text: str) -> str:
    """The end of a process's standard error, progress-bar redraws dropped."""
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())[-ERROR_TAIL:]


def collect(folder: Path) -> dict[str, Any]:
    """One run's record: ARM_FILE and the metrics `peftkit train` wrote."""
    record = json.loads((folder / ARM_FILE).read_text()) if (folder / ARM_FILE).is_file() else {}
    record.setdefault("status", "failed")
    record.setdefault("error", "not run")
    if (folder / METRICS_FILE).is_file() and record["status"] == "ok":
        record["train"] = json.loads((folder / METRICS_FILE).read_text())
    record["folder"] = str(folder)
    return record


def summarize(arm: Arm, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's row: the mean of each figure over its seeds, and the spread (sample standard deviation) of
    the metrics; `status` "failed" with the first error when any seed failed."""
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    row: dict[str, Any] = {
        "arm": arm.name,
        "method": arm.method,
        "options": list(arm.options),
        "status": "failed" if failed else "ok",
        "error": failed[0]["error"] if failed else None,
        "seeds": len(runs),
        "seeds_ok": len(ok),
    }
    if not ok:
        return row
    trained = [r["train"] for r in ok]

    def mean(values: list[Any]) -> Any:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    names = list(trained[0]["after"])
    row["metrics"] = {n: mean([t["after"][n] for t in trained]) for n in names}
    row["metrics_spread"] = {
        n: statistics.stdev([t["after"][n] for t in trained]) if len(trained) > 1 else 0.0 for n in names
    }
    row["metrics_before"] = {n: mean([t["before"][n] for t in trained]) for n in trained[0]["before"]}
    row["trainable_parameters"] = trained[0]["trainable_parameters"]
    row["trainable_share"] = trained[0]["trainable_parameters"] / trained[0]["total_parameters"]
    row["adapter_bytes"] = round(mean([t["saved_bytes"] for t in trained]))
    peaks = [
        t.get("peak_memory_bytes") or r.get("process_peak_memory_bytes")
        for t, r in zip(trained, ok, strict=True)
    ]
    row["peak_memory_bytes"] = round(mean(peaks))
    row["seconds_per_step"] = mean([t["seconds_per_step"] for t in trained])
    row["train_seconds"] = mean([t["train_seconds"] for t in trained])
    row["optimizer_steps"] = mean([t["optimizer_steps"] for t in trained])
    row["merges"] = ok[0].get("merges")
    row["unmerged_over_merged"] = mean([r.get("unmerged_over_merged") for r in ok])
    if "general_perplexity" in ok[0]:
        row["general_perplexity"] = {
            w: mean([r["general_perplexity"][w] for r in ok]) for w in ("before", "after")
        }
    row["runs"] = [
        {
            "seed_folder": Path(r["folder"]).relative_to(comparison_folder(Path(r["folder"]))).as_posix(),
            "metrics": t["after"],
        }
        for r, t in zip(ok, trained, strict=True)
    ]
    return row


def quality_metric(results: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """The metric arms are ranked by, and whether higher is better: accuracy where there is one, else
    perplexity (lower is better), else the first metric."""
    names = next((list(r["metrics"]) for r in results if r.get("metrics")), None)
    if not names:
        return None
    for name, higher in (("accuracy", True), ("perplexity", False)):
        if name in names:
            return name, higher
    return names[0], True


def write_results(output: Path, results: list[dict[str, Any]]) -> None:
    """RESULTS_JSON, RESULTS_CSV and RESULTS_MD, each written whole or not at all."""
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / RESULTS_JSON, results)
    metrics = sorted({n for r in results for n in r.get("metrics", {})})
    columns = ["arm", "method", "status", *metrics, *(f"{n}_spread" for n in metrics)]
    columns += ["trainable_parameters", "trainable_share", "adapter_bytes", "peak_memory_bytes"]
    columns += ["seconds_per_step", "train_seconds", "merges", "unmerged_over_merged", "seeds_ok", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    for r in results:
        flat = (
            dict(r)
            | r.get("metrics", {})
            | {f"{n}_spread": v for n, v in r.get("metrics_spread", {}).items()}
        )
        writer.writerow(flat)
    atomic_write(str(output / RESULTS_CSV), text.getvalue().encode())
    atomic_write(str(output / RESULTS_MD), markdown_table(results).encode())


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as one Markdown table, arms in order; mean ± spread where there are several seeds."""
    quality = quality_metric(results)
    names = [quality[0]] if quality else []
    names += [
        n for n in ("f1", "perplexity") if n not in names and any(n in r.get("metrics", {}) for r in results)
    ]
    general = any("general_perplexity" in r for r in results)
    header = [
        "arm",
        *names,
        *(["general-text perplexity, before → after"] if general else []),
        "trainable",
        "share",
        "adapter",
        "peak memory",
        "s/step",
        "training",
        "merges",
        "unmerged ÷ merged",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if r["status"] != "ok" and not r.get("metrics"):
            error = r["error"].strip().splitlines()[0][:120].replace("|", "\\|")
            lines.append(f"| {r['arm']} | failed: {error} |" + " |" * (len(header) - 2))
            continue
        cells = [r["arm"] + ("" if r["status"] == "ok" else f" ({r['seeds_ok']}/{r['seeds']} seeds)")]
        for n in names:
            spread = r["metrics_spread"][n]
            cells.append(f"{r['metrics'][n]:.4f}" + (f" ± {spread:.4f}" if r["seeds_ok"] > 1 else ""))
        if general:
            ppl = r.get("general_perplexity")
            cells.append(f"{ppl['before']:.2f} → {ppl['after']:.2f}" if ppl else "—")
        ratio = r["unmerged_over_merged"]
        cells += [
            f"{r['trainable_parameters']:,}",
            f"{100 * r['trainable_share']:.3f}%",
            human_bytes(r["adapter_bytes"]),
            human_bytes(r["peak_memory_bytes"]),
            f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] is not None else "",
            _minutes(r["train_seconds"]),
            {True: "yes", False: "no", None: "—"}[r["merges"]],
            f"{ratio:.2f}" if ratio is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def human_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


PLOTS = {  # file: (x-axis key, label, log scale)
    "quality_vs_parameters.png": ("trainable_parameters", "trainable parameters", True),
    "quality_vs_memory.png": ("peak_memory_bytes", "peak training memory (GiB)", False),
    "quality_vs_time.png": ("train_seconds", "training time (minutes)", False),
}
SCALES = {"peak_memory_bytes": 2**30, "train_seconds": 60}


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: none with x as small and quality as good, one of them
    strictly."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, q) in enumerate(points):
        beaten = any(
            x2 <= x and sign * q2 >= sign * q and (x2 < x or sign * q2 > sign * q)
            for j, (x2, q2) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return front


def write_plots(output: Path, results: list[dict[str, Any]]) -> list[Path]:
    """One PNG per entry of PLOTS: quality (mean, with the seeds' spread) against the cost, every arm
    labelled, the Pareto front joined."""
    try:
        import matplotlib
        import matplotlib.ticker
    except ImportError:
        raise ValueError("The plots need matplotlib: pip install matplotlib (or pass --no-plots).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = quality_metric(results)
    ok = [r for r in results if r.get("metrics")]
    written: list[Path] = []
    if quality is None or not ok:
        return written
    name, higher = quality
    for file, (key, label, log) in PLOTS.items():
        arms = [r for r in ok if r.get(key)]
        xs = [r[key] / SCALES.get(key, 1) for r in arms]
        qs = [r["metrics"][name] for r in arms]
        figure, axes = plt.subplots(figsize=(7, 4.5))
        axes.errorbar(xs, qs, yerr=[r["metrics_spread"][name] for r in arms], fmt="o", capsize=3)
        for x, q, r in zip(xs, qs, arms, strict=True):
            axes.annotate(r["arm"], (x, q), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = sorted(pareto_front(list(zip(xs, qs, strict=True)), higher), key=lambda i: xs[i])
        axes.plot([xs[i] for i in front], [qs[i] for i in front], "--", color="tab:red", label="Pareto front")
        if log:
            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.set_xlabel(label)
        axes.set_ylabel(f"held-out {name}" + ("" if higher else " (lower is better)"))
        axes.legend(loc="best")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        path = output / file
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        plt.close(figure)
        atomic_write(str(path), buffer.getvalue())
        written.append(path)
    return written


def train_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The options of `args` that differ from `parser`'s defaults, as `peftkit train` arguments, leaving out
    what compare sets per arm (--method, --output, --seed, --resume)."""
    skip = {"method", "output", "seed", "resume", "command", "help", "set", *METHOD_FLAGS}
    argv: list[str] = []
    for action in parser._actions:
        if action.dest in skip or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def takes(method: str, key: str) -> bool:
    """Whether `method`'s config has the option `key` (or an alias of it); full fine-tuning has none."""
    config_class = method_choices().get(method)
    if config_class is None:
        return False
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    return key in fields or config_class.option_aliases.get(key) in fields


def shared_method_options(arm: Arm, args: argparse.Namespace) -> list[str]:
    """The method flags (--r, --set ...) given to compare, as `train` options for the arms whose methods
    take them: `compare --r 16` sets the rank of the LoRA arms and leaves IA3 alone."""
    names = method_names(arm.method)
    argv: list[str] = []
    for flag in METHOD_FLAGS:
        value = getattr(args, flag, None)
        if value is not None and any(takes(n, flag) for n in names):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.set or []:
        scope, dot, key = item.partition("=")[0].rpartition(".")
        if (scope in names) if dot else any(takes(n, key) for n in names):
            argv += ["--set", item]
    return argv


def run_compare(args: argparse.Namespace, train_parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """`peftkit compare` from its parsed options."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}.")
    arms = [
        Arm(a.name, (*shared_method_options(a, args), *a.options))
        for a in choose_arms(args.methods, args.ranks, args.arm)
    ]
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("The plots need matplotlib: pip install matplotlib (or pass --no-plots).")
    output = Path(args.output)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"comparing {len(arms)} arms × {len(seeds)} seeds in {output}: {', '.join(a.name for a in arms)}")
    results = compare(output, arms, train_options(args, train_parser), seeds, args.resume, not args.no_plots)
    print(markdown_table(results), end="")
    failed = [r["arm"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} arms failed: {', '.join(failed)} (their errors are in {output / RESULTS_JSON})")
    print(
        f"results: {output / RESULTS_JSON}, {RESULTS_CSV}, {RESULTS_MD}"
        + ("" if args.no_plots else ", plots")
    )
    return results


if __name__ == "__main__":
    sys.exit(run_arm(sys.argv[1:]))
