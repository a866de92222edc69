"""Every config class over generated values: a value outside an option's domain is refused when the config
is built (and when adapter_config.json is read), naming the option and saying what is valid; a config that
builds either adapts a tiny model and runs a forward, or get_peft_model refuses it naming an option."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from probes import cli_refuses, left_intact, reads, refuses

from peftkit import PeftModel, get_peft_model
from peftkit.methods import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    DiffPruningConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from peftkit.methods.prompt_tuning import PromptTuningInit
from peftkit.registry import METHODS

NAN, INF = math.nan, math.inf
INPUT_IDS = torch.tensor([[3, 4, 5, 6, 7]])


@dataclass
class Spec:
    """Values of one option: `valid` ones are in its domain (they may still contradict other options or not
    fit the model), `invalid` ones never are; `hint` is what a refusal must say is valid."""

    valid: list
    invalid: list
    hint: str


NOT_INTEGERS = [True, 2.5, "8", NAN, [2]]


def positive(*valid: Any, optional: bool = False) -> Spec:
    return Spec(
        [*valid, *([None] if optional else [])],
        [0, -3, *NOT_INTEGERS, *([] if optional else [None])],
        "positive integer",
    )


def at_least_zero(*valid: int) -> Spec:
    return Spec(list(valid), [-1, True, 1.5, "0", None], "integer >= 0")


def boolean() -> Spec:
    return Spec([True, False], [1, 0, "yes", "False", None], "True or False")


def finite(*valid: float) -> Spec:
    return Spec(list(valid), [NAN, INF, -INF, "8", True, None, [1.0]], "finite number")


def choice(valid: list, invalid: list) -> Spec:
    return Spec(valid, invalid, "use one of")


DROPOUT = Spec([0.0, 0.1, 0.5], [1.0, -0.1, 1.5, NAN, INF, "0.1", True, None], "in [0, 1)")
NAMES_INVALID = [5, [1], {"q_proj": 1}, "(", "a{99999999999}", "", [""], ["q_proj", None], b"q_proj", 2.5]
BASE = {
    "task_type": choice([None, "CAUSAL_LM"], ["causal", 5, "", True]),
    "base_model_name_or_path": Spec([None, "tiny-model"], [5, ["tiny-model"]], "a string"),
    "revision": Spec([None, "main"], [3, ["main"]], "a string"),
    "inference_mode": boolean(),
    "modules_to_save": Spec(
        [None, ["lm_head"], "lm_head"], [3, [3], [""], {"lm_head": 1}, ""], "module names"
    ),
}


def layer_selection(targets: list, layers_pattern: list) -> dict[str, Spec]:
    return {
        "target_modules": Spec([None, *targets, ["nothing_here"]], NAMES_INVALID, "list of module names"),
        "exclude_modules": Spec([None, ["v_proj"], "nothing"], NAMES_INVALID, "list of module names"),
        "layers_to_transform": Spec(
            [None, 0, [0], [1], (0, 1), [7]], [-1, "0", ["0"], [True], 0.5, [-1], {0: 1}], "layer ind"
        ),
        "layers_pattern": Spec(
            [None, *layers_pattern],
            [5, "(", "(?i)layers", [""], ["layers", 3], {"layers": 1}],
            "e.g. 'layers'",
        ),
    }


LLAMA_TARGETS = [["q_proj", "v_proj"], ("k_proj",), {"o_proj"}, "all-linear", r".*\.v_proj"]
LORA = {
    **BASE,
    **layer_selection(LLAMA_TARGETS, ["layers", ["layers"], "h"]),
    "r": positive(1, 4, 8, 40),
    "lora_alpha": finite(8, 16, 0.5, 0, -4),
    "lora_dropout": DROPOUT,
    "fan_in_fan_out": boolean(),
    "bias": choice(["none", "all", "lora_only"], ["some", None, True, 0]),
    "use_rslora": boolean(),
    "init_lora_weights": Spec(
        [True, False, "gaussian", "pissa", "olora", "pissa_niter_2"],
        ["loftq", 1, 0, None, "pissa_niter_x", "PISSA"],
        "not available in peftkit; use one of",
    ),
    "rank_pattern": Spec(
        [None, {}, {"q_proj": 2}, {r".*v_proj": 4}],
        [
            5,
            [("q_proj", 2)],
            {"q_proj": 0},
            {"q_proj": "2"},
            {1: 2},
            {"(": 2},
            {"(?i)q": 2},
            {"q_proj": True},
        ],
        "must be",
    ),
    "alpha_pattern": Spec(
        [None, {"q_proj": 4.0}], [5, {"q_proj": "x"}, {"q_proj": NAN}, {2: 1.0}], "must be"
    ),
    "use_dora": boolean(),
}
ADALORA = {
    **BASE,
    **layer_selection(LLAMA_TARGETS, ["layers"]),
    "lora_alpha": Spec([8, 0.5], [0, -1, NAN, INF, "8", True, None], "finite number > 0"),
    "lora_dropout": DROPOUT,
    "fan_in_fan_out": boolean(),
    "bias": choice(["none", "all", "lora_only"], ["some", None]),
    "init_lora_weights": choice([True, False], ["pissa", 1, 0, None]),
    "target_r": at_least_zero(0, 1, 4, 8, 16),
    "init_r": positive(1, 4, 12),
    "tinit": at_least_zero(0, 2, 5, 9),
    "tfinal": at_least_zero(0, 2, 5, 9),
    "deltaT": positive(1, 3),
    "beta1": Spec([0.5, 0.85, 0.999], [0, 1, 1.5, -0.5, NAN, INF, "0.85", True, None], "in (0, 1)"),
    "beta2": Spec([0.5, 0.85], [0, 1.0, 2, NAN, "0.85", None], "in (0, 1)"),
    "orth_reg_weight": Spec([0, 0.5, 2], [-1, NAN, INF, "0.5", True, None], "finite number >= 0"),
    "total_step": Spec([1, 10, 20], [0, -1, True, "10", 10.0], "positive integer"),
    "rank_pattern": Spec([None], [5, ["q_proj.lora_E"], "q_proj"], "a dict"),
}
IA3 = {
    **BASE,
    "target_modules": LORA["target_modules"],
    "exclude_modules": LORA["exclude_modules"],
    "feedforward_modules": Spec([None, [], ["down_proj"], "nothing"], NAMES_INVALID, "list of module names"),
    "fan_in_fan_out": boolean(),
    "init_ia3_weights": boolean(),
}
BOTTLENECK = {
    **BASE,
    **layer_selection([["o_proj"], ["down_proj"], r".*\.mlp"], ["layers"]),
    "adapter_size": positive(1, 8, 64),
    "adapter_act": choice(["relu", "gelu", "silu", "swish", "tanh"], ["sigmoid", None, 1, "RELU"]),
    "adapter_dropout": DROPOUT,
    "parallel": boolean(),
    "scaling": finite(1.0, 0.5, -2, 0),
    "style": choice(["houlsby", "pfeiffer"], ["lora", None, 1]),
}
DIFF_PRUNING = {
    **BASE,
    **layer_selection(LLAMA_TARGETS, ["layers"]),
    "density": Spec([0.005, 0.5, 1, 1.0], [0, -0.1, 1.5, NAN, INF, "0.1", True, None], "in (0, 1]"),
    "l0_penalty": Spec([0, 1.0, 3], [-1, NAN, INF, "1", True, None], "finite number >= 0"),
    "gate_temperature": Spec([1.0, 2 / 3], [0, -1, NAN, INF, "1", None], "finite number > 0"),
    "gate_stretch_low": Spec([-1.5, -0.1], [0, 0.1, NAN, -INF, "-1.5", True], "finite number < 0"),
    "gate_stretch_high": Spec([1.5, 1.1], [1, 0.5, INF, NAN, "1.5"], "finite number > 1"),
    "gate_init_log_alpha": finite(5, -2, 0),
}
BITFIT = {
    **BASE,
    **layer_selection([["c_attn"], "all-linear", r".*\.c_fc", ["q_proj"]], ["h"]),
}
VIRTUAL_TOKENS = {
    **BASE,
    "num_virtual_tokens": positive(1, 3, 8),
    "token_dim": positive(32, 16, optional=True),
    "num_transformer_submodules": choice([None, 1], [2, 0, True, "1"]),
    "num_attention_heads": positive(4, 2, optional=True),
    "num_layers": positive(2, 7, optional=True),
}
PROMPT_TUNING = {
    **VIRTUAL_TOKENS,
    "prompt_tuning_init": choice(
        ["RANDOM", "SAMPLE_VOCAB", PromptTuningInit.RANDOM, "TEXT"], ["WORDS", "random", None, 1]
    ),
    "prompt_tuning_init_text": Spec([None, "the film was good", "   "], [5, ["the film"]], "a string"),
    "tokenizer_name_or_path": Spec([None, "<tokenizer folder>", "/nonexistent/tokenizer"], [5], "a string"),
    "tokenizer_kwargs": Spec([None, {}, {"use_fast": True}], [5, ["a"], {1: 2}], "keyword arguments"),
}
P_TUNING = {
    **VIRTUAL_TOKENS,
    "encoder_reparameterization_type": choice(["MLP", "LSTM"], ["GRU", "mlp", None, 1]),
    "encoder_hidden_size": positive(8, 32, optional=True),
    "encoder_num_layers": positive(1, 2, 3),
    "encoder_dropout": DROPOUT,
}
PREFIX_TUNING = {
    **VIRTUAL_TOKENS,
    "token_dim": positive(32, 16, 12, optional=True),
    "num_attention_heads": positive(4, 2, 3, optional=True),
    "num_layers": positive(2, 3, optional=True),
    "num_transformer_submodules": choice([None, 1, 2], [3, 0, True, "1"]),
    "init_weights": choice([None, "zero"], ["gaussian", 0, True]),
    "encoder_hidden_size": positive(8, 32, optional=True),
    "prefix_projection": boolean(),
}
# class -> (what each option takes, the options it needs to build at all, the tiny model it adapts)
CASES = {
    LoraConfig: (LORA, {}, tiny_llama),
    AdaLoraConfig: (ADALORA, {"total_step": 10}, tiny_llama),
    IA3Config: (IA3, {}, tiny_llama),
    AdapterConfig: (BOTTLENECK, {}, tiny_llama),
    DiffPruningConfig: (DIFF_PRUNING, {}, tiny_llama),
    BitFitConfig: (BITFIT, {}, tiny_gpt2),
    PromptTuningConfig: (PROMPT_TUNING, {"num_virtual_tokens": 2}, tiny_llama),
    PromptEncoderConfig: (P_TUNING, {"num_virtual_tokens": 2}, tiny_llama),
    PrefixTuningConfig: (PREFIX_TUNING, {"num_virtual_tokens": 2}, tiny_llama),
}
CLASSES = list(CASES)


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def options(cls: type, folder: Any) -> st.SearchStrategy[dict[str, tuple[bool, Any]]]:
    """Some of the class's options with valid values, and none, one or two of them (or others) with invalid
    ones, as {option: (valid, value)}."""
    specs = CASES[cls][0]

    def valid(spec: Spec) -> list:
        return [str(folder) if v == "<tokenizer folder>" else v for v in spec.valid]

    good = st.fixed_dictionaries({}, optional={n: st.sampled_from(valid(s)) for n, s in specs.items()})
    bad = st.sampled_from([(n, v) for n, s in specs.items() for v in s.invalid])
    return st.builds(
        lambda g, b: {n: (True, v) for n, v in g.items()} | {n: (False, v) for n, v in b},
        good,
        st.lists(bad, max_size=2),
    )


def raise_again(error: BaseException) -> None:
    raise error


def named_option(error: BaseException, given: dict[str, Any]) -> str:
    """The first of the `given` options that the error's message names as a word ("r", not the r in "or"); a
    placeholder no message holds when it names none, so that the probe then counts an unclear error."""
    named = [name for name in given if re.search(rf"\b{name}\b", str(error))]
    return named[0] if named else "<one of the options given>"


def check_adapts(cls: type, config: Any, base: torch.nn.Module, drawn: dict[str, Any]) -> None:
    """get_peft_model and one forward work with finite outputs, or get_peft_model refuses clearly, naming one
    of the options the config was given (targets that match nothing, sizes that do not fit the model)."""
    try:
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            logits = model(input_ids=INPUT_IDS).logits
    except Exception as error:
        refuses(functools.partial(raise_again, error), named_option(error, drawn))
        return
    assert torch.isfinite(logits).all(), f"{cls.__name__}({drawn}) gives non-finite outputs"


# ---- every option of every class has a domain --------------------------------------------------------


def test_the_cases_cover_every_config_class_peftkit_has():
    assert {
        m.config_class for m in METHODS.values() if m.config_class.__module__.startswith("peftkit.")
    } == set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_option_has_a_domain_and_a_generated_case(cls):
    assert set(cls.field_domains) == set(init_fields(cls)), "options without a domain, or domains without one"
    assert set(CASES[cls][0]) == set(init_fields(cls)), "options the generated test does not draw"
    reads(lambda: cls(**CASES[cls][1]))  # the defaults are in every domain


# ---- generated values --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_generated_options_are_refused_by_name_or_adapt_a_model(cls, causal_folder):
    specs, required, make_model = CASES[cls]
    base = make_model()

    @given(options(cls, causal_folder))
    def check(drawn: dict[str, tuple[bool, Any]]) -> None:
        kwargs = {**required, **{name: value for name, (_, value) in drawn.items()}}
        invalid = [name for name in cls.field_domains if name in drawn and not drawn[name][0]]
        if invalid:  # options are checked in the order of field_domains; the first bad one is named
            name = invalid[0]
            refuses(lambda: cls(**kwargs), name, hints=(specs[name].hint,))
            return
        try:
            config = cls(**kwargs)
        except Exception as error:  # valid values that contradict each other: named, and no other error
            refuses(functools.partial(raise_again, error), named_option(error, kwargs))
            return
        again = reads(lambda: cls.from_dict(json.loads(json.dumps(config.to_dict()))))
        assert again.to_dict() == config.to_dict(), "what a config writes reads back as the same config"
        check_adapts(cls, config, base, drawn)

    check()


# ---- unknown and misspelt options ----------------------------------------------------------------------


def misspellings(name: str) -> st.SearchStrategy[str]:
    """`name` with one letter dropped, doubled or swapped with the next."""
    i = st.integers(0, len(name) - 2)
    return st.one_of(
        i.map(lambda k: name[:k] + name[k + 1 :]),
        i.map(lambda k: name[:k] + name[k] + name[k:]),
        i.map(lambda k: name[:k] + name[k + 1] + name[k] + name[k + 2 :]),
    )


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_unknown_and_misspelt_options_are_refused_with_the_real_ones(cls, data):
    fields = init_fields(cls)
    typo, key = data.draw(
        st.one_of(
            st.tuples(
                st.just(True), st.sampled_from([n for n in fields if len(n) >= 6]).flatmap(misspellings)
            ),
            st.tuples(st.just(False), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)),
        ).filter(lambda drawn: drawn[1] not in fields and drawn[1].isidentifier())
    )
    error = refuses(lambda: cls(**CASES[cls][1], **{key: 1}), repr(key), hints=("its options are",))
    assert isinstance(error, TypeError)
    suggested = str(error).partition("(did you mean '")[2].partition("'?)")[0]
    assert suggested or not typo, f"{cls.__name__} suggests no option for the misspelling {key!r}"
    assert not suggested or suggested in fields, f"{cls.__name__} suggests {suggested!r}, not an option"


# ---- adapter_config.json --------------------------------------------------------------------------------


def json_values(values: list) -> list:
    """The values a JSON file can hold as they are (Python's json writes and reads NaN and Infinity too; a
    dict's int keys would come back as strings)."""
    plain = (type(None), bool, int, float, str, list, dict)
    return [v for v in values if isinstance(v, plain) and repr(json.loads(json.dumps(v))) == repr(v)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_a_file_with_a_bad_value_is_refused_naming_the_option_and_the_value(cls, data):
    specs, required = CASES[cls][:2]
    name = data.draw(st.sampled_from([n for n in specs if json_values(specs[n].invalid)]))
    value = data.draw(st.sampled_from(json_values(specs[name].invalid)))
    text = json.dumps(cls(**required).to_dict() | {name: value})  # as adapter_config.json holds it
    shown = [] if isinstance(value, dict) else [repr(value)]  # a dict: the message names its bad entry
    refuses(lambda: cls.from_dict(json.loads(text)), name, *shown, hints=(specs[name].hint,))


@pytest.mark.parametrize(
    ("change", "names", "hint"),
    [
        ({"r": -1}, ("adapter_config.json", "r must be", "got -1"), "positive integer"),
        ({"lora_dropout": "0.1"}, ("adapter_config.json", "lora_dropout", "'0.1'"), "in [0, 1)"),
        ({"target_modules": 5}, ("adapter_config.json", "target_modules", "got 5"), "list of module names"),
        (
            {"layers_to_transform": ["0"]},
            ("adapter_config.json", "layers_to_transform", "['0']"),
            "layer ind",
        ),
        ({"use_dora": "false"}, ("adapter_config.json", "use_dora", "'false'"), "True or False"),
        ({"lora_alpha": None}, ("adapter_config.json", "lora_alpha", "None"), "finite number"),
    ],
)
def test_loading_an_adapter_whose_file_holds_a_bad_value(tmp_path, change, names, hint):
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with left_intact(tmp_path):
        refuses(lambda: PeftModel.from_pretrained(tiny_llama(), str(tmp_path)), *names, hints=(hint,))


# ---- options that contradict each other -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "names", "hint"),
    [
        (lambda: LoraConfig(layers_pattern="layers"), ("layers_pattern", "layers_to_transform"), "give"),
        (lambda: BitFitConfig(layers_pattern=["h"]), ("layers_pattern", "layers_to_transform"), "give"),
        (
            lambda: LoraConfig(init_lora_weights="pissa", lora_alpha=0),
            ("init_lora_weights='pissa'", "lora_alpha"),
            "must be > 0",
        ),
        (
            lambda: LoraConfig(init_lora_weights="pissa_niter_4", alpha_pattern={"q_proj": -2}),
            ("init_lora_weights", "alpha_pattern['q_proj']"),
            "must be > 0",
        ),
        (lambda: AdaLoraConfig(), ("total_step",), "optimizer steps"),
        (lambda: AdaLoraConfig(total_step=10, target_r=16), ("target_r=16", "init_r=12"), "lower target_r"),
        (
            lambda: AdaLoraConfig(total_step=10, tinit=5, tfinal=5),
            ("tinit=5", "tfinal=5", "total_step"),
            "lower",
        ),
        (
            lambda: AdaLoraConfig(total_step=10, rank_pattern={"q_proj": 4}),
            ("rank_pattern", "init_r"),
            "maps",
        ),
        (lambda: AdaLoraConfig(total_step=10, rank_pattern={1: [True] * 12}), ("rank_pattern[1]",), "maps"),
        (
            lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"]),
            ("feedforward_modules", "target_modules"),
            "list it in both",
        ),
        (
            lambda: PromptTuningConfig(
                num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="a"
            ),
            ("prompt_tuning_init=TEXT", "tokenizer_name_or_path"),
            "local tokenizer folder",
        ),
        (
            lambda: PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"use_fast": False}),
            ("tokenizer_kwargs", "prompt_tuning_init"),
            "drop tokenizer_kwargs",
        ),
    ],
)
def test_contradicting_options_are_refused_naming_them(build, names, hint):
    refuses(build, *names, hints=(hint,))


