"""peftkit: parameter-efficient fine-tuning for PyTorch / Hugging Face transformers models."""

from .config import PeftConfig, TaskType
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .layer import LayerAdapter, ModelAdapter, NotMergeableError
from .methods import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    BottleneckConfig,
    DiffPruningConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from .quantization import prepare_model_for_kbit_training, quantize
from .registry import Method, register_method

__version__ = "0.1.0"

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "DiffPruningConfig",
    "IA3Config",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "LayerAdapter",
    "LoraConfig",
    "Method",
    "ModelAdapter",
    "NotMergeableError",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_peft_model",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "quantize",
    "register_method",
]
