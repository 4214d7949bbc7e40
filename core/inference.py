"""Load a fine-tuned result for use: `sft merge-lora` and `sft chat`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from sft.errors import ModelError, UsageError
from sft.fsutil import is_empty_directory, storage_failure, write_directory
from sft.save import RESOLVED_CONFIG, read_resolved_config


@attrs.frozen
class Trained:
    """Where a fine-tuned result lives and what it was trained from."""

    directory: Path
    base_model: str
    adapter: bool
    trust_remote_code: bool = False
    mistral_common: bool = False  # tokenizer_use_mistral_common: its tekken.json is the tokenizer
    # chat_template_kwargs: the variables the training data was rendered with
    template_variables: dict[str, Any] = attrs.field(factory=dict)
    llama4_linearized_experts: bool = False  # the base and the result keep that layout
    model_type: str | None = None  # the transformers class the run loaded its base with


def locate(
    target: str | Path, overrides: tuple[str, ...] = (), trust_remote_code: bool = False
) -> Trained:
    """A config file (its output_dir) or a directory sft wrote.

    A model directory is data, not code: only the caller (`--trust-remote-code`) or the user's
    own config file can allow the model's Python code to run, never a file inside the
    directory (a downloaded model could carry an `sft_config.yaml` saying so).
    """
    path = Path(target)
    if path.is_file():
        from sft.config import load_config

        # Only output_dir and base_model are used: a training dataset or GPU this machine
        # lacks must not stop chatting with (or merging) the result.
        config = load_config(path, overrides=overrides, machine_checks=False)
        directory = Path(config.output_dir)  # relative: from the working directory, as in run
        base, trust = config.base_model, config.trust_remote_code or trust_remote_code
        mistral = config.tokenizer_use_mistral_common
        variables = getattr(config, "chat_template_kwargs", None) or {}
        linearized = config.llama4_linearized_experts
        model_type = config.model_type
    elif path.is_dir():
        directory = path
        resolved = read_resolved_config(path) or read_resolved_config(path.parent) or {}
        base, trust = resolved.get("base_model", ""), trust_remote_code
        mistral = bool(resolved.get("tokenizer_use_mistral_common"))
        variables = resolved.get("chat_template_kwargs") or {}
        linearized = bool(resolved.get("llama4_linearized_experts"))
        model_type = resolved.get("model_type")
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
            f"{directory} holds an adapter but no {RESOLVED_CONFIG} (here or in its parent) "
            "naming its base model\n  fix: chat with the config file the adapter was trained "
            "with, or copy that run's sft_config.yaml beside the adapter"
        )
    return Trained(
        directory, base, adapter, trust, mistral, dict(variables), linearized, model_type
    )


def load_base(
    base_model: str,
    dtype: Any = None,
    trust_remote_code: bool = False,
    llama4_linearized_experts: bool = False,
    model_type: str | None = None,
    revision: str | None = None,
) -> Any:
    import torch

    from sft.model import model_path

    return _load_causal_lm(
        model_path(base_model),
        llama4_linearized_experts,
        model_type,
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        **({"revision": revision} if revision else {}),
    )


def _load_causal_lm(
    source: Any, llama4_linearized_experts: bool, model_type: str | None, **kwargs: Any
) -> Any:
    """The model's `from_pretrained` with the class the run used (`model_type`, else
    AutoModelForCausalLM), in the Llama 4 experts layout of the checkpoint (a merged model
    written elsewhere has no config saying which)."""
    from transformers import AutoModelForCausalLM

    from sft.classes import transformers_class
    from sft.experts import (
        check_linearized_llama4_load,
        linearized_llama4_experts,
        stores_linearized_llama4_experts,
    )

    # Any: from_pretrained(output_loading_info=True) returns a pair
    auto: Any = transformers_class(model_type, "model_type") or AutoModelForCausalLM

    if not llama4_linearized_experts:
        model, loading = auto.from_pretrained(source, output_loading_info=True, **kwargs)
        if not stores_linearized_llama4_experts(list(loading["unexpected_keys"])):
            return model
        del model  # before loading it again in the other layout: one copy in memory
    with linearized_llama4_experts():
        model, loading = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    check_linearized_llama4_load(model, list(loading["missing_keys"]), str(source))
    return model


def load_trained(trained: Trained, base_only: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a fine-tuned result, or of its base model with `base_only`."""
    try:
        return _load_trained(trained, base_only)
    except ValueError as error:
        if "trust_remote_code" not in str(error) or trained.trust_remote_code:
            raise
        raise ModelError(
            f"{trained.directory}: the model needs its own Python code to load, which is off\n"
            "  fix: pass --trust-remote-code if you trust where the model comes from"
        ) from error