# ---- values that do not fit the model: refused by get_peft_model, before the model is changed ------------


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=20, target_modules=["q_proj", "k_proj"], init_lora_weights="pissa"),
        LoraConfig(
            r=4, rank_pattern={"k_proj": 20}, target_modules=["q_proj", "k_proj"], init_lora_weights="olora"
        ),
    ],
    ids=["pissa", "olora"],
)
def test_factor_initialisations_refuse_a_rank_beyond_the_weight(config):
    model = tiny_llama()
    before = weights(model)
    refuses(
        lambda: get_peft_model(model, config), "init_lora_weights", "r=20", "k_proj", hints=("at most 16",)
    )
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "the refused PiSSA/OLoRA changed base weights"
    )


@pytest.mark.parametrize(
    ("make_model", "config", "names", "hint"),
    [
        (tiny_llama, PromptTuningConfig(num_virtual_tokens=2, token_dim=16), ("token_dim=16",), "32 wide"),
        (tiny_llama, PromptEncoderConfig(num_virtual_tokens=2, token_dim=64), ("token_dim=64",), "32 wide"),
        (tiny_gpt2, PrefixTuningConfig(num_virtual_tokens=2, num_layers=1), ("num_layers=1",), "2 layers"),
        (tiny_llama, PrefixTuningConfig(num_virtual_tokens=2, num_layers=3), ("num_layers=3",), "2 layers"),
        (
            tiny_gpt2,
            PrefixTuningConfig(num_virtual_tokens=2, token_dim=16),
            ("token_dim=16", "num_attention_heads=4"),
            "4 heads of width 8",
        ),
        (
            tiny_gpt2,
            PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=2),
            ("token_dim=32", "num_attention_heads=2"),
            "4 heads of width 8",
        ),
    ],
)
def test_model_dimensions_a_config_sets_must_be_the_models(make_model, config, names, hint):
    refuses(lambda: get_peft_model(make_model(), config), *names, hints=(hint, "leave"))


