"""Load the tokenizer a config asks for, with its special-token overrides and new tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.classes import transformers_class
from sft.config.schema import Config
from sft.errors import ModelError
from sft.gguf import gguf_tokenizer_dir, model_source

if TYPE_CHECKING:
    from sft.manager import SftPlugins


def _mistral_common_tokenizer(name: str, config: Config) -> Any:
    import importlib.util

    # transformers' module imports without mistral-common; its class then fails deep inside
    if importlib.util.find_spec("mistral_common") is None:
        raise ModelError(
            "tokenizer_use_mistral_common = true needs the mistral-common package, which is "
            "not installed\n  fix: pip install 'sft-train[mistral]'"
        )
    from transformers.tokenization_mistral_common import MistralCommonBackend

    revision = None if config.tokenizer_config else config.revision_of_model
    try:
        return MistralCommonBackend.from_pretrained(
            name, **({"revision": revision} if revision else {})
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the mistral-common tokenizer of {name!r}: {exc}\n"
            "  fix: tokenizer_use_mistral_common needs Mistral's own tokenizer file (tekken.json "
            "or tokenizer.model.v*) in base_model / tokenizer_config; remove the key for other "
            "models"
        ) from exc


def _saved_generic_class(directory: Path) -> Any:
    """The generic fast-tokenizer class sft's own converted GGUF tokenizer was saved as, if so.

    AutoTokenizer loads such a directory as that class too, but its import pulls in torch and
    every model's configuration (~2 s); the class itself imports without them.
    """
    try:
        saved = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("tokenizer_class") != "TokenizersBackend" or "auto_map" in saved:
        return None
    from transformers import TokenizersBackend

    return TokenizersBackend


def load_tokenizer(config: Config, plugins: SftPlugins | None = None) -> Any:
    name = config.tokenizer_config or config.base_model
    if config.tokenizer_use_mistral_common:
        return apply_token_config(_mistral_common_tokenizer(name, config), config, plugins)
    source, extra = model_source(name)
    from_gguf = bool(extra)  # converted from the .gguf file below, then kept in transformers form
    tokenizer_class = transformers_class(config.tokenizer_type, "tokenizer_type")
    if from_gguf and (gguf_tokenizer_dir(name) / "tokenizer_config.json").exists():
        source, extra = str(gguf_tokenizer_dir(name)), {}  # converted once, loads in ~0.1 s
        from_gguf = False
        tokenizer_class = tokenizer_class or _saved_generic_class(Path(source))
    if tokenizer_class is None:
        from transformers import AutoTokenizer

        tokenizer_class = AutoTokenizer
    if config.tokenizer_legacy is not None:
        extra = {**extra, "legacy": config.tokenizer_legacy}
    try:
        tokenizer = tokenizer_class.from_pretrained(
            source,
            trust_remote_code=config.trust_remote_code,
            revision=None if config.tokenizer_config else config.revision_of_model,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer of {name!r}: {exc}\n"
            "  fix: check base_model / tokenizer_config (a Hub id needs network access or a "
            "local cache; a directory needs tokenizer files)"
        ) from exc
    if from_gguf:
        from sft.fsutil import atomic_directory

        with atomic_directory(gguf_tokenizer_dir(name)) as staging:
            tokenizer.save_pretrained(staging)
    return apply_token_config(tokenizer, config, plugins)


def apply_token_config(tokenizer: Any, config: Config, plugins: SftPlugins | None = None) -> Any:
    """Apply `special_tokens`, `tokens` and the plugins' tokenizer preparation."""
    # mistral-common encodes conversations itself (token ids, no offsets needed); its
    # vocabulary is fixed, so special_tokens and tokens are refused with the config.
    if not getattr(tokenizer, "is_fast", False) and not config.tokenizer_use_mistral_common:
        raise ModelError(
            "sft needs a fast (Rust) tokenizer for exact label masking; this one is slow",
        )
    if config.special_tokens:  # roles were checked with the config
        tokenizer.add_special_tokens(dict(config.special_tokens))
    if config.tokens:
        tokenizer.add_tokens(list(config.tokens))
    if plugins is None:
        plugins = config.plugin_set
    plugins.prepare_tokenizer(tokenizer, config)
    return tokenizer
