"""`peftkit recommend`: the best arm of a measured comparison (`peftkit compare`'s results.json) within the
user's limits on memory, time and adapter size, with the reason, the runners-up, and, when no arm fits,
which limit to relax and by how much. Without a results folder it reads the tables shipped with peftkit,
measured by `compare` on the built-in models and data (peftkit/data/measured/)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .compare import RESULTS_JSON, human_bytes, quality_metric

PREFERENCES = ("quality", "memory", "speed", "size")
SHIPPED = {"minilm": "minilm-movie-reviews.json", "smollm2": "smollm2-movie-reviews.json"}
# Arms whose quality is within this share of the best one (or within the best one's seed spread, where
# that is larger) count as equally good when the preference is memory, speed or size.
QUALITY_TOLERANCE = 0.01
RUNNERS_UP = 3
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'4GiB', '10MB', '512k', '2000000' as bytes (k, M, G decimal; KiB, MiB, GiB binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"{flag} {text!r}: give a size such as 4GiB, 500MB or 10MiB.")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Limits:
    max_memory: int | None = None  # bytes of peak training memory
    max_seconds: float | None = None  # training time
    max_adapter_bytes: int | None = None

    def checks(self) -> list[tuple[str, str, float]]:
        """(flag, result key, limit) for each limit that is set."""
        found = [
            ("--max-memory", "peak_memory_bytes", self.max_memory),
            ("--max-minutes", "train_seconds", self.max_seconds),
            ("--max-adapter-size", "adapter_bytes", self.max_adapter_bytes),
        ]
        return [(flag, key, limit) for flag, key, limit in found if limit is not None]


def shown(key: str, value: float) -> str:
    if key == "train_seconds":
        return f"{value / 60:.1f} min"
    return human_bytes(value)


def load_results(results: str | Path | None, model: str = "minilm") -> tuple[list[dict[str, Any]], str]:
    """The arms of a results folder (or file), else the shipped table for `model`; and their source."""
    if results is not None:
        path = Path(results)
        path = path / RESULTS_JSON if path.is_dir() else path
        if not path.is_file():
            raise ValueError(
                f"--results {results}: no {RESULTS_JSON} there; run peftkit compare --output {results}."
            )
        try:
            return json.loads(path.read_text()), str(path)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not a results file ({error}); write it with peftkit compare."
            ) from None
    if model not in SHIPPED:
        raise ValueError(
            f"No measured table ships for {model!r} (only {', '.join(SHIPPED)}); pass --results."
        )
    table = resources.files("peftkit").joinpath(f"data/measured/{SHIPPED[model]}")
    if not table.is_file():
        raise ValueError(
            f"No measured table for {model!r} ships with this copy of peftkit; run peftkit compare --model "
            f"{model} and pass its folder with --results."
        )
    return json.loads(table.read_text()), f"the table shipped with peftkit ({SHIPPED[model]})"


def recommend(
    results: list[dict[str, Any]], limits: Limits = Limits(), prefer: str = "quality"
) -> dict[str, Any]:
    """The arm to use: among the arms that finished and fit `limits`, the best quality; or, preferring
    memory, speed or size, the cheapest of those within QUALITY_TOLERANCE of the best quality. Returns
    {"arm", "reason", "runners_up", ...}; "arm" is None when nothing fits, and "relax" then says which limit
    to raise to what to admit the arm that needs the least."""
    if prefer not in PREFERENCES:
        raise ValueError(f"--prefer {prefer!r}: choose one of {', '.join(PREFERENCES)}.")
    measured = [r for r in results if r.get("status") == "ok" and r.get("metrics")]
    quality = quality_metric(measured)
    if quality is None:
        raise ValueError("The results hold no arm that finished; run peftkit compare again (--resume).")
    name, higher = quality
    sign = 1 if higher else -1
    checks = limits.checks()
    fitting = [
        r for r in measured if all(r.get(key) is not None and r[key] <= limit for _, key, limit in checks)
    ]
    if not fitting:
        return nothing_fits(measured, checks)

    def score(r: dict[str, Any]) -> float:
        return sign * r["metrics"][name]

    top = max(fitting, key=score)
    tolerance = max(QUALITY_TOLERANCE * abs(top["metrics"][name]), top["metrics_spread"].get(name, 0.0))
    cost_key = {
        "quality": None,
        "memory": "peak_memory_bytes",
        "speed": "train_seconds",
        "size": "adapter_bytes",
    }
    key = cost_key[prefer]
    if key is None:
        ranked = sorted(fitting, key=lambda r: (-score(r), r["adapter_bytes"]))
        why = f"the best held-out {name} ({top['metrics'][name]:.4f})"
    else:
        close = [r for r in fitting if score(top) - score(r) <= tolerance]
        ranked = sorted(close, key=lambda r: (r[key], -score(r))) + sorted(
            [r for r in fitting if r not in close], key=lambda r: -score(r)
        )
        least = {"memory": "peak training memory", "speed": "training time", "size": "adapter size"}[prefer]
        why = (
            f"the least {least} ({shown(key, ranked[0][key])}) among the arms whose {name} is within "
            f"{tolerance:.4f} of the best ({top['arm']}, {top['metrics'][name]:.4f})"
        )
    best = ranked[0]
    within = (
        f" within {', '.join(f'{flag} {shown(k, limit)}' for flag, k, limit in checks)}" if checks else ""
    )
    reason = (
        f"{best['arm']}: {why}{within}, of {len(fitting)} arms that fit; {name} {_with_spread(best, name)}, "
        f"{best['trainable_parameters']:,} trainable parameters, adapter "
        f"{human_bytes(best['adapter_bytes'])}, peak memory {human_bytes(best['peak_memory_bytes'])}, "
        f"training {best['train_seconds'] / 60:.1f} min."
    )
    return {
        "arm": best["arm"],
        "method": best["method"],
        "options": best.get("options", []),
        "reason": reason,
        "metric": name,
        "metrics": best["metrics"],
        "runners_up": [
            {"arm": r["arm"], name: r["metrics"][name], "why_not": _why_not(r, best, name, key)}
            for r in ranked[1 : 1 + RUNNERS_UP]
        ],
        "fitting_arms": len(fitting),
    }


def _with_spread(row: dict[str, Any], name: str) -> str:
    spread = row["metrics_spread"].get(name, 0.0)
    return f"{row['metrics'][name]:.4f}" + (
        f" ± {spread:.4f} over {row['seeds_ok']} seeds" if row.get("seeds_ok", 1) > 1 else ""
    )


def _why_not(row: dict[str, Any], best: dict[str, Any], name: str, key: str | None) -> str:
    if key is not None and row[key] > best[key]:
        return f"{shown(key, row[key])} against {shown(key, best[key])}"
    if key is None and row["metrics"][name] == best["metrics"][name]:  # a tie goes to the smaller adapter
        size = f"{human_bytes(row['adapter_bytes'])} against {human_bytes(best['adapter_bytes'])}"
        return f"{name} tied at {row['metrics'][name]:.4f}; adapter {size}"
    return f"{name} {row['metrics'][name]:.4f} against {best['metrics'][name]:.4f}"


def nothing_fits(measured: list[dict[str, Any]], checks: list[tuple[str, str, float]]) -> dict[str, Any]:
    """No arm within the limits: for each arm, what each limit would have to be for it to fit; name the arm
    that needs the smallest relaxation (the sum of the shares by which its limits would grow)."""

    def needed(r: dict[str, Any]) -> dict[str, float]:
        return {flag: r[key] for flag, key, limit in checks if r.get(key) is not None and r[key] > limit}

    def growth(r: dict[str, Any]) -> float:
        limits = {flag: limit for flag, _, limit in checks}
        return sum(value / limits[flag] - 1 for flag, value in needed(r).items())

    closest = min(measured, key=growth)
    keys = {flag: key for flag, key, _ in checks}
    limits = {flag: limit for flag, _, limit in checks}
    relax = {flag: value for flag, value in needed(closest).items()}
    steps = ", ".join(
        f"{flag} from {shown(keys[flag], limits[flag])} to {shown(keys[flag], value)} "
        f"(+{100 * (value / limits[flag] - 1):.0f}%)"
        for flag, value in relax.items()
    )
    return {
        "arm": None,
        "reason": f"No arm fits every limit. The closest is {closest['arm']}: raise {steps}.",
        "relax": {  # in the flags' units: bytes, minutes
            flag.lstrip("-").replace("-", "_"): value / 60 if keys[flag] == "train_seconds" else value
            for flag, value in relax.items()
        },
        "closest_arm": closest["arm"],
        "runners_up": [],
    }


def run_recommend(args: Any) -> dict[str, Any]:
    """`peftkit recommend` from its parsed options."""
    results, source = load_results(args.results, args.model)
    limits = Limits(
        parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
        args.max_minutes * 60 if args.max_minutes is not None else None,
        parse_size(args.max_adapter_size, "--max-adapter-size") if args.max_adapter_size else None,
    )
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be above 0, got {args.max_minutes}.")
    answer = recommend(results, limits, args.prefer) | {"source": source}
    if args.json:
        print(json.dumps(answer))
        return answer
    print(f"from {source}:")
    print(answer["reason"])
    for r in answer["runners_up"]:
        print(f"  runner-up {r['arm']}: {r['why_not']}")
    if args.results is None:
        print(
            "This table was measured on a built-in model and data; `peftkit compare` on your own data and "
            "machine answers for them, and `peftkit recommend --results` reads its folder."
        )
    return answer