def text_init(folder: Any, text: str = "the film was good") -> PromptTuningConfig:
    return PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(folder),
    )


def test_text_initialisation_reads_a_local_tokenizer_and_refuses_what_it_cannot_use(causal_folder, tmp_path):
    from transformers import AutoTokenizer

    model = reads(lambda: get_peft_model(tiny_llama(), text_init(causal_folder)))
    ids = AutoTokenizer.from_pretrained(causal_folder)("the film was good")["input_ids"]
    expected = model.get_base_model().get_input_embeddings().weight[(ids * 2)[:5]]
    torch.testing.assert_close(model.model_adapters["default"].prompt_embeddings, expected)

    missing = tmp_path / "no-such-tokenizer"
    refuses(lambda: get_peft_model(tiny_llama(), text_init(missing)), "tokenizer_name_or_path", str(missing))
    refuses(
        lambda: get_peft_model(tiny_llama(), text_init(tmp_path)),
        "tokenizer_name_or_path",
        hints=("a folder",),
    )
    refuses(lambda: get_peft_model(tiny_llama(), text_init(causal_folder, "   ")), "prompt_tuning_init_text")
    small = tiny_llama()
    small.resize_token_embeddings(8)
    refuses(
        lambda: get_peft_model(small, text_init(causal_folder)), "tokenizer_name_or_path", hints=("8 rows",)
    )


