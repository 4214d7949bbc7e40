"""Axolotl's parallelism sizes: `dp_shard_size`, `dp_replicate_size`, `expert_parallel_size`.

- `dp_shard_size` / `dp_replicate_size` (FSDP2 shard group, HSDP replicas) go to accelerate's
  FSDP2 as its `ParallelismConfig`: the fsdp engine, with resumable checkpoints.
- `expert_parallel_size` (MoE experts split across ranks) runs on transformers' native sharded
  loading: a `DistributedConfig` given to `from_pretrained` (FSDP2 over the same ranks, experts
  sharded inside), trained by its Trainer as it is (an adapter attached afterwards included);
  it runs on CPUs (gloo) as on GPUs. transformers cannot checkpoint the optimizer state of such
  a model: its checkpoints hold the model only, and a run cannot resume from them (said when
  the config is checked, refused at resume). transformers shards by the model's own plan (every
  decoder layer): another `auto_wrap_policy` or `transformer_layer_cls_to_wrap` is refused.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from sft.config.schema import Config, key
from sft.errors import ModelError, Problem
from sft.plugins.fsdp.settings import FsdpSettings


@attrs.frozen
class ParallelKeys:
    dp_shard_size: int | None = key(
        None,
        ge=1,
        doc="Processes one FSDP2 shard group spans (Axolotl's key): the model, its gradients and "
        "optimizer state are split across them. Default: all processes (÷ dp_replicate_size).",
    )
    dp_replicate_size: int | None = key(
        None,
        ge=1,
        doc="Copies of the sharded model (HSDP): gradients are reduce-scattered inside each shard "
        "group and all-reduced across the copies (e.g. one copy per node).",
    )
    expert_parallel_size: int | None = key(
        None,
        ge=1,
        doc="Processes a MoE model's experts are split across (expert parallelism, within the "
        "FSDP2 shard group); needs a model whose transformers class has an expert plan.",
    )


SIZES = ("dp_shard_size", "dp_replicate_size", "expert_parallel_size")
# Axolotl's expert-parallel integration: its key is expert_parallel_size, read here.
EP_INTEGRATION = "axolotl.integrations.expert_parallel.ExpertParallelPlugin"
# The bnb_optim plugin's optimizers (their shard-wise form is tested under accelerate's FSDP2).
BNB_OPTIMIZERS = (
    "adamw_8bit",
    "adamw_bnb_8bit",
    "lion_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)


def _above_one(keys: ParallelKeys, name: str) -> bool:
    """A size of 1 is the same as none: Axolotl's examples write them so."""
    return (getattr(keys, name) or 1) > 1


def requested(keys: ParallelKeys) -> bool:
    """Expert parallelism: the native engine's own selection."""
    return _above_one(keys, "expert_parallel_size")


def data_parallel_requested(keys: ParallelKeys) -> bool:
    """FSDP2 shard / replicate sizes: accelerate's FSDP with a ParallelismConfig."""
    return _above_one(keys, "dp_shard_size") or _above_one(keys, "dp_replicate_size")


def parallelism_config(keys: ParallelKeys, world: int) -> Any:
    """accelerate's ParallelismConfig for the FSDP2 engine; the sizes checked against the
    processes first (accelerate's own error comes from deep inside the Trainer)."""
    from accelerate import ParallelismConfig

    found = sizes(keys, world)
    if found["dp_replicate_size"] > 1 and found["fsdp_size"] == 1:
        raise ModelError(
            "dp_replicate_size without sharding (dp_shard_size 1) is plain data parallelism, "
            "which accelerate's FSDP2 does not run\n  fix: remove the fsdp keys and the sizes "
            "(several processes then train with DDP), or set dp_shard_size > 1"
        )
    return ParallelismConfig(
        dp_replicate_size=found["dp_replicate_size"], dp_shard_size=found["fsdp_size"]
    )


