"""A method defined outside peftkit plugs in through the registry alone: the core's extension points
(input transforms, output hooks, exported model-wide calls, a custom on-disk format) in one toy method."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from peftkit import LayerAdapter, Method, ModelAdapter, PeftConfig, PeftModel, get_peft_model, register_method
from peftkit.config import method_config
from peftkit.registry import METHODS
from peftkit.targeting import is_linear


@method_config
class InputScaleConfig(PeftConfig):
    """h = W (l ⊙ x) on the targets, plus `penalty`·Σ(l − 1)² added to the loss."""

    peft_type: ClassVar[str] = "TEST_INPUT_SCALE"
    target_modules: list[str] | None = None
    penalty: float = 0.0


class InputScale(LayerAdapter):
    transforms_input = True

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return base_out

    def saved_state(self) -> dict[str, torch.Tensor]:
        changed = (self.scale != 1).nonzero().flatten()  # only the entries that moved, as (index, value)
        return {"scale_indices": changed, "scale_values": self.scale[changed]}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        with torch.no_grad():
            self.scale.fill_(1).index_copy_(0, tensors["scale_indices"], tensors["scale_values"])


class Penalty(ModelAdapter):
    exports = ("scale_norm",)

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def scale_norm(self) -> torch.Tensor:
        return sum(((a.scale - 1) ** 2).sum() for a in self.layer_adapters.values())

    def finish_outputs(self, outputs):
        if outputs.loss is not None:
            outputs.loss = outputs.loss + self.weight * self.scale_norm()
        return outputs


class InputScaleMethod(Method):
    config_class = InputScaleConfig
    adapts_layers = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def layer_adapter(self, base_layer, module_name, config):
        return InputScale(base_layer.in_features)

    def model_adapter(self, model, config):
        return Penalty(config.penalty)


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Register the toy method for this module's tests only."""
    register_method(InputScaleMethod)
    yield
    METHODS.pop(InputScaleConfig.peft_type)


def scaled(seed: int) -> PeftModel:
    model = get_peft_model(tiny_llama(), InputScaleConfig(target_modules=["down_proj"], penalty=0.5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p[::3] = 1 + torch.randn(p[::3].shape, generator=torch.Generator().manual_seed(seed))
    return model


def test_input_transform_output_hook_and_export(input_ids):
    model = scaled(0)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x * layer.adapters["default"].scale))
        out = model(input_ids=input_ids, labels=input_ids)
        with model.disable_adapter():
            plain = model.get_base_model()(input_ids=input_ids, labels=input_ids)
    assert model.scale_norm() > 0  # exported from the model adapter while it is active
    assert not torch.allclose(out.logits, plain.logits)
    torch.testing.assert_close(
        out.loss,
        model.get_base_model()(input_ids=input_ids, labels=input_ids).loss + 0.5 * model.scale_norm(),
    )


def test_mixed_rows_apply_each_rows_input_transform(input_ids):
    model = scaled(0)
    model.add_adapter("other", InputScaleConfig(target_modules=["down_proj"]))
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=["default", "__base__", "other"]).logits
        alone = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    torch.testing.assert_close(mixed[0], alone[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[2], base[2])  # "other" is still all ones


def test_custom_format_round_trip(tmp_path, input_ids):
    model = scaled(1)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.down_proj.scale_indices" in keys
    assert keys["base_model.model.model.layers.0.mlp.down_proj.scale_values"].numel() == 64 // 3 + 1
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_merge_of_a_non_mergeable_layer_adapter_is_refused():
    with pytest.raises(TypeError, match="InputScale cannot be merged"):
        scaled(0).merge_and_unload()