def _load_trained(trained: Trained, base_only: bool) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    if trained.mistral_common:
        from transformers.tokenization_mistral_common import MistralCommonBackend

        tokenizer = MistralCommonBackend.from_pretrained(trained.directory)
    else:
        tokenizer = AutoTokenizer.from_pretrained(trained.directory)
    linearized, model_type = trained.llama4_linearized_experts, trained.model_type
    if base_only:
        model = load_base(
            trained.base_model, None, trained.trust_remote_code, linearized, model_type
        )
    elif trained.adapter:
        from peft import PeftModel

        base = load_base(
            trained.base_model, None, trained.trust_remote_code, linearized, model_type
        )
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, trained.directory)
    else:
        model = _load_causal_lm(
            trained.directory, linearized, model_type, trust_remote_code=trained.trust_remote_code
        )
    model.eval()
    return model, tokenizer


def check_merge_target(target: Path, trained: Trained, overwrite: bool = False) -> None:
    """Refuse, before any model is loaded, a target whose files sft must not touch."""
    resolved = Path(target).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(
            f"{target} is the working directory or one of its parents; "
            "sft writes a merged model only into a directory of its own\n"
            "  fix: name a new directory, e.g. --output merged"
        )
    inputs = {trained.directory.resolve()}
    if Path(trained.base_model).expanduser().is_dir():
        inputs.add(Path(trained.base_model).expanduser().resolve())
    if resolved in inputs:
        raise UsageError(
            f"{target} is the adapter's or the base model's own directory\n"
            "  fix: name a new directory, e.g. --output merged"
        )
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"{target} is a file\n  fix: name a directory for --output")
    if resolved.is_dir() and not is_empty_directory(resolved) and not overwrite:
        raise UsageError(
            f"{target} already exists and is not empty\n"
            "  fix: choose another --output, or pass --overwrite to write the merged model "
            "there: the model and tokenizer files sft writes replace those of the same name, "
            "other files are kept"
        )


def merge_lora(trained: Trained, output: Path | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter into its (dequantised, full-precision) base; write `merged/`.

    An existing non-empty target is refused unless `overwrite`; even then only the files sft
    writes are replaced (see `sft.fsutil.write_directory`), nothing else is deleted.
    """
    if not trained.adapter:
        raise ModelError(
            f"{trained.directory} holds a full model, not an adapter: nothing to merge"
        )
    target = Path(output) if output is not None else trained.directory / "merged"
    check_merge_target(target, trained, overwrite)
    model, tokenizer = load_trained(trained)
    merged = model.merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    try:
        write_directory(target, write, overwrite=overwrite)
    except Exception as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        raise ModelError(
            f"cannot write the merged model to {target}: {reason}\n"
            "  fix: free space on that disk, or choose another --output "
            "(nothing half-written was left behind)"
        ) from exc
    return target


def reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
    template_variables: dict[str, Any] | None = None,
) -> str:
    """Generate the assistant's next message with the chat template, streaming pieces to `on_text`.

    `template_variables`: extra chat-template variables (the run's `chat_template_kwargs`).
    """
    import torch
    from transformers import TextIteratorStreamer

    # mistral-common encodes conversations itself: it has no Jinja template
    own_encoder = type(tokenizer).__name__ == "MistralCommonBackend"
    if not own_encoder and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template\n  fix: train with chat_template = 'chatml' (or another) set"
        )
    inputs = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        **(template_variables or {}),
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
