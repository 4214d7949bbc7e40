"""A `.gguf` file as `base_model` or `tokenizer_config`: from_pretrained reads it from its
directory with `gguf_file=` and dequantises the weights on every load, so sft converts the model
once into a transformers directory in its cache (`SFT_CACHE`, default ~/.cache/sft) and loads that.

The cache key is the file's resolved path, size and modification time, so a changed file is
converted again. The tokenizer is kept in a directory of its own (`<model dir>-tokenizer`),
written by the first tokenizer load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sft.errors import ModelError
from sft.fsutil import atomic_directory


def model_source(name: str) -> tuple[str, dict[str, Any]]:
    """Split a `.gguf` file path into (directory, {"gguf_file": file name}) for from_pretrained."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def gguf_cache_dir(path: Path) -> Path:
    """Where a dequantised GGUF model is kept in transformers format (so later loads are fast)."""
    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))
    return root / "gguf" / f"{path.stem}-{key}"


def gguf_tokenizer_dir(name: str) -> Path:
    """Where the tokenizer of a GGUF file is kept in transformers format (beside the model)."""
    model_dir = gguf_cache_dir(Path(name).expanduser())
    return model_dir.with_name(model_dir.name + "-tokenizer")


def materialise_gguf(name: str) -> str:
    """Dequantise a .gguf file once into a transformers directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    target = gguf_cache_dir(path)
    if (target / "config.json").exists():
        return str(target)
    source, extra = model_source(name)
    model = AutoModelForCausalLM.from_pretrained(source, **extra)
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers keeps a GGUF quantizer on the dequantised model that blocks saving/training.
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return str(target)
