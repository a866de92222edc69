"""Damaged, hostile or foreign adapter folders: `from_pretrained`, `load_adapter`, `from_composition` and the
readers in `peftkit.serialization` either load them correctly or refuse them with an error naming the file
(and the tensor or key) and what would be valid, leaving the model as it was: no adapter half added.

Weights: cut short at any byte, bit flips in the header (a clear error, or a file that still means the
same), bit flips in the data (undetectable by the format: the file loads, faithfully, unless the flip made a
value NaN or infinite), header lengths and offsets out of range, integer or boolean tensors, wrong shapes,
NaN and infinite values (refused, see `read_weights`), pickles. Configs: not JSON, empty, not an object,
unknown or missing `peft_type`, keys from a newer version (a warning naming the file). Folders: missing,
symbolic links leading outside. Nothing in a folder is ever executed."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from probes import cli_refuses, reads, refuses
from safetensors.torch import load, load_file, save_file

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.serialization import adapter_tensors, load_adapter_weights, load_config, read_weights

WEIGHTS, CONFIG, PICKLE = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
IDS = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
CORRUPT = ("cut short or corrupted",)


def lora_folder(folder: Path, seed: int = 7) -> torch.Tensor:
    """A LoRA adapter on tiny Llama saved in `folder`; returns the logits it computes."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return logits(model)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("saved")
    return folder, lora_folder(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory, saved) -> Path:
    """A copy of the saved adapter that a test (or each generated example) damages; `restore` resets it."""
    folder = tmp_path_factory.mktemp("work")
    restore(saved[0], folder)
    return folder


def restore(source: Path, folder: Path) -> None:
    for name in (WEIGHTS, CONFIG, PICKLE):
        if (folder / name).exists() or (folder / name).is_symlink():
            (folder / name).unlink()
    for name in (WEIGHTS, CONFIG):
        shutil.copyfile(source / name, folder / name)


