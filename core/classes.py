"""The transformers class a config key names in place of an Auto class (`model_type`,
`tokenizer_type`, `cls_model_config`); used by both the model and the tokenizer loader."""

from __future__ import annotations

from typing import Any

from sft.errors import ModelError


def transformers_class(name: str | None, key: str) -> Any:
    """The transformers class a config key names (`model_type`, `tokenizer_type`,
    `cls_model_config`); None for the Auto classes' default."""
    if name is None or name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        return None
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelError(
            f"{key} = {name!r}: the installed transformers {transformers.__version__} has no "
            f"such class\n  fix: remove {key} (the Auto class picks the model's own), or check "
            "the spelling"
        )
    return cls
