"""`sft merge-sharded`: a sharded checkpoint (torch distributed checkpoint, one file per process,
as FSDP's SHARDED_STATE_DICT writes) → one ordinary safetensors model or adapter.

The weights come from the checkpoint's `pytorch_model_fsdp_0/` (read with torch's own DCP
reader, as accelerate's `merge_fsdp_weights` does); everything around them — the model's
`config.json` or the adapter's `adapter_config.json`, the tokenizer — is rebuilt from the run's
config that sft keeps in every checkpoint (`sft_config.yaml`), exactly as the final save of that
run writes it. The model skeleton is built on the meta device: no base weights are loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import attrs

from sft.errors import ModelError, UsageError
from sft.save import RESOLVED_CONFIG

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's name for the model's sharded state


def find_sharded_state(checkpoint: Path) -> tuple[Path, Path]:
    """(the checkpoint directory, its model DCP directory) for a checkpoint or a DCP directory."""
    checkpoint = Path(checkpoint)
    if (checkpoint / FSDP_MODEL_DIR / ".metadata").is_file():
        return checkpoint, checkpoint / FSDP_MODEL_DIR
    if (checkpoint / ".metadata").is_file():
        return checkpoint.parent, checkpoint
    if not checkpoint.is_dir():
        raise UsageError(f"{checkpoint}: no such directory")
    if any(checkpoint.glob("*.safetensors")) or (checkpoint / "pytorch_model_fsdp.bin").exists():
        raise ModelError(
            f"{checkpoint} holds full (not sharded) weights: nothing to merge\n"
            "  fix: load it as it is, or point at a checkpoint written with "
            "fsdp_config.state_dict_type = 'SHARDED_STATE_DICT'"
        )
    raise ModelError(
        f"{checkpoint} holds no sharded model state ({FSDP_MODEL_DIR}/.metadata)\n"
        "  fix: name a checkpoint-N directory written with "
        "fsdp_config.state_dict_type = 'SHARDED_STATE_DICT'"
    )


def read_sharded_state(state_dir: Path) -> dict[str, Any]:
    """All tensors of a distributed checkpoint, in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import (
        _EmptyStateDictLoadPlanner,
        _load_state_dict,
    )

    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=dcp.FileSystemReader(str(state_dir)),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # accelerate saves {"model": state_dict}
    return state


def _run_config(directory: Path) -> Any:
    from sft.config import load_config

    path = directory / RESOLVED_CONFIG
    if not path.is_file():
        raise ModelError(
            f"{directory} has no {RESOLVED_CONFIG}, so its model cannot be rebuilt around the "
            "weights\n  fix: name a checkpoint that sft wrote (checkpoint-N in a run's output_dir)"
        )
    # A checkpoint is data: its config may name data or a GPU this machine lacks.
    return load_config(path, machine_checks=False)


def _skeleton(config: Any, trust_remote_code: bool, vocab: int | None) -> Any:
    """The trained model's structure on the meta device (adapter attached), no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.classes import transformers_class
    from sft.experts import linearized_llama4_experts
    from sft.model import apply_adapter, model_path

    try:
        hf_config = AutoConfig.from_pretrained(
            model_path(config.base_model),
            trust_remote_code=trust_remote_code,
            revision=config.revision_of_model,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the config of base_model {config.base_model!r}: {exc}\n"
            "  fix: the base model must be reachable (a local path or the Hub cache); pass "
            "--trust-remote-code if it needs its own code"
        ) from exc
    model_class: Any = transformers_class(config.model_type, "model_type")  # the run's class
    with torch.device("meta"), linearized_llama4_experts(config.llama4_linearized_experts):
        if model_class is None:
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        else:
            model = model_class._from_config(hf_config)
    if vocab is not None and vocab != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # new tokens were added
    if config.adapter:
        plain = attrs.evolve(
            config, load_in_4bit=False, load_in_8bit=False, gradient_checkpointing=False
        )
        model = apply_adapter(model, plain)
    return model


def _vocab_size(state: dict[str, Any]) -> int | None:
    for name, tensor in state.items():
        if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
            return int(tensor.shape[0])
    return None


def merge_sharded(
    checkpoint: Path,
    output: Path,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Path, str]:
    """Write the checkpoint's weights as one safetensors model or adapter into `output`, with
    its config and tokenizer. Returns (output, "model" or "adapter").

    A non-empty `output` is refused unless `overwrite`; even then only the files sft writes are
    replaced (see `sft.fsutil.write_directory`), nothing else is deleted.
    """
    from sft.fsutil import storage_failure, write_directory
    from sft.inference import Trained, check_merge_target

    directory, state_dir = find_sharded_state(checkpoint)
    config = _run_config(directory)
    kind = "adapter" if config.adapter else "model"
    check_merge_target(
        Path(output), Trained(directory, config.base_model, bool(config.adapter)), overwrite
    )
    state = read_sharded_state(state_dir)
    if config.adapter and not any("lora_" in name for name in state):
        raise ModelError(
            f"{state_dir} holds no adapter weights although its run trained an adapter\n"
            "  fix: name the checkpoint of an adapter run"
        )

    from sft.tokenizer import load_tokenizer

    trusted = attrs.evolve(config, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(trusted)
    model = _skeleton(config, trust_remote_code, None if config.adapter else _vocab_size(state))
    if config.adapter and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model = _skeleton(config, trust_remote_code, len(tokenizer))

    def write(staging: Path) -> None:
        if config.adapter:
            _write_adapter(model, state, config, staging)
        else:
            expected = set(model.state_dict())
            unknown = sorted(set(state) - expected)
            missing = sorted(expected - set(state) - _tied(model))
            if unknown or missing:
                raise ModelError(
                    f"{state_dir} does not match the model of {config.base_model}: "
                    f"unexpected {unknown[:3]}, missing {missing[:3]}"
                )
            model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.copyfile(directory / RESOLVED_CONFIG, staging / RESOLVED_CONFIG)

    try:
        write_directory(Path(output), write, overwrite=overwrite)
    except Exception as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        raise ModelError(
            f"cannot write the merged model to {output}: {reason}\n"
            "  fix: free space on that disk, or choose another --output "
            "(nothing half-written was left behind)"
        ) from exc
    return Path(output), kind


def _write_adapter(model: Any, state: dict[str, Any], config: Any, staging: Path) -> None:
    """adapter_model.safetensors + adapter_config.json, as `PeftModel.save_pretrained` writes
    them. The sharded state is already in peft's saved form (adapter weights, no adapter name)."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from sft.model import model_path

    expected = set(get_peft_model_state_dict(model))  # names only: the skeleton is on meta
    if set(state) != expected:
        raise ModelError(
            f"the sharded state does not match the run's adapter: unexpected "
            f"{sorted(set(state) - expected)[:3]}, missing {sorted(expected - set(state))[:3]}"
        )
    peft_config = copy.deepcopy(model.peft_config["default"])
    peft_config.inference_mode = True
    peft_config.base_model_name_or_path = model_path(config.base_model)
    peft_config.save_pretrained(str(staging))
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})


def _tied(model: Any) -> set[str]:
    """Parameter names that share another's tensor (a tied LM head): saved once."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys)  # a list of names, or (transformers 5) a dict keyed by them