def test_a_config_changed_after_it_was_built_is_checked_again_by_get_peft_model():
    config = LoraConfig(target_modules=["q_proj"])
    config.target_modules = 5
    refuses(lambda: get_peft_model(tiny_llama(), config), "target_modules", "got 5")
    config = LoraConfig(target_modules=["q_proj"])
    config.lora_dropout = "0.1"
    refuses(lambda: get_peft_model(tiny_llama(), config), "lora_dropout", hints=("in [0, 1)",))


# ---- the command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "names", "hint"),
    [
        (["--r", "0"], ("r must be", "got 0"), "positive integer"),
        (["--set", "lora_dropout=1.5"], ("lora_dropout", "1.5"), "in [0, 1)"),
        (["--set", "use_dora=maybe"], ("use_dora", "'maybe'"), "True or False"),
        (["--set", "layers_pattern=layers"], ("layers_pattern", "layers_to_transform"), "give"),
    ],
)
def test_the_command_line_refuses_bad_method_options(
    encoder_folder, sentiment_csv, tmp_path, flags, names, hint
):
    run = ["train", "--model", encoder_folder, "--data", sentiment_csv, "--output", tmp_path / "run", *flags]
    with left_intact(tmp_path):
        cli_refuses(run, *names, hints=(hint,))
