"""Which modules a config selects: suffix lists, regexes, "all-linear", exclusions, layer indices."""

from __future__ import annotations

import pytest
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import BitFitConfig, LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.layer import TunedLayer
from peftkit.targeting import layer_index, name_matches, pattern_value

LLAMA_LINEAR = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def targets(model: PeftModel) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, TunedLayer)]


def llama_names(layers=(0, 1), suffixes=LLAMA_LINEAR) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in layers for s in suffixes]


def lora(model_builder=tiny_llama, **config) -> list[str]:
    return targets(get_peft_model(model_builder(), LoraConfig(**config)))


def test_suffix_list_matches_whole_name_segments():
    assert lora(target_modules=["q_proj", "v_proj"]) == llama_names(
        suffixes=["self_attn.q_proj", "self_attn.v_proj"]
    )
    assert lora(target_modules=["mlp.up_proj"]) == llama_names(suffixes=["mlp.up_proj"])
    assert lora(target_modules=["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="matched nothing"):
        lora(target_modules=["proj"])  # "q_proj" does not end with ".proj"


def test_regex_is_a_full_match():
    assert lora(target_modules=r".*\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    assert lora(target_modules=r".*_proj") == llama_names()
    with pytest.raises(ValueError, match="matched nothing"):
        lora(target_modules="q_proj")  # a string is a regex over the whole name


def test_all_linear_skips_the_output_head():
    assert lora(target_modules="all-linear") == llama_names()  # no lm_head, no embed_tokens
    assert lora(target_modules=["all-linear"]) == llama_names()
    gpt2 = lora(tiny_gpt2, target_modules="all-linear")  # Conv1D counts as linear; lm_head (tied) does not
    assert gpt2 == [
        f"transformer.h.{i}.{s}"
        for i in (0, 1)
        for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    bert = lora(tiny_bert, target_modules="all-linear", task_type="SEQ_CLS")
    assert "classifier" not in bert and "bert.pooler.dense" in bert  # the head is trained in full instead
    assert len(bert) == 2 * 6 + 1


def test_exclude_modules():
    assert lora(target_modules="all-linear", exclude_modules=["down_proj", "gate_proj"]) == llama_names(
        suffixes=[s for s in LLAMA_LINEAR if s not in ("mlp.down_proj", "mlp.gate_proj")]
    )
    assert lora(target_modules="all-linear", exclude_modules=r".*\.1\..*") == llama_names(layers=(0,))
    with pytest.raises(
        ValueError, match=r"matched nothing in LlamaForCausalLM \(with exclude_modules=\['q_proj'\]"
    ):
        lora(target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_layers_to_transform_and_layers_pattern():
    assert lora(target_modules=["q_proj"], layers_to_transform=[1]) == ["model.layers.1.self_attn.q_proj"]
    assert lora(target_modules=["q_proj"], layers_to_transform=0) == ["model.layers.0.self_attn.q_proj"]
    assert lora(
        target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern="layers"
    ) == llama_names(suffixes=["self_attn.q_proj"])
    assert lora(
        tiny_gpt2, target_modules=["c_attn"], layers_to_transform=[1], layers_pattern=["blocks", "h"]
    ) == ["transformer.h.1.attn.c_attn"]
    assert targets(
        get_peft_model(
            tiny_bert(), BitFitConfig(task_type="SEQ_CLS", target_modules=["query"], layers_to_transform=[0])
        )
    ) == ["bert.encoder.layer.0.attention.self.query"]
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\]"):
        lora(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")
    with pytest.raises(ValueError, match="matched nothing"):
        lora(target_modules=["q_proj"], layers_to_transform=[2])


def test_layer_index_reads_the_first_numbered_segment():
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("bert.encoder.layer.11.attention.self.query", None) == 11
    assert layer_index("transformer.h.2.attn.c_attn", "h") == 2
    assert layer_index("model.layers.3.mlp.experts.5.w1", None) == 3
    assert layer_index("model.layers.3.mlp.experts.5.w1", "experts") == 5
    assert layer_index("lm_head", None) is None
    assert layer_index("model.layers.3.self_attn.q_proj", "blocks") is None


def test_name_matches_and_pattern_value():
    assert name_matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert name_matches(["q_proj"], "q_proj")
    assert not name_matches(["q_proj"], "model.layers.0.self_attn.xq_proj")
    assert name_matches(r".*q_proj", "a.q_proj") and not name_matches(r"q_proj", "a.q_proj")
    patterns = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 6
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 8
    assert pattern_value(patterns, "model.layers.0.self_attn.xv_proj", 8) == 8  # whole segment only
    assert pattern_value(None, "x", 8) == 8


def test_rank_and_alpha_pattern_lookups():
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 6, "v_proj": 2},
            alpha_pattern={"v_proj": 8},
        ),
    )
    ranks = {
        n: (m.adapters["default"].lora_A.out_features, m.adapters["default"].scaling)
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, TunedLayer)
    }
    assert ranks == {
        "model.layers.0.self_attn.q_proj": (4, 1.0),
        "model.layers.0.self_attn.v_proj": (2, 4.0),
        "model.layers.1.self_attn.q_proj": (6, 4 / 6),
        "model.layers.1.self_attn.v_proj": (2, 4.0),
    }


@pytest.mark.parametrize(
    ("builder", "task", "expected"),
    [
        (tiny_llama, None, llama_names(suffixes=["self_attn.q_proj", "self_attn.v_proj"])),
        (
            tiny_bert,
            TaskType.SEQ_CLS,
            [f"bert.encoder.layer.{i}.attention.self.{s}" for i in (0, 1) for s in ("query", "value")],
        ),
        (tiny_gpt2, None, ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    ],
)
def test_default_targets_by_model_type(builder, task, expected):
    assert lora(builder, task_type=task) == expected


def test_no_default_for_an_unknown_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match=r"LoraConfig needs target_modules for Sequential: for example \['0', '2'\]"
    ):
        PeftModel(model, LoraConfig())


def test_targets_on_a_plain_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    assert targets(PeftModel(model, LoraConfig(target_modules=["2"]))) == ["2"]


def test_a_target_the_method_cannot_adapt_is_explained():
    with pytest.raises(
        ValueError,
        match=r"matched 'model.layers.0.mlp' \(LlamaMLP\), which LoraConfig cannot adapt.*"
        r"\['gate_proj', 'up_proj', 'down_proj'\]",
    ):
        lora(target_modules=["mlp"])


def test_second_adapter_targets_the_original_layers():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("two", LoraConfig(target_modules="all-linear"))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q, TunedLayer) and isinstance(q.base_layer, nn.Linear)
    assert list(q.adapters) == ["default", "two"]
    assert len(targets(model)) == 14