def state(model: torch.nn.Module) -> tuple:
    """What a refused load must leave as it was: the module tree, every tensor, what trains, the adapters."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: t.detach().clone() for n, t in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        list(getattr(model, "peft_config", {})),
        getattr(model, "active_adapters", None),
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def refused_everywhere(folder: Path, *names: str, hints: tuple[str, ...] = ()) -> None:
    """from_pretrained onto a plain model and load_adapter onto a PeftModel both refuse the folder with a
    clear error naming `names`, and neither model changes."""
    base = tiny_llama()
    before = state(base)
    refuses(lambda: PeftModel.from_pretrained(base, str(folder)), *names, hints=hints)
    assert_same(before, state(base))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    before = state(peft_model)
    refuses(lambda: peft_model.load_adapter(str(folder), "other"), *names, hints=hints)
    assert_same(before, state(peft_model))


def header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def rewrite(folder: Path, change) -> None:
    """Save the weights file again with `change(tensors)` applied."""
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# ---- the weights file, byte by byte ------------------------------------------------------------------


def test_weights_cut_short_at_the_format_boundaries_are_refused(saved, work):
    raw = (saved[0] / WEIGHTS).read_bytes()
    end = header_end(raw)
    for cut in sorted({0, 1, 7, 8, 9, end // 2, end - 1, end, end + 1, end + 4, len(raw) - 4, len(raw) - 1}):
        (work / WEIGHTS).write_bytes(raw[:cut])
        refused_everywhere(work, WEIGHTS, hints=CORRUPT)
    restore(saved[0], work)


@given(st.data())
def test_weights_cut_short_anywhere_are_refused(saved, work, data):
    raw = (saved[0] / WEIGHTS).read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    (work / WEIGHTS).write_bytes(raw[:cut])
    base = tiny_llama()
    before = state(base)
    refuses(lambda: PeftModel.from_pretrained(base, str(work)), WEIGHTS, hints=CORRUPT)
    assert_same(before, state(base))


def flipped(raw: bytes, position: int, bit: int) -> bytes:
    damaged = bytearray(raw)
    damaged[position] ^= 1 << bit
    return bytes(damaged)


@given(st.data())
def test_a_bit_flip_in_the_header_is_refused_unless_the_file_means_the_same(saved, work, data):
    """Most flips break the JSON, a dtype, a shape or an offset (safetensors' own error, wrapped to name the
    file) or rename a tensor (refused as not fitting the model). A flip inside the free-form metadata or the
    padding leaves every tensor as it was: then the adapter loads and computes what it did."""
    folder, expected = saved
    raw = (folder / WEIGHTS).read_bytes()
    position = data.draw(st.integers(0, header_end(raw) - 1), label="position")
    damaged = flipped(raw, position, data.draw(st.integers(0, 7), label="bit"))
    (work / WEIGHTS).write_bytes(damaged)
    try:
        parsed = load(damaged)
    except Exception:
        parsed = None
    original = load(raw)
    same = parsed is not None and parsed.keys() == original.keys()
    same = same and all(torch.equal(parsed[k], original[k]) for k in parsed)
    base = tiny_llama()
    if same:
        loaded = reads(lambda: PeftModel.from_pretrained(base, str(work)))
        torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)
    else:
        before = state(base)
        refuses(lambda: PeftModel.from_pretrained(base, str(work)), WEIGHTS)
        assert_same(before, state(base))


@given(st.data())
def test_a_bit_flip_in_the_data_loads_as_written_unless_it_makes_a_value_non_finite(saved, work, data):
    """No checksum guards the tensors' bytes, so a flipped bit in them is undetectable: the adapter loads
    with exactly the values the damaged file holds. A flip that turns a value into NaN or an infinity is
    refused, naming the tensor."""
    raw = (saved[0] / WEIGHTS).read_bytes()
    position = data.draw(st.integers(header_end(raw), len(raw) - 1), label="position")
    damaged = flipped(raw, position, data.draw(st.integers(0, 7), label="bit"))
    (work / WEIGHTS).write_bytes(damaged)
    parsed = load(damaged)
    non_finite = [k for k, t in parsed.items() if not torch.isfinite(t).all()]
    if non_finite:
        refused_everywhere(work, WEIGHTS, non_finite[0], hints=("NaN or infinite",))
        return
    loaded = reads(lambda: PeftModel.from_pretrained(tiny_llama(), str(work)))
    held = adapter_tensors(loaded, "default")
    assert held.keys() == parsed.keys() and all(torch.equal(held[k], parsed[k]) for k in parsed)


def test_headers_out_of_range_are_refused_naming_the_file(saved, work):
    raw = (saved[0] / WEIGHTS).read_bytes()
    end = header_end(raw)
    header = json.loads(raw[8:end])
    header[Q_A]["data_offsets"] = [0, 10**9]
    beyond = json.dumps(header).encode()
    cases = {
        "a header length of 5 GiB": struct.pack("<Q", 5 * 2**30) + raw[8:],
        "a header length past the end": struct.pack("<Q", len(raw)) + raw[8:],
        "a header length of 0": struct.pack("<Q", 0) + raw[8:],
        "a header that is not JSON": struct.pack("<Q", 8) + b"not json" + raw[end:],
        "a JSON list as header": struct.pack("<Q", 8) + b"[1, 2]  " + raw[end:],
        "offsets out of range": struct.pack("<Q", len(beyond)) + beyond + raw[end:],
        "an empty file": b"",
    }
    for content in cases.values():
        (work / WEIGHTS).write_bytes(content)
        refused_everywhere(work, WEIGHTS, hints=CORRUPT)
    restore(saved[0], work)


# ---- the weights file, tensor by tensor --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_or_boolean_weights_are_refused_naming_the_tensor_and_the_dtype(saved, work, dtype):
    rewrite(work, lambda t: t.update({Q_B: (t[Q_B] * 100).to(dtype)}))
    refused_everywhere(work, WEIGHTS, Q_B, str(dtype).removeprefix("torch."), hints=("float32",))
    restore(saved[0], work)


def test_wrong_shapes_are_refused_naming_the_key_and_both_shapes(saved, work):
    rewrite(work, lambda t: t.update({Q_A: torch.zeros(5, 32)}))
    refused_everywhere(work, WEIGHTS, Q_A, "(5, 32)", "(4, 32)")
    restore(saved[0], work)
    config = json.loads((work / CONFIG).read_text())
    (work / CONFIG).write_text(json.dumps({**config, "r": 8}))
    refused_everywhere(work, WEIGHTS, Q_A, "(4, 32)", "(8, 32)", hints=("config",))
    restore(saved[0], work)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensors(saved, work, value):
    """The decision: refuse (see `read_weights`); an adapter with NaN or inf makes every output NaN."""
    rewrite(work, lambda t: t[Q_B].view(-1).__setitem__(3, value))
    refused_everywhere(work, WEIGHTS, Q_B, hints=("NaN or infinite", "earlier checkpoint"))
    refuses(lambda: read_weights(str(work)), WEIGHTS, Q_B, hints=("NaN or infinite",))
    restore(saved[0], work)


def test_a_weights_file_of_another_kind_is_refused_by_load_adapter_weights_naming_it(saved):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    weights = load_file(saved[0] / WEIGHTS)
    weights[Q_A] = weights[Q_A].to(torch.int16)
    source = "x/adapter_model.safetensors"
    load_it = lambda: load_adapter_weights(model, "default", weights, source)  # noqa: E731
    refuses(load_it, source, Q_A, "int16", hints=("float32",))


# ---- the config --------------------------------------------------------------------------------------


CONFIGS = {
    "empty": (b"", ("empty",)),
    "blank": (b"  \n", ("empty",)),
    "cut short": (b'{"peft_type": "LO', ("not valid JSON",)),
    "not JSON": (b"peft_type = LORA", ("not valid JSON",)),
    "not UTF-8": (b'{"peft_type": "\xff\xfe"}', ("not valid JSON",)),
    "a list": (b'["LORA"]', ("JSON object",)),
    "a string": (b'"LORA"', ("JSON object",)),
    "null": (b"null", ("JSON object",)),
    "a number": (b"3", ("JSON object",)),
    "no peft_type": (b'{"r": 4}', ("peft_type", "JSON object")),
    "an unknown peft_type": (b'{"peft_type": "NOT_A_METHOD"}', ("NOT_A_METHOD", "known", "LORA", "IA3")),
    "a list as peft_type": (b'{"peft_type": ["LORA"]}', ("peft_type", "LORA", "known")),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_broken_config_is_refused_naming_the_file(saved, work, case):
    content, hints = CONFIGS[case]
    (work / CONFIG).write_bytes(content)
    refused_everywhere(work, CONFIG, hints=hints)
    refuses(lambda: load_config(str(work)), CONFIG, hints=hints)
    restore(saved[0], work)


def test_keys_from_a_newer_version_warn_naming_the_file_and_load(saved, work):
    config = json.loads((work / CONFIG).read_text())
    (work / CONFIG).write_text(json.dumps({**config, "option_of_the_future": 1}))
    with pytest.warns(UserWarning, match="option_of_the_future") as caught:
        loaded = reads(lambda: PeftModel.from_pretrained(tiny_llama(), str(work)))
    assert any(str(work / CONFIG) in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(logits(loaded), saved[1], atol=0, rtol=0)
    restore(saved[0], work)


# ---- folders -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["does not exist", "is a file"])
def test_a_missing_folder_or_a_file_instead_is_refused_naming_it(tmp_path, what):
    path = tmp_path / "adapter"
    if what == "is a file":
        path.write_text("x")
    base = tiny_llama()
    before = state(base)
    hints = (what, "save_pretrained")
    refuses(lambda: PeftModel.from_pretrained(base, str(path)), str(path), hints=hints)
    refuses(lambda: PeftModel.from_composition(base, str(path)), str(path), hints=hints)
    refuses(lambda: load_config(str(path)), str(path), hints=hints)
    refuses(lambda: read_weights(str(path)), str(path), hints=hints)
    assert_same(before, state(base))
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    refuses(lambda: model.load_adapter(str(path), "other"), str(path), hints=hints)
    refuses(lambda: PeftModel.from_pretrained(tiny_llama(), 3), "int", hints=("path",))


def test_a_folder_without_weights_is_refused(saved, work):
    (work / WEIGHTS).unlink()
    refused_everywhere(work, WEIGHTS, str(work))
    restore(saved[0], work)


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
def test_a_symbolic_link_leading_outside_the_folder_is_refused_naming_link_and_target(saved, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(saved[0] / name, elsewhere / name)
    folder = tmp_path / "adapter"
    folder.mkdir()
    restore(saved[0], folder)
    (folder / name).unlink()
    (folder / name).symlink_to(elsewhere / name)
    target = os.path.realpath(elsewhere / name)
    refused_everywhere(folder, str(folder / name), target, hints=("outside",))
    relative = tmp_path / "relative"  # a relative link climbing out is refused too
    shutil.copytree(folder, relative, symlinks=True)
    (relative / name).unlink()
    (relative / name).symlink_to(Path("..") / "elsewhere" / name)
    refused_everywhere(relative, str(relative / name), target, hints=("outside",))


def test_a_symbolic_link_inside_the_folder_is_followed(saved, tmp_path):
    folder = tmp_path / "adapter"
    (folder / "blobs").mkdir(parents=True)
    for name in (WEIGHTS, CONFIG):
        shutil.copyfile(saved[0] / name, folder / "blobs" / name)
        (folder / name).symlink_to(Path("blobs") / name)
    loaded = reads(lambda: PeftModel.from_pretrained(tiny_llama(), str(folder)))
    torch.testing.assert_close(logits(loaded), saved[1], atol=0, rtol=0)


# ---- pickles -----------------------------------------------------------------------------------------


class Hostile:
    """Unpickled, this would create the file `marker`: pickle calls builtins.open(marker, "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def pickle_only(saved: Path, folder: Path, content: object | None = None) -> None:
    folder.mkdir(exist_ok=True)
    shutil.copyfile(saved / CONFIG, folder / CONFIG)
    torch.save(load_file(saved / WEIGHTS) if content is None else content, folder / PICKLE)


def test_pickled_weights_load_only_when_allowed_and_with_weights_only(saved, tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    pickle_only(saved[0], folder)
    refused_everywhere(folder, PICKLE, hints=("allow_pickle=True",))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = reads(lambda: PeftModel.from_pretrained(tiny_llama(), str(folder), allow_pickle=True))
    torch.testing.assert_close(logits(loaded), saved[1], atol=0, rtol=0)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_loading_never_runs_code_from_the_folder(saved, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "hostile"
    pickle_only(saved[0], folder, {Q_A: Hostile(marker)})
    refused_everywhere(folder, PICKLE, hints=("allow_pickle=True",))
    assert not marker.exists()
    base = tiny_llama()
    before = state(base)
    refuses(
        lambda: PeftModel.from_pretrained(base, str(folder), allow_pickle=True),
        PICKLE,
        "open",
        hints=("more than tensors", "safetensors"),
    )
    assert not marker.exists()
    assert_same(before, state(base))
    (folder / WEIGHTS).symlink_to(folder / PICKLE)  # a pickle named .safetensors is not unpickled either
    refuses(lambda: PeftModel.from_pretrained(base, str(folder), allow_pickle=True), WEIGHTS, hints=CORRUPT)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["cut short", "a list", "not tensors"])
def test_pickles_that_are_not_a_dict_of_tensors_are_refused(saved, tmp_path, case):
    folder = tmp_path / "bin"
    content = {"a list": [torch.zeros(2)], "not tensors": {Q_A: 3}}.get(case)
    pickle_only(saved[0], folder, content)
    if case == "cut short":
        raw = (folder / PICKLE).read_bytes()
        (folder / PICKLE).write_bytes(raw[: len(raw) // 2])
    base = tiny_llama()
    refuses(lambda: PeftModel.from_pretrained(base, str(folder), allow_pickle=True), PICKLE)


# ---- compositions, and the command line ---------------------------------------------------------------


def test_a_composition_with_a_broken_adapter_leaves_the_model_as_it_was(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    model.add_adapter("second", LoraConfig(target_modules=["v_proj"], r=2))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    raw = (tmp_path / "second" / WEIGHTS).read_bytes()
    (tmp_path / "second" / WEIGHTS).write_bytes(raw[:-10])
    base = tiny_llama()
    before = state(base)
    refuses(lambda: PeftModel.from_composition(base, str(tmp_path)), str(tmp_path / "second" / WEIGHTS))
    assert_same(before, state(base))
    (tmp_path / "adapter_composition.json").write_text('{"adapters": ["default", "second"')
    refuses(
        lambda: PeftModel.from_composition(base, str(tmp_path)), "adapter_composition.json", hints=("JSON",)
    )


def test_the_command_line_names_the_damaged_file(causal_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(causal_folder), LoraConfig(r=2))
    model.save_pretrained(tmp_path / "adapter")
    raw = (tmp_path / "adapter" / WEIGHTS).read_bytes()
    (tmp_path / "adapter" / WEIGHTS).write_bytes(raw[: len(raw) // 2])
    argv = ["merge", "--adapter", tmp_path / "adapter", "--model", causal_folder, "--output", tmp_path / "m"]
    cli_refuses(argv, WEIGHTS, hints=CORRUPT)
    assert not (tmp_path / "m").exists()
    (tmp_path / "adapter" / CONFIG).write_text("{")
    cli_refuses(argv, CONFIG, hints=("not valid JSON",))
