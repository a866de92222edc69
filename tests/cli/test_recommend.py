"""`peftkit recommend`: the best measured arm within the user's limits, on hand-built results (no
training)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from peftkit.cli import main
from peftkit.cli.recommend import SHIPPED, Limits, load_results, parse_size, recommend

GiB, MiB = 2**30, 2**20


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def arm(name, accuracy, memory, seconds, adapter, spread=0.0, trainable=1000, **extra) -> dict:
    """A row as `peftkit compare` writes it to results.json."""
    return {
        "arm": name,
        "method": name,
        "options": ["--method", name],
        "status": "ok",
        "error": None,
        "seeds": 1,
        "seeds_ok": 1,
        "metrics": {"accuracy": accuracy, "f1": accuracy - 0.05},
        "metrics_spread": {"accuracy": spread, "f1": 0.0},
        "trainable_parameters": trainable,
        "adapter_bytes": adapter,
        "peak_memory_bytes": memory,
        "train_seconds": seconds,
        "seconds_per_step": seconds / 100,
    } | extra


def results() -> list[dict]:
    """lora, ia3 and vera are within 1% of one another, each cheapest in one way; prompt is cheapest in
    every way but far worse; full is the best and the dearest; one arm failed."""
    return [
        arm("lora", 0.900, 2 * GiB, 200, 10_000_000, trainable=300_000),
        arm("ia3", 0.895, 1 * GiB, 300, 1_000_000),
        arm("vera", 0.896, 1.5 * GiB, 400, 50_000),
        arm("prompt", 0.800, 512 * MiB, 100, 100_000),
        arm("full", 0.930, 8 * GiB, 1200, 400_000_000, trainable=20_000_000),
        {
            "arm": "broken",
            "method": "lora",
            "status": "failed",
            "error": "it broke",
            "seeds": 1,
            "seeds_ok": 0,
        },
    ]


# ---- the choice ------------------------------------------------------------------------------------


def test_without_limits_the_best_quality():
    answer = recommend(results())
    assert (answer["arm"], answer["method"], answer["metric"]) == ("full", "full", "accuracy")
    assert answer["options"] == ["--method", "full"] and answer["metrics"] == {"accuracy": 0.93, "f1": 0.88}
    assert answer["fitting_arms"] == 5  # the failed arm is not one
    assert answer["reason"] == (
        "full: the best held-out accuracy (0.9300), of 5 arms that fit; accuracy 0.9300, 20,000,000 "
        "trainable parameters, adapter 381.5 MiB, peak memory 8.0 GiB, training 20.0 min."
    )
    assert answer["runners_up"] == [
        {"arm": "lora", "accuracy": 0.9, "why_not": "accuracy 0.9000 against 0.9300"},
        {"arm": "vera", "accuracy": 0.896, "why_not": "accuracy 0.8960 against 0.9300"},
        {"arm": "ia3", "accuracy": 0.895, "why_not": "accuracy 0.8950 against 0.9300"},
    ]


def test_a_tie_in_quality_goes_to_the_smaller_adapter_and_says_so():
    tied = [
        arm("big", 0.9, GiB, 100, 4 * MiB),
        arm("small", 0.9, 2 * GiB, 200, MiB),
        arm("low", 0.8, GiB, 50, 1),
    ]
    answer = recommend(tied)
    assert answer["arm"] == "small"
    assert answer["runners_up"] == [
        {
            "arm": "big",
            "accuracy": 0.9,
            "why_not": "accuracy tied at 0.9000; adapter 4.0 MiB against 1.0 MiB",
        },
        {"arm": "low", "accuracy": 0.8, "why_not": "accuracy 0.8000 against 0.9000"},
    ]


@pytest.mark.parametrize(
    "limits, chosen, fitting",
    [
        (Limits(max_memory=4 * GiB), "lora", 4),  # full's 8 GiB is out
        (Limits(max_memory=GiB), "ia3", 2),  # exactly at the limit fits
        (Limits(max_seconds=360), "lora", 3),  # --max-minutes 6: lora (200 s), ia3 (300 s), prompt
        (Limits(max_seconds=150), "prompt", 1),
        (Limits(max_adapter_bytes=5_000_000), "vera", 3),  # lora's 10 MB and full's 400 MB are out
        (Limits(max_memory=4 * GiB, max_seconds=250, max_adapter_bytes=5_000_000), "prompt", 1),
    ],
)
def test_the_best_quality_within_each_limit(limits, chosen, fitting):
    answer = recommend(results(), limits)
    assert (answer["arm"], answer["fitting_arms"]) == (chosen, fitting)


def test_the_reason_names_the_limits():
    answer = recommend(results(), Limits(max_memory=4 * GiB, max_seconds=600, max_adapter_bytes=20 * MiB))
    assert answer["arm"] == "lora"
    assert answer["reason"].startswith(
        "lora: the best held-out accuracy (0.9000) within --max-memory 4.0 GiB, --max-minutes 10.0 min, "
        "--max-adapter-size 20.0 MiB, of 4 arms that fit; accuracy 0.9000, 300,000 trainable parameters, "
        "adapter 9.5 MiB, peak memory 2.0 GiB, training 3.3 min."
    )


@pytest.mark.parametrize(
    "prefer, chosen",
    [("quality", "lora"), ("memory", "ia3"), ("speed", "lora"), ("size", "vera")],
)
def test_each_preference_takes_the_cheapest_of_the_equally_good(prefer, chosen):
    """Within 4 GiB the best is lora (0.900); ia3 (0.895) and vera (0.896) are within 1% of it (0.009),
    prompt (0.800) is not, though it is the cheapest every way."""
    assert recommend(results(), Limits(max_memory=4 * GiB), prefer)["arm"] == chosen


def test_a_preference_explains_itself_and_its_runners_up():
    answer = recommend(results(), Limits(max_memory=4 * GiB), "memory")
    assert answer["reason"].startswith(
        "ia3: the least peak training memory (1.0 GiB) among the arms whose accuracy is within 0.0090 of the "
        "best (lora, 0.9000) within --max-memory 4.0 GiB, of 4 arms that fit; accuracy 0.8950, "
    )
    assert answer["runners_up"] == [
        {"arm": "vera", "accuracy": 0.896, "why_not": "1.5 GiB against 1.0 GiB"},
        {"arm": "lora", "accuracy": 0.9, "why_not": "2.0 GiB against 1.0 GiB"},
        {"arm": "prompt", "accuracy": 0.8, "why_not": "accuracy 0.8000 against 0.8950"},  # less memory, worse
    ]
    by_size = recommend(results(), Limits(max_memory=4 * GiB), "size")
    assert "the least adapter size (48.8 KiB)" in by_size["reason"]
    by_speed = recommend(results(), Limits(max_memory=4 * GiB), "speed")
    assert "the least training time (3.3 min)" in by_speed["reason"]


def test_the_seed_spread_widens_the_tolerance():
    """With lora's accuracy spread over seeds 0.15, prompt (0.1 behind) counts as equally good."""
    spread = results()
    spread[0]["metrics_spread"]["accuracy"] = 0.15
    assert recommend(results(), Limits(max_memory=4 * GiB), "memory")["arm"] == "ia3"
    answer = recommend(spread, Limits(max_memory=4 * GiB), "memory")
    assert answer["arm"] == "prompt" and "within 0.1500 of the best (lora, 0.9000)" in answer["reason"]


