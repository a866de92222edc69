"""Adapter names are module keys and, in `save_pretrained`, sub-folder names: every way a name enters a
model (`get_peft_model`, `add_adapter`, `load_adapter`, `from_pretrained`, `adapter_composition.json`)
refuses one that could not be both, naming it and what is valid, and `save_pretrained` never writes
outside the directory it is given, even for a name put into `peft_config` by hand or a sub-folder that
is a symbolic link."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from hypothesis import assume, example, given
from hypothesis import strategies as st
from probes import left_intact, reads, refuses

from peftkit import LoraConfig, PeftModel, get_peft_model

IDS = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
VALID = ("non-empty string", "'/'", "__base__")  # what every refusal says is valid
BAD_NAMES = [
    "",
    "a/b",
    "a\\b",
    "..",
    "../escape",
    "..\\escape",
    "/tmp/absolute",
    "C:\\absolute",
    "a.b",
    ".",
    "__base__",
    "nul\x00byte",
    "line\nbreak",
    "tab\there",
    "\u200b",  # zero-width space: unprintable
    "é" * 128,  # 256 bytes: longer than a folder name
]
NOT_STRINGS = [None, 3, 1.5, b"bytes", ("a",), ["a"], Path("a")]


def config() -> LoraConfig:
    return LoraConfig(target_modules=["q_proj"], r=2)


def lora_model(seed: int = 7) -> PeftModel:
    model = get_peft_model(tiny_llama(), config())
    randomize_adapters(model, seed=seed)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    lora_model().save_pretrained(folder)
    return folder


def refused_name(call, name) -> None:
    """A clear error naming the value (as Python writes it) and what a valid name is."""
    kind = (TypeError,) if not isinstance(name, str) else (ValueError,)
    refuses(call, repr(name), hints=() if kind == (TypeError,) else VALID, types=kind)


@pytest.mark.parametrize("name", BAD_NAMES + NOT_STRINGS, ids=repr)
def test_a_bad_name_is_refused_wherever_an_adapter_is_added(name, saved):
    base = tiny_llama()
    modules = [(n, type(m)) for n, m in base.named_modules()]
    refused_name(lambda: get_peft_model(base, config(), adapter_name=name), name)
    refused_name(lambda: PeftModel.from_pretrained(base, str(saved), adapter_name=name), name)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    assert all(p.requires_grad for p in base.parameters())  # not frozen by a wrapping that was refused
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refused_name(lambda: model.add_adapter(name, config()), name)
    refused_name(lambda: model.load_adapter(str(saved), name), name)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_bad_name_in_a_composition_file_is_refused_naming_the_file(name, tmp_path):
    model = lora_model()
    model.add_adapter("second", config())
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_composition.json").write_text(json.dumps({"adapters": ["default", name]}))
    base = tiny_llama()
    refuses(
        lambda: PeftModel.from_composition(base, str(tmp_path)),
        "adapter_composition.json",
        repr(name),
        hints=VALID,
    )
    assert not any(type(m).__name__ == "TunedLayer" for m in base.modules())


def test_save_never_writes_outside_its_directory_even_for_a_name_put_in_by_hand(tmp_path):
    model = lora_model()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for bad in ("../outside", str(outside), "..", "x/../../outside"):
        model.peft_config[bad] = model.peft_config["default"]
        with left_intact(tmp_path):
            refuses(lambda: model.save_pretrained(tmp_path / "out"), repr(bad), hints=VALID)  # noqa: B023
        del model.peft_config[bad]
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_sub_folder_that_links_outside(tmp_path):
    model = lora_model()
    model.add_adapter("second", config())
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "second").symlink_to(elsewhere, target_is_directory=True)
    with left_intact(tmp_path):
        refuses(lambda: model.save_pretrained(out), "'second'", os.path.realpath(elsewhere), hints=("link",))


def test_a_composition_folder_that_links_outside_is_refused(tmp_path):
    model = lora_model()
    model.add_adapter("second", config())
    model.save_pretrained(tmp_path / "out")
    shutil.move(tmp_path / "out" / "second", tmp_path / "elsewhere")
    (tmp_path / "out" / "second").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    refuses(
        lambda: PeftModel.from_composition(tiny_llama(), str(tmp_path / "out")),
        "'second'",
        os.path.realpath(tmp_path / "elsewhere"),
        hints=("outside",),
    )


def test_save_pretrained_needs_a_directory(tmp_path):
    model = lora_model()
    for bad in ("", None, 3):
        refuses(lambda: model.save_pretrained(bad), repr(bad), hints=("directory",))  # noqa: B023
    (tmp_path / "file").write_text("x")
    refuses(lambda: model.save_pretrained(tmp_path / "file"), str(tmp_path / "file"), hints=("directory",))


IDENTIFIERS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,20}", fullmatch=True)
TRICKY = st.sampled_from(["..", "../x", "/x", "a/b", "a\\b", "__base__", "", "x.y", "\x00", "~", " ", "日本"])
NAMES = st.one_of(IDENTIFIERS, st.text(max_size=16), TRICKY)


@given(name=NAMES)
@example(name="task-a")
@example(name="../escape")
@example(name="日本語 adapter")
def test_a_generated_name_is_refused_or_saved_inside_and_restored(name, tmp_path_factory):
    """Either a clear error naming it, or: saved strictly under the directory given (nothing appears beside
    it) and restored under the same name by from_composition, computing the same."""
    assume(name != "default")
    parent = tmp_path_factory.mktemp("parent")
    (parent / "beside").mkdir()
    (parent / "beside" / "keep.txt").write_text("untouched")
    model = lora_model()
    dangerous = name in ("", "__base__") or any(c in name for c in "/\\.")
    try:
        model.add_adapter(name, LoraConfig(target_modules=["v_proj"], r=2))
    except Exception:
        dangerous = True
    if dangerous:  # refused (again, through the probe: a name accepted above fails it as "exists already")
        refused_name(lambda: model.add_adapter(name, config()), name)
        assert list(model.peft_config) == ["default"]
        return
    model.set_adapter(["default", name])
    randomize_adapters(model, seed=3)
    expected = logits(model)
    out = parent / "out"
    with left_intact(parent / "beside"):
        model.save_pretrained(out)
    assert sorted(p.name for p in parent.iterdir()) == ["beside", "out"]
    written = [os.path.realpath(p) for p in out.rglob("*")]
    assert all(p.startswith(os.path.realpath(out) + os.sep) for p in written)
    assert (out / name / "adapter_config.json").is_file()
    restored = reads(lambda: PeftModel.from_composition(tiny_llama(), str(out)))
    assert list(restored.peft_config) == ["default", name]
    assert restored.active_adapters == ["default", name]
    torch.testing.assert_close(logits(restored), expected, atol=1e-6, rtol=0)