def problems(keys: ParallelKeys, settings: FsdpSettings | None, config: Config) -> list[Problem]:
    """What the native engine (expert parallelism) cannot do with the rest of the config."""
    if not requested(keys):
        return []
    where = "expert_parallel_size"
    found = [
        Problem(
            where,
            "transformers' native sharding cannot checkpoint the optimizer state: checkpoints "
            "hold the model only, and this run cannot resume from them",
            hint="keep runs short enough to restart, or train without expert_parallel_size",
            warning=True,
        )
    ]
    for name in (
        "resume_from_checkpoint",
        "auto_resume_from_checkpoints",
        "load_best_model_at_end",
    ):
        if not getattr(config, name):
            continue
        found.append(
            Problem(
                name,
                f"is not available with {where}: transformers' native sharding keeps no "
                "optimizer state in checkpoints (and none to reload a best one)",
                hint=f"remove {name}",
            )
        )
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(config, flag):
            found.append(
                Problem(
                    flag,
                    f"bitsandbytes weights cannot be sharded by transformers' FSDP2 ({where})",
                    hint=f"remove {flag}, or {where} (QLoRA across GPUs: fsdp_version = 2 "
                    "without the parallelism sizes)",
                )
            )
    if config.optimizer in BNB_OPTIMIZERS:
        found.append(
            Problem(
                "optimizer",
                f"{config.optimizer} (bitsandbytes) is not supported with transformers' native "
                f"sharding ({where}): sft runs bitsandbytes optimizers on the shards of "
                "accelerate's FSDP2 only, and has not tested them here",
                hint="use adamw_torch or adamw_torch_fused",
            )
        )
    shard = keys.dp_shard_size
    ep = keys.expert_parallel_size
    if ep and shard and shard % ep:
        found.append(
            Problem(
                "expert_parallel_size",
                f"{ep} must divide dp_shard_size ({shard}): experts are split inside the shard "
                "group",
                hint="make dp_shard_size a multiple of expert_parallel_size",
            )
        )
    if settings is None:
        return found
    if settings.version != 2:
        found.append(
            Problem(
                "fsdp_version",
                f"{where} shards with FSDP2 (transformers' native loading); FSDP1 is not "
                "available with it",
                hint="set fsdp_version = 2",
            )
        )
    if settings.cpu_ram_efficient_loading:
        found.append(
            Problem(
                "fsdp_config.cpu_ram_efficient_loading",
                f"has no effect with {where}: transformers' native sharding reads only each "
                "process's shards while it loads, which is what this key asks for",
                hint="remove cpu_ram_efficient_loading",
                warning=True,
            )
        )
    if settings.state_dict_type != "FULL_STATE_DICT":
        found.append(
            Problem(
                "fsdp_config.state_dict_type",
                f"{settings.state_dict_type} is not available with {where}: transformers' "
                "native sharding writes full model checkpoints",
                hint="remove state_dict_type",
            )
        )
    if settings.reshard_after_forward is not True:
        found.append(
            Problem(
                "fsdp_config.reshard_after_forward",
                f"false is not available with {where}: transformers' native FSDP2 reshards "
                "after each layer's forward",
                hint="remove reshard_after_forward",
            )
        )
    if settings.auto_wrap_policy != "TRANSFORMER_BASED_WRAP":
        found.append(
            Problem(
                "fsdp_config.auto_wrap_policy",
                f"{settings.auto_wrap_policy} is not available with {where}: transformers "
                "shards every decoder layer by the model's own plan",
                hint="remove auto_wrap_policy",
            )
        )
    return found


def layer_problem(settings: FsdpSettings | None, model: Any) -> str | None:
    """A `transformer_layer_cls_to_wrap` other than the model's own decoder layers."""
    if settings is None or not settings.transformer_layer_cls_to_wrap:
        return None
    own = set(getattr(model, "_no_split_modules", None) or ())
    other = [n for n in settings.transformer_layer_cls_to_wrap if n not in own]
    if not other:
        return None
    return (
        f"fsdp_config.transformer_layer_cls_to_wrap: {', '.join(other)} is not a decoder layer "
        f"of this model ({', '.join(sorted(own)) or 'none listed'}), and transformers' native "
        "FSDP2 shards by the model's own plan\n  fix: remove transformer_layer_cls_to_wrap"
    )


def experts_sharded(model: Any) -> bool:
    """Whether some MoE expert weight is a DTensor split along its expert dimension."""
    from torch.distributed.tensor import DTensor, Shard

    return any(
        "expert" in name
        and isinstance(parameter, DTensor)
        and any(isinstance(p, Shard) and p.dim == 0 for p in parameter.placements)
        for name, parameter in model.named_parameters()
    )


def sizes(keys: ParallelKeys, world: int) -> dict[str, int]:
    """The DistributedConfig sizes for `world` processes; a clear error when they do not fit."""
    replicate = keys.dp_replicate_size or 1
    shard = keys.dp_shard_size or max(1, world // replicate)
    if shard * replicate != world:
        raise ModelError(
            f"dp_shard_size ({shard}) × dp_replicate_size ({replicate}) = {shard * replicate} "
            f"processes, but this run has {world}\n  fix: launch {shard * replicate} processes "
            "(sft run --nproc-per-node N, or torchrun), or change the sizes"
        )
    out = {"fsdp_size": shard, "dp_replicate_size": replicate, "tp_size": 1}
    ep = keys.expert_parallel_size or 1
    if ep > 1:
        if shard % ep:
            raise ModelError(
                f"expert_parallel_size ({ep}) must divide the FSDP2 shard group ({shard} "
                f"processes)\n  fix: set dp_shard_size to a multiple of {ep}"
            )
        out["ep_size"] = ep
    return out


def distributed_config(keys: ParallelKeys, settings: FsdpSettings | None) -> Any:
    from transformers.distributed import DistributedConfig

    if "LOCAL_RANK" not in os.environ:
        raise ModelError(
            "expert_parallel_size splits the model across processes, and this run was started "
            "as one plain process\n  fix: sft run --nproc-per-node N CONFIG, or torchrun "
            "--nproc-per-node N -m sft run CONFIG"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedConfig(
        **sizes(keys, world),  # type: ignore[arg-type]  # the *_size keywords are ints
        fsdp_cpu_offload=bool(settings and settings.offload_params),
    )
