"""Every method peftkit has: importing a method's file registers it. Add new methods here."""

from .bitfit import BitFitConfig
from .lora import LoraConfig
from .prompt_tuning import PromptTuningConfig, PromptTuningInit

__all__ = ["BitFitConfig", "LoraConfig", "PromptTuningConfig", "PromptTuningInit"]
