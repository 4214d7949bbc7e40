"""Load a fine-tuned result for use: `sft merge-lora` and `sft chat`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from sft.errors import ModelError, UsageError
from sft.save import read_resolved_config


@attrs.frozen
class Trained:
    """Where a fine-tuned result lives and what it was trained from."""

    directory: Path
    base_model: str
    adapter: bool
    trust_remote_code: bool = False


def locate(target: str | Path, overrides: tuple[str, ...] = ()) -> Trained:
    """A config file (its output_dir) or a directory sft wrote."""
    path = Path(target)
    if path.is_file():
        from sft.config import load_config

        config = load_config(path, overrides=overrides)
        directory = Path(config.output_dir)
        if not directory.is_absolute() and not directory.exists():
            directory = path.parent / directory
        base, trust = config.base_model, config.trust_remote_code
    elif path.is_dir():
        directory = path
        resolved = read_resolved_config(path) or read_resolved_config(path.parent) or {}
        base, trust = resolved.get("base_model", ""), bool(resolved.get("trust_remote_code", False))
    else:
        raise UsageError(f"{target}: no such config file or directory")
    adapter = (directory / "adapter_config.json").exists()
    has_model = any(directory.glob("*.safetensors")) and (directory / "config.json").exists()
    if not adapter and not has_model:
        raise ModelError(
            f"{directory} holds no trained model or adapter yet\n  fix: run `sft run` first"
        )
    if adapter and not base:
        raise ModelError(
            f"{directory} holds an adapter but no {read_resolved_config.__module__} config naming its base model"
        )
    return Trained(directory, base, adapter, trust)


def load_base(base_model: str, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from sft.model import model_path

    return AutoModelForCausalLM.from_pretrained(
        model_path(base_model), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    )


def load_trained(trained: Trained, base_only: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a fine-tuned result, or of its base model with `base_only`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained.directory)
    if base_only:
        model = load_base(trained.base_model, trust_remote_code=trained.trust_remote_code)
    elif trained.adapter:
        from peft import PeftModel

        base = load_base(trained.base_model, trust_remote_code=trained.trust_remote_code)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, trained.directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            trained.directory, trust_remote_code=trained.trust_remote_code
        )
    model.eval()
    return model, tokenizer


def merge_lora(trained: Trained, output: Path | None = None) -> Path:
    """Merge the adapter into its (dequantised, full-precision) base; write `merged/`."""
    if not trained.adapter:
        raise ModelError(
            f"{trained.directory} holds a full model, not an adapter: nothing to merge"
        )
    model, tokenizer = load_trained(trained)
    merged = model.merge_and_unload()
    target = output or trained.directory / "merged"
    from sft.fsutil import atomic_directory

    with atomic_directory(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate the assistant's next message with the chat template, streaming pieces to `on_text`."""
    import torch
    from transformers import TextIteratorStreamer

    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template\n  fix: train with chat_template = 'chatml' (or another) set"
        )
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "streamer": streamer,
        "pad_token_id": tokenizer.eos_token_id
        if tokenizer.pad_token_id is None
        else tokenizer.pad_token_id,
    }
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature)
    else:
        options.update(do_sample=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**inputs, **options)
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if on_text:
            on_text(piece)
    worker.join()
    if errors:
        raise errors[0]
    return "".join(pieces).strip()