def test_the_tolerance_is_one_percent_of_the_best():
    """0.9 - 0.8915 = 0.0085 is within 0.009; 0.9 - 0.8905 = 0.0095 is not."""
    inside = [arm("a", 0.9, 2 * GiB, 10, 10), arm("b", 0.8915, GiB, 10, 10)]
    outside = [arm("a", 0.9, 2 * GiB, 10, 10), arm("b", 0.8905, GiB, 10, 10)]
    assert recommend(inside, prefer="memory")["arm"] == "b"
    assert recommend(outside, prefer="memory")["arm"] == "a"


def test_equal_quality_goes_to_the_smaller_adapter():
    tied = [arm("big", 0.9, GiB, 10, 10_000), arm("small", 0.9, GiB, 10, 1_000), arm("worse", 0.8, GiB, 1, 1)]
    answer = recommend(tied)
    assert answer["arm"] == "small" and [r["arm"] for r in answer["runners_up"]] == ["big", "worse"]
    # preferring memory, equal memory goes to the better quality
    same_memory = [arm("a", 0.895, GiB, 10, 10), arm("b", 0.9, GiB, 10, 10)]
    assert recommend(same_memory, prefer="memory")["arm"] == "b"


def test_lower_perplexity_is_better():
    rows = [arm("a", 0, 2 * GiB, 10, 10), arm("b", 0, GiB, 10, 10), arm("c", 0, GiB // 2, 10, 10)]
    for row, ppl in zip(rows, (10.0, 10.05, 12.0), strict=True):
        row["metrics"], row["metrics_spread"] = {"perplexity": ppl}, {"perplexity": 0.0}
    assert recommend(rows)["arm"] == "a"
    answer = recommend(rows, prefer="memory")  # 1% of 10 is 0.1: b is as good, c is not
    assert answer["arm"] == "b" and answer["metric"] == "perplexity"


# ---- nothing fits ------------------------------------------------------------------------------------


def test_nothing_fits_names_the_closest_arm_and_how_far_to_relax():
    """Within 256 MiB and 1 minute the limits would grow by (memory share + time share): lora 7 + 2.33,
    ia3 3 + 4, vera 5 + 5.67, prompt 1 + 0.67, full more: prompt is the closest."""
    answer = recommend(results(), Limits(max_memory=256 * MiB, max_seconds=60))
    assert (answer["arm"], answer["closest_arm"], answer["runners_up"]) == (None, "prompt", [])
    assert answer["reason"] == (
        "No arm fits every limit. The closest is prompt: raise --max-memory from 256.0 MiB to 512.0 MiB "
        "(+100%), --max-minutes from 1.0 min to 1.7 min (+67%)."
    )
    assert answer["relax"]["max_memory"] == 512 * MiB


def test_the_relaxation_is_in_the_flags_units():
    """`relax` names the flags (max_minutes): the value to pass them, minutes for --max-minutes."""
    answer = recommend(results(), Limits(max_memory=256 * MiB, max_seconds=60))
    assert answer["relax"] == {"max_memory": 512 * MiB, "max_minutes": pytest.approx(100 / 60)}


def test_nothing_fits_relaxes_only_the_limits_in_the_way():
    answer = recommend(results(), Limits(max_memory=4 * GiB, max_adapter_bytes=10_000))
    assert answer["closest_arm"] == "vera"  # 50 kB: +400%, prompt's 100 kB +900%
    assert answer["relax"] == {"max_adapter_size": 50_000}
    assert answer["reason"].endswith("raise --max-adapter-size from 9.8 KiB to 48.8 KiB (+400%).")


# ---- bad input -----------------------------------------------------------------------------------------


def test_a_bad_preference_is_refused():
    with pytest.raises(ValueError, match=r"--prefer 'fast': choose one of quality, memory, speed, size\."):
        recommend(results(), prefer="fast")


def test_results_without_a_finished_arm_are_refused():
    with pytest.raises(
        ValueError, match=r"hold no arm that finished; run peftkit compare again \(--resume\)"
    ):
        recommend(results()[-1:])


@pytest.mark.parametrize(
    "text, size",
    [
        ("4GiB", 4 * 2**30),
        ("500MB", 500 * 10**6),
        ("10MiB", 10 * 2**20),
        ("512k", 512_000),
        ("2000000", 2_000_000),
        ("1.5G", 1_500_000_000),
        (" 3 gb ", 3 * 10**9),
        (".5KiB", 512),
        ("2TiB", 2 * 2**40),
        ("1tb", 10**12),
        ("7b", 7),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text, "--max-memory") == size


@pytest.mark.parametrize("text", ["4 parsecs", "", "GiB", "-1GB", "1e9", "4 G B", "1,000"])
def test_a_bad_size_says_what_a_size_looks_like(text):
    with pytest.raises(
        ValueError, match=rf"--max-adapter-size {text!r}: give a size such as 4GiB, 500MB or 10MiB\."
    ):
        parse_size(text, "--max-adapter-size")


# ---- where the results come from -------------------------------------------------------------------


def test_load_results_from_a_folder_or_a_file(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(results()))
    assert load_results(tmp_path) == (results(), str(tmp_path / "results.json"))
    assert load_results(tmp_path / "results.json") == (results(), str(tmp_path / "results.json"))


def test_load_results_refuses_what_is_not_a_comparison(tmp_path):
    with pytest.raises(
        ValueError, match=rf"--results {re.escape(str(tmp_path))}: no results.json there; run peftkit compare"
    ):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"results.json is not a results file \(.*\); write it with peftkit compare"
    ):
        load_results(tmp_path)
    with pytest.raises(
        ValueError, match=r"No measured table ships for 'gpt5' \(only minilm, smollm2\); pass --results"
    ):
        load_results(None, "gpt5")


@pytest.mark.parametrize("model", list(SHIPPED))
def test_the_shipped_tables_recommend_one_of_their_arms(model):
    assert resources.files("peftkit").joinpath(f"data/measured/{SHIPPED[model]}").is_file()
    rows, source = load_results(None, model)
    assert source == f"the table shipped with peftkit ({SHIPPED[model]})"
    finished = [r["arm"] for r in rows if r["status"] == "ok"]
    assert finished and recommend(rows)["arm"] in finished


def test_a_table_missing_from_this_copy_says_how_to_measure_one(monkeypatch):
    monkeypatch.setitem(SHIPPED, "smollm2", "absent.json")
    with pytest.raises(
        ValueError,
        match="No measured table for 'smollm2' ships with this copy of peftkit; run "
        "peftkit compare --model smollm2 and pass its folder with --results.",
    ):
        load_results(None, "smollm2")


# ---- the command -------------------------------------------------------------------------------------


@pytest.fixture
def results_folder(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(results()))
    return tmp_path


def test_recommend_json(results_folder, capsys):
    capsys.readouterr()
    argv = ["recommend", "--results", results_folder, "--max-memory", "4GiB", "--prefer", "size", "--json"]
    assert cli(*argv) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer == recommend(results(), Limits(max_memory=4 * GiB), "size") | {
        "source": str(results_folder / "results.json")
    }
    assert answer["arm"] == "vera"


def test_recommend_minutes_and_sizes_on_the_command_line(results_folder, capsys):
    capsys.readouterr()
    argv = [
        "recommend",
        "--results",
        results_folder,
        "--max-minutes",
        4,
        "--max-adapter-size",
        "2MB",
        "--json",
    ]
    assert cli(*argv) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["arm"] == "prompt" and answer["fitting_arms"] == 1  # lora fits the time, not the size


def test_recommend_prints_the_reason_and_runners_up(results_folder, capsys):
    capsys.readouterr()
    assert cli("recommend", "--results", results_folder, "--max-memory", "4GiB", "--prefer", "memory") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"from {results_folder / 'results.json'}:"
    assert lines[1].startswith("ia3: the least peak training memory (1.0 GiB)")
    assert lines[2:] == [
        "  runner-up vera: 1.5 GiB against 1.0 GiB",
        "  runner-up lora: 2.0 GiB against 1.0 GiB",
        "  runner-up prompt: accuracy 0.8000 against 0.8950",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-minutes", 0], "--max-minutes must be above 0, got 0.0."),
        (["--max-minutes", -5], "--max-minutes must be above 0, got -5.0."),
        (["--max-memory", "lots"], "--max-memory 'lots': give a size such as 4GiB, 500MB or 10MiB."),
    ],
)
def test_recommend_refuses_bad_limits(results_folder, capsys, extra, message):
    capsys.readouterr()
    assert cli("recommend", "--results", results_folder, *extra) == 2
    assert message in capsys.readouterr().err


def test_recommend_refuses_an_unknown_preference(results_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("recommend", "--results", results_folder, "--prefer", "cheap")
    assert exit_.value.code == 2
    assert "argument --prefer: invalid choice: 'cheap'" in capsys.readouterr().err
