"""Every method peftkit has: importing a method's file registers it. Add new methods here."""

from .adalora import AdaLoraConfig
from .bitfit import BitFitConfig
from .bottleneck import AdapterConfig, BottleneckConfig
from .diff_pruning import DiffPruningConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig, PromptTuningInit

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "DiffPruningConfig",
    "IA3Config",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
]
